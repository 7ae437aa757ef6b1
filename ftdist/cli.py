"""The `ftdist` command: parse argv, load the job file, hand off. No logic here.

No torch, Ray or DeepSpeed at import time: each command imports what it runs inside its own function (the only
function-local imports in the product code besides optional packages), so `ftdist validate` and `--help` answer at
once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator, Optional

from ftdist.errors import SpecError
from ftdist.redact import redact
from ftdist.spec import check_local_inputs, load_spec, missing_local_inputs, parse_size, spec_from_json
from ftdist.storage.uri import FILE_SCHEME, S3_SCHEME, is_remote, local_path, location_problem
from ftdist.sweep.space import validate_sweep


def _add_job_args(p: argparse.ArgumentParser, inline: bool = False) -> None:
    if inline:
        p.add_argument("job", nargs="?", help="job YAML file")
        p.add_argument("--job-json", default=None, metavar="JSON",
                       help="the job as JSON instead of a file (how `ftdist k8s render` passes it to the cluster)")
    else:
        p.add_argument("job", help="job YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a job-file key (repeatable), e.g. --set optim.lr=2e-5")


def _load(args: argparse.Namespace):
    """The job spec from the file (or --job-json), with --set applied; local inputs checked."""
    spec = _load_unchecked(args)
    check_local_inputs(spec)
    return spec


def _spec_file(path: str, overrides: list[str]):
    return _deepspeed_checked(load_spec(path, overrides))


def _deepspeed_checked(spec):
    """Keys passed through to DeepSpeed (deepspeed_extra) read by DeepSpeed's own config parser now, not in the
    workers after Ray started (only jobs that pass keys load DeepSpeed here)."""
    if spec.deepspeed_extra:
        from ftdist.train.ds_config import check_with_deepspeed

        check_with_deepspeed(spec)
    return spec


def _load_unchecked(args: argparse.Namespace):
    if getattr(args, "job_json", None) is not None:
        if args.job:
            raise SpecError("give a job file or --job-json, not both")
        spec = _deepspeed_checked(spec_from_json(args.job_json, args.overrides))
    elif args.job:
        spec = _spec_file(args.job, args.overrides)
    else:
        raise SpecError("give a job file (or --job-json)")
    return spec


def _cmd_validate(args: argparse.Namespace) -> int:
    spec = _spec_file(args.job, args.overrides)
    if args.no_local_check:  # a cluster job names paths on its nodes (/mnt/data/...): say which, don't fail
        for key, path, problem in missing_local_inputs(spec):
            print(f"ftdist: note: {key}: {path}: {problem} here (not checked: --no-local-check)", file=sys.stderr)
    else:
        check_local_inputs(spec)
    if spec.sweep is not None:
        validate_sweep(spec, args.job)
    print(f"{args.job}: ok ({spec.name}: method {spec.method}, ZeRO-{spec.zero.stage}, "
          f"{spec.resources.num_workers} workers, grad accum {spec.grad_accum})")
    return 0


def _preflight(args: argparse.Namespace, spec) -> None:
    """What `train` and `tune` check on this machine before Ray starts and before anything is written (the run
    lease included): the cluster address answers, the data tokenizes, the storage takes writes, the tracking server
    answers."""
    from concurrent.futures import ThreadPoolExecutor

    from ftdist.train.driver import preflight_data, preflight_storage
    from ftdist.train.obs.tracking import check_tracking
    from ftdist.train.ray_runtime import check_local_gpus

    if not _check_address(args):
        check_local_gpus(spec.resources)
    with ThreadPoolExecutor(max_workers=1) as pool:
        tracking_checked = pool.submit(check_tracking, spec)  # MLflow's imports and a round trip, beside these
        resize = preflight_storage(spec)
        tracking_checked.result()
    checked = preflight_data(spec)  # last: a preparation writes its entry into the storage
    # After every check passed: an error stays the only line.
    if resize is not None:
        print(f"ftdist: resume: {resize}", file=sys.stderr)
    if checked is not None:
        print(f"ftdist: data: {checked.line()}", file=sys.stderr)


def _check_address(args: argparse.Namespace) -> Optional[str]:
    """The cluster address (--address, else RAY_ADDRESS) answers, checked before anything starts: one line now,
    not Ray's minute of retries (and never quietly the Ray this process may already run). None: no cluster given."""
    from ftdist.train.ray_runtime import check_reachable

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
    return address


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from ftdist.plan.report import make_plan, render, to_json

    spec = _spec_file(args.job, args.overrides)
    check_local_inputs(spec)
    if spec.sweep is not None:
        validate_sweep(spec, args.job)
    for flag, value in (("--gpus", args.gpus), ("--gpus-per-node", args.gpus_per_node), ("--rows", args.rows)):
        if value is not None and value < 1:
            raise SpecError(f"{flag} {value}: must be at least 1")
    if args.price_per_gpu_hour is not None and not args.price_per_gpu_hour >= 0:
        raise SpecError(f"--price-per-gpu-hour {args.price_per_gpu_hour}: must be a price (0 or more)")
    plan = make_plan(spec, gpu_name=args.gpu, gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                     price=args.price_per_gpu_hour, rows=args.rows)
    print(json.dumps(to_json(plan), indent=2) if args.json else render(plan))
    return 0 if plan.memory.fits else 1


def _cmd_preflight(args: argparse.Namespace) -> int:
    import json

    from ftdist.preflight.report import render, to_json
    from ftdist.preflight.run import run_preflight

    # No check of local inputs: on a cluster they are paths on the nodes, which the preflight checks there.
    spec = _load_unchecked(args)
    if spec.sweep is not None:
        validate_sweep(spec, args.job or "--job-json")
    if not args.timeout > 0:
        raise SpecError(f"--timeout {args.timeout}: must be a number of seconds above 0")
    _check_address(args)
    # With --json, stdout carries the JSON alone: the workers' log lines that Ray streams to this process during the
    # step go to stderr meanwhile.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        checklist = run_preflight(spec, args.address, tuple(args.skip), args.timeout)
    print(json.dumps(to_json(checklist), indent=2) if args.json else render(checklist), flush=True)
    failed = checklist.failed
    if failed:
        print(f"ftdist: preflight failed: {len(failed)} problem{'s' * (len(failed) > 1)} (FAIL above) in "
              f"{checklist.seconds:.0f} s; the job was not started", file=sys.stderr)
        return 2
    print(f"ftdist: preflight passed ({len(checklist.checks)} checks in {checklist.seconds:.0f} s)", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    spec = _load(args)
    from ftdist.train.driver import run_training

    _preflight(args, spec)
    summary = run_training(spec, address=args.address, dashboard=args.dashboard)
    if summary.error is not None:
        print(f"ftdist: training failed: {redact(_first_line(summary.error))}", file=sys.stderr)
        print(f"ftdist: run folder (re-run the same job to resume): {summary.run_dir}", file=sys.stderr)
        return 1
    m = summary.metrics
    shown = ", ".join(f"{k} {m[k]:.4g}" for k in ("loss", "eval_loss", "eval_perplexity", "eval_preference_accuracy")
                      if k in m)
    print(f"ftdist: done at step {m.get('step')}: {shown}")
    print(f"ftdist: checkpoint: {summary.checkpoint}")
    if summary.state is not None:  # every attempt of the run so far, as recorded in the checkpoint's manifest
        st = summary.state
        gpu = f"{st.gpu_seconds / 3600:.3g} GPU-hours, " if st.gpu_seconds else ""
        print(f"ftdist: spent {gpu}{st.worker_seconds / 3600:.3g} worker-hours ({len(st.resumes)} resumes)")
    if summary.export_dir:
        print(f"ftdist: exported model: {summary.export_dir}")
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from ftdist.train.prepare import describe, run_prepare

    spec = _load(args)
    for flag, value in (("--processes", args.processes), ("--chunk-rows", args.chunk_rows)):
        if value is not None and value < 1:
            raise SpecError(f"{flag} {value}: must be at least 1")
    if args.address:
        _check_address(args)
    manifest, built = run_prepare(spec, address=args.address, processes=args.processes or os.cpu_count() or 1,
                                  chunk_rows=args.chunk_rows, force=args.force)
    for line in describe(spec, manifest, built):
        print(f"ftdist: {line}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    spec = _load(args)
    validate_sweep(spec, args.job or "--job-json")
    from ftdist.sweep.tune import run_sweep

    _preflight(args, spec)
    out = run_sweep(spec, address=args.address, resume=args.resume)
    _print_sweep(out)
    return 1 if out.errors or out.report.best is None else 0


def _print_sweep(out) -> None:
    r = out.report
    print(r.markdown())
    best = r.best
    if best is not None:
        print(f"ftdist: best trial {best.trial_id}: {r.spec.sweep.metric} {best.last(r.spec.sweep.metric):.4g} "
              f"with {', '.join(f'{k}={v}' for k, v in best.params.items())}")
    for kind, uri in out.files.items():
        print(f"ftdist: {kind}: {uri}")
    if out.deleted:
        print(f"ftdist: retention deleted {len(out.deleted)} checkpoint(s) of the other trials")
    if out.pruned:
        print(f"ftdist: removed {len(out.pruned)} folder(s) of trials an interrupted driver started but Tune never "
              f"recorded (their configurations ran again): {', '.join(out.pruned)}")
    for kind, uri in (out.exported or {}).items():
        print(f"ftdist: best trial exported ({kind}): {uri}")
    for t in out.errors:
        print(f"ftdist: trial {t.trial_id} failed: {t.error}", file=sys.stderr)


def _cmd_sweep_report(args: argparse.Namespace) -> int:
    from ftdist.sweep.report import finish, load_saved_spec

    with _storage_errors(args.sweep_uri, "sweep"):
        spec = load_saved_spec(args.sweep_uri)
        out = finish(spec, retention=False, export=False)
    _print_sweep(out)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ftdist.train.obs.report import load_run_report

    with _storage_errors(args.run_uri, "run folder"):
        run_uri = args.run_uri.rstrip("/") if is_remote(args.run_uri) else local_path(args.run_uri)
        report = load_run_report(run_uri)
        files = report.write()
    print(report.markdown())
    for name, uri in files.items():
        print(f"ftdist: {name}: {uri}")
    return 0


def _first_line(e: BaseException) -> str:
    # Ray wraps the worker error; the last line of its message names the real exception.
    text = str(e).strip().splitlines()
    tail = [ln for ln in text if ln and not ln.startswith((" ", "Traceback", "["))]
    return (tail[-1] if tail else type(e).__name__)[:400]


@contextlib.contextmanager
def _storage_errors(uri: str, what: str = "location") -> Iterator[None]:
    """Storage/checkpoint mistakes as one-line SpecErrors (exit 2). An s3:// URI is probed first with the same short
    timeouts and two attempts as train's preflight (s3.check_access), so an unreachable endpoint, a missing bucket
    or refused credentials answer in seconds, not after the long retries meant for uploads."""
    from botocore.exceptions import BotoCoreError, ClientError

    from ftdist.storage import s3
    from ftdist.storage.checkpoints import CheckpointError
    from ftdist.storage.s3 import describe_error

    _check_uri(uri, what)
    if is_remote(uri):
        s3.check_access(uri, probe_write=False)
    try:
        yield
    except (ClientError, BotoCoreError) as e:
        raise SpecError(describe_error(e, uri)) from None
    except (CheckpointError, ValueError, FileNotFoundError, KeyError) as e:
        raise SpecError(str(e).strip("'\"")) from None


def _check_uri(uri: str, what: str) -> None:
    """A storage URI given on the command line: a supported scheme and a valid bucket (never echoing credentials)."""
    problem = location_problem(uri, (S3_SCHEME, FILE_SCHEME))
    if problem:
        raise SpecError(f"{what} {uri}: {problem}")


def _cmd_checkpoints(args: argparse.Namespace) -> int:
    from ftdist.storage.checkpoints import CheckpointStore

    _check_uri(args.job_uri, "job folder")
    job_uri = args.job_uri.rstrip("/") if is_remote(args.job_uri) else local_path(args.job_uri)
    if not is_remote(job_uri) and not os.path.isdir(job_uri):
        raise SpecError(f"{args.job_uri}: no such folder (give <checkpoint.storage>/<job name>)")
    with _storage_errors(job_uri, "job folder"):
        cs = CheckpointStore(job_uri)
        found = cs.checkpoints(committed_only=not args.all)
        if args.verify not in (None, "latest") and args.verify not in {c.name for c in found if c.committed}:
            have = ", ".join(c.name for c in found if c.committed) or "none committed"
            raise SpecError(f"--verify {args.verify}: no such committed checkpoint in {args.job_uri} ({have})")
        if not found:
            _no_checkpoints(cs, args.job_uri)
            print(f"{args.job_uri}: no committed checkpoints", file=sys.stderr if args.verify else sys.stdout)
            return 1 if args.verify else 0
        keys = ("loss", "eval_loss")
        gpu = any(c.manifest and c.manifest.gpu_hours for c in found)
        hours = "GPU-h" if gpu else "worker-h"
        print(f"{'checkpoint':<16} {'step':>8} {'workers':>7} {'zero':>4} {'method':<6} {'size':>10} {hours:>8}  "
              f"metrics")
        for c in found:
            m = c.manifest
            metrics = m.metrics if m else {}
            shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
            status = "" if c.committed else "  (uncommitted)"
            workers, stage, method = (m.world_size, m.zero_stage, m.method) if m else ("-", "-", "-")
            spent = f"{(m.gpu_hours if gpu else m.worker_hours):.3g}" if m else "-"
            print(f"{c.name:<16} {c.step:>8} {workers:>7} {stage:>4} {method:<6} {_human(c.size):>10} {spent:>8}  "
                  f"{shown}{status}")
        if args.verify:
            name = found[-1].name if args.verify == "latest" else args.verify
            problems = cs.problems(name, deep=not args.shallow)
            what = "sizes" if args.shallow else "sizes and hashes"
            if problems:
                for p in problems:
                    print(f"{name}: {p}", file=sys.stderr)
                return 1
            print(f"{name}: verified ({what} of {len(cs.read_manifest(name).files)} files)")
    return 0


def _no_checkpoints(cs, shown: str) -> None:
    """A folder with no checkpoint at all is a mistyped location when it is empty (an s3:// prefix with nothing under
    it) or holds job folders (the storage root was given, not <storage>/<job name>): say so, exit 2."""
    from ftdist.storage.checkpoints import CheckpointStore

    if cs.checkpoints(committed_only=False):
        return
    jobs = [d for d in cs.store.list_dirs() if CheckpointStore(cs.store.child(d)).checkpoints(committed_only=False)]
    if jobs:
        listed = ", ".join(jobs[:5]) + (", ..." if len(jobs) > 5 else "")
        raise SpecError(f"{shown}: holds jobs ({listed}), not checkpoints; give <checkpoint.storage>/<job name>")
    if is_remote(shown) and not cs.store.list(""):
        raise SpecError(f"{shown}: nothing is stored under this prefix (give <checkpoint.storage>/<job name>)")


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _cmd_export(args: argparse.Namespace) -> int:
    from ftdist.train.wise_ft import parse_alphas

    alphas = parse_alphas(args.interpolate) if args.interpolate is not None else None
    if args.max_shard_size is not None:
        try:
            parse_size(args.max_shard_size)
        except ValueError as e:
            raise SpecError(f"--max-shard-size: {e}") from None
    if args.to is None and not args.eval:
        raise SpecError("--to: where the model goes is required (or --eval with --interpolate to evaluate the "
                        "interpolations without writing them)")
    if args.eval and alphas is None:
        raise SpecError("--eval: evaluates WiSE-FT interpolations: give --interpolate, e.g. 0,0.25,0.5,0.75,1")
    if args.to is not None:
        _check_uri(args.to, "--to")
        if is_remote(args.to):
            from ftdist.storage import s3

            s3.check_access(args.to)
    if alphas is not None and (args.eval or len(alphas) > 1):
        return _wise_ft_curve(args, alphas)
    from ftdist.train.export import export_checkpoint

    with _storage_errors(args.checkpoint, "checkpoint"):
        out = export_checkpoint(args.checkpoint, args.to, interpolate=alphas[0] if alphas else None,
                                base_model=args.base, merged=args.merged, max_shard_size=args.max_shard_size)
    for kind, uri in out.items():
        print(f"ftdist: exported {kind}: {uri}")
    return 0


def _wise_ft_curve(args: argparse.Namespace, alphas: list) -> int:
    """`--interpolate a,b,c [--eval]`: every interpolation written under --to/alpha_<a> and/or evaluated."""
    from ftdist.train.export import split_checkpoint_uri
    from ftdist.train.wise_ft import curve_destination, load_job, wise_ft_curve

    with _storage_errors(args.checkpoint, "checkpoint"):
        if args.eval:  # the job must have something to measure, before minutes of writing models
            spec = load_job(split_checkpoint_uri(args.checkpoint.rstrip("/"))[0])
            if not spec.evaluates:
                raise SpecError(f"--eval: job {spec.name} has nothing to evaluate: it has no data.eval, "
                                "eval.reference or eval.generate")
        curve = wise_ft_curve(args.checkpoint.rstrip("/"), alphas, dest=args.to, evaluate=args.eval,
                              base_model=args.base, max_shard_size=args.max_shard_size)
        for alpha, uri in curve.models.items():
            print(f"ftdist: exported alpha {alpha:g}: {uri}")
        if args.eval:
            print(curve.markdown())
            for name, uri in curve.write(curve_destination(args.checkpoint.rstrip("/"))).items():
                print(f"ftdist: {name}: {uri}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from ftdist.bench.command import main as bench_main

    return bench_main(args)


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray dashboard (Jobs API) address, e.g. http://head:8265 (default: RAY_API_SERVER_ADDRESS, "
                        "then RAY_ADDRESS); Ray token auth comes from RAY_AUTH_MODE/RAY_AUTH_TOKEN(_PATH)")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="extra HTTP header for the Jobs API, e.g. a proxy's auth (repeatable; never printed)")
    p.add_argument("--ca-cert", default=None, help="CA bundle to verify an https:// dashboard")
    p.add_argument("--insecure", action="store_true", help="do not verify the dashboard's TLS certificate")


def _client(args: argparse.Namespace):
    from ftdist.remote.submit import client

    return client(args.address, args.header, args.ca_cert, args.insecure)


def _cmd_submit(args: argparse.Namespace) -> int:
    from ftdist.remote import submit as sub

    c, sid = sub.submit(args.job, args.overrides, address=args.address, kind="tune" if args.tune else "train",
                        headers=args.header, ca_cert=args.ca_cert, insecure=args.insecure,
                        working_dir=args.working_dir, pip=args.pip, image=args.image, env=args.env,
                        py_modules=args.py_module)
    print(f"ftdist: submitted {sid}")
    if not args.follow:
        print(f"ftdist: follow it with `ftdist logs {sid} --follow`; status: `ftdist status {sid}`")
        return 0
    status = sub.follow(c, sid)
    print(f"ftdist: {sid} {status}")
    return sub.exit_code(status)


def _cmd_status(args: argparse.Namespace) -> int:
    from ftdist.remote import submit as sub

    j = sub.info(_client(args), args.submission_id)
    st = sub._status(j)
    msg = (j.message or "").strip().splitlines()
    print(f"{args.submission_id}: {st}" + (f" ({msg[0][:200]})" if msg else ""))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from ftdist.remote import submit as sub

    c = _client(args)
    if args.follow:
        return sub.exit_code(sub.follow(c, args.submission_id))
    sub.info(c, args.submission_id)
    sys.stdout.write(c.get_job_logs(args.submission_id))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from ftdist.remote import submit as sub

    c = _client(args)
    if sub.stop(c, args.submission_id):
        status = sub.wait(c, args.submission_id)
        print(f"ftdist: {args.submission_id} {status}")
    else:
        print(f"ftdist: {args.submission_id} had already ended ({sub._status(sub.info(c, args.submission_id))})")
    return 0


def _cmd_k8s_render(args: argparse.Namespace) -> int:
    from ftdist.remote import k8s_render as k8s
    from ftdist.remote.portability import check_portable

    spec = _spec_file(args.job, args.overrides)
    kind = "tune" if args.tune else "train"
    if kind == "tune":
        validate_sweep(spec, args.job)
    notes = check_portable(args.job, spec, args.overrides)
    rj = k8s.render(spec, cluster=args.cluster, kind=kind)
    k = spec.kubernetes
    if args.cluster == "existing" and k is not None and (k.secret_env or k.secret_env_from):
        notes.append(f"kubernetes.secret_env: with --cluster existing the RayCluster {k.ray_cluster}'s own pods must "
                     f"carry these variables (its pod templates), this RayJob cannot add them")
    for n in notes:
        print(f"ftdist: note: {n}", file=sys.stderr)
    if args.apply:
        from ftdist.remote.k8s_apply import apply

        return apply(rj, wait=args.wait, context=args.context, kubeconfig=args.kubeconfig, poll_s=args.poll)
    sys.stdout.write(k8s.to_yaml(rj))
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    from ftdist.remote import submit as sub

    rows = list(sub.rows(sub._list(_client(args)), args.name))
    cols = ["submission", "job", "kind", "attempt", "status", "started", "ended", "message"]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    for r in [cols, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftdist", description="Fine-tune LLMs with Ray Train + DeepSpeed ZeRO.")
    sub = p.add_subparsers(dest="cmd", required=True)

    v = sub.add_parser("validate", help="check a job file (fast: no torch, no Ray)")
    _add_job_args(v)
    v.add_argument("--no-local-check", action="store_true",
                   help="do not require the job's data/model paths on this machine (a cluster job's /mnt/... paths); "
                        "missing ones are listed as notes")
    v.set_defaults(fn=_cmd_validate)

    pl = sub.add_parser("plan", help="memory per GPU and node, speed, GPU-hours and cost of a job (and its sweep) "
                                     "before it runs; exit 1 when it does not fit (no torch, no GPU)")
    _add_job_args(pl)
    pl.add_argument("--gpu", default=None, metavar="TYPE",
                    help="GPU type: H100-80GB, H200-141GB, A100-80GB, A100-40GB, L40S-48GB, A10G-24GB, L4-24GB "
                         "(default: the job's resources.accelerator_type, else H100-80GB)")
    pl.add_argument("--gpus", type=int, default=None, help="data-parallel GPUs (default: resources.num_workers)")
    pl.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, for host memory (default 8)")
    pl.add_argument("--price-per-gpu-hour", type=float, default=None, metavar="X", help="money per GPU-hour")
    pl.add_argument("--rows", type=int, default=None,
                    help="training examples, for optim.epochs when data.train is not a local JSONL file")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(fn=_cmd_plan)

    t = sub.add_parser("train", help="run a job with Ray Train + DeepSpeed")
    _add_job_args(t, inline=True)
    t.add_argument("--address", default=None,
                   help="join this Ray cluster (default: RAY_ADDRESS, else start an embedded local Ray)")
    t.add_argument("--dashboard", action="store_true",
                   help="embedded Ray: start Ray's dashboard on 127.0.0.1 and print its URL (off by default: its "
                        "processes take CPU from the workers)")
    t.set_defaults(fn=_cmd_train)

    dt = sub.add_parser("data", help="the job's data: tokenise it once ahead of training")
    dsub = dt.add_subparsers(dest="data_cmd", required=True)
    dp = dsub.add_parser("prepare", help="tokenise the job's data into its prepared entry in storage (data.cache) "
                                         "and print its statistics; `train`, `tune` and resumes reuse it")
    _add_job_args(dp)
    dp.add_argument("--address", default=None,
                    help="tokenise as Ray tasks on this cluster (default: RAY_ADDRESS, else local processes)")
    dp.add_argument("--processes", type=int, default=None,
                    help="local processes without a cluster (default: one per core)")
    dp.add_argument("--chunk-rows", type=int, default=None, help="rows per task and per part (default 20000)")
    dp.add_argument("--force", action="store_true", help="build it again even if it is already prepared")
    dp.set_defaults(fn=_cmd_data_prepare)

    pf = sub.add_parser("preflight", help="check on the cluster that it can run the job: resources, versions, "
                                          "storage from every node, /dev/shm, disk, memory, a collective and one "
                                          "training step (exit 2 with the fix when a check fails)")
    _add_job_args(pf, inline=True)
    pf.add_argument("--address", default=None,
                    help="the Ray cluster to check (default: RAY_ADDRESS, else an embedded local Ray)")
    pf.add_argument("--skip", action="append", default=[], choices=("collective", "step"),
                    help="leave out a slow check (repeatable): the collective, or the training step")
    pf.add_argument("--timeout", type=float, default=120.0, metavar="S",
                    help="seconds each check may take before its node is reported (default 120)")
    pf.add_argument("--json", action="store_true", help="print the checklist as JSON")
    pf.set_defaults(fn=_cmd_preflight)

    tu = sub.add_parser("tune", help="hyperparameter sweep (the job's sweep: section) with Ray Tune")
    _add_job_args(tu, inline=True)
    tu.add_argument("--address", default=None,
                    help="join this Ray cluster (default: RAY_ADDRESS, else start an embedded local Ray)")
    tu.add_argument("--resume", action="store_true",
                    help="finish an interrupted sweep of the same name (completed trials are not rerun)")
    tu.set_defaults(fn=_cmd_tune)

    sr = sub.add_parser("sweep-report", help="rebuild a sweep's results table, CSV/Markdown and plot from storage")
    sr.add_argument("sweep_uri", help="<checkpoint.storage>/<sweep name>, local or s3://")
    sr.set_defaults(fn=_cmd_sweep_report)

    rr = sub.add_parser("report", help="rebuild a run's report (metrics CSV, curves, held-out and forgetting table, "
                                       "time spent) from its latest checkpoint in storage")
    rr.add_argument("run_uri", help="<checkpoint.storage>/<job name>, local or s3://")
    rr.set_defaults(fn=_cmd_report)

    c = sub.add_parser("checkpoints", help="list a job's committed checkpoints; verify one")
    c.add_argument("job_uri", help="<checkpoint.storage>/<job name>, local or s3://")
    c.add_argument("--verify", nargs="?", const="latest", default=None, metavar="NAME",
                   help="verify a checkpoint (default: the latest): every file present with its size and hash (BLAKE3)")
    c.add_argument("--shallow", action="store_true", help="with --verify: check sizes only (no download)")
    c.add_argument("--all", action="store_true", help="also list uncommitted (incomplete) checkpoint folders")
    c.set_defaults(fn=_cmd_checkpoints)

    e = sub.add_parser("export", help="write a Hugging Face model folder (safetensors) from a checkpoint")
    e.add_argument("checkpoint", help="checkpoint URI: <storage>/<job>/step_NNNNNNNN (see `ftdist checkpoints`)")
    e.add_argument("--to", default=None, help="destination folder or s3:// prefix")
    e.add_argument("--interpolate", default=None, metavar="ALPHA[,ALPHA...]",
                   help="WiSE-FT: write (1-ALPHA)*base + ALPHA*fine-tuned weights (0 = base, 1 = fine-tuned); "
                        "several alphas write --to/alpha_<ALPHA> each")
    e.add_argument("--eval", action="store_true",
                   help="with --interpolate: evaluate each interpolation as the job evaluates (task metrics, "
                        "reference-set loss, generation) and write the curve (table, plot) into the run's report/")
    e.add_argument("--base", default=None, help="base model for --interpolate (default: the job's model)")
    e.add_argument("--merged", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA: also write the merged model (default: the job's lora.merge_on_export)")
    e.add_argument("--max-shard-size", default=None,
                   help="largest safetensors shard, e.g. 5GB or 4GiB (default: the job's export.max_shard_size)")
    e.set_defaults(fn=_cmd_export)

    su = sub.add_parser("submit", help="run a job on a remote Ray cluster through the Ray Jobs API")
    _add_job_args(su)
    _add_cluster_args(su)
    su.add_argument("--tune", action="store_true", help="run `ftdist tune` (the job's sweep) instead of train")
    su.add_argument("--follow", action="store_true", help="stream the logs until the job ends; exit 0 on success")
    su.add_argument("--working-dir", default=None,
                    help="folder shipped to the cluster (default: the job file's folder; must contain the job file)")
    su.add_argument("--pip", action="append", default=None, metavar="REQ",
                    help="pip requirement installed for the job on the cluster (repeatable), e.g. ftdist==0.1.0")
    su.add_argument("--py-module", action="append", default=None, metavar="PATH",
                    help="local package folder or wheel shipped to every node (repeatable), e.g. ./ftdist")
    su.add_argument("--image", default=None, help="container image for the job's processes (Ray image_uri)")
    su.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="non-secret environment variable for the job (repeatable); secrets stay on the cluster")
    su.set_defaults(fn=_cmd_submit)

    st = sub.add_parser("status", help="status of a submitted job")
    st.add_argument("submission_id")
    _add_cluster_args(st)
    st.set_defaults(fn=_cmd_status)

    lo = sub.add_parser("logs", help="logs of a submitted job")
    lo.add_argument("submission_id")
    lo.add_argument("--follow", action="store_true", help="stream until the job ends")
    _add_cluster_args(lo)
    lo.set_defaults(fn=_cmd_logs)

    sp = sub.add_parser("stop", help="stop a submitted job")
    sp.add_argument("submission_id")
    _add_cluster_args(sp)
    sp.set_defaults(fn=_cmd_stop)

    jb = sub.add_parser("jobs", help="list ftdist jobs on a cluster (every attempt)")
    jb.add_argument("--name", default=None, help="only this job name")
    _add_cluster_args(jb)
    jb.set_defaults(fn=_cmd_jobs)

    k = sub.add_parser("k8s", help="Kubernetes (KubeRay) manifests for a job")
    ksub = k.add_subparsers(dest="k8s_cmd", required=True)
    kr = ksub.add_parser("render", help="print a KubeRay RayJob that runs the job (or create it with --apply)")
    _add_job_args(kr)
    kr.add_argument("--cluster", choices=["ephemeral", "existing"], default="ephemeral",
                    help="ephemeral: the RayJob brings its own RayCluster, deleted after the job; existing: run on "
                         "the RayCluster named by kubernetes.ray_cluster")
    kr.add_argument("--tune", action="store_true", help="run `ftdist tune` (the job's sweep) instead of train")
    kr.add_argument("--apply", action="store_true", help="create the RayJob through the Kubernetes API")
    kr.add_argument("--wait", action="store_true", help="with --apply: poll until the job ends; exit 0 on success")
    kr.add_argument("--kubeconfig", default=None, help="with --apply: kubeconfig file (default: KUBECONFIG, "
                                                       "~/.kube/config, else the pod's in-cluster identity)")
    kr.add_argument("--context", default=None, help="with --apply: kubeconfig context (default: the current one)")
    kr.add_argument("--poll", type=float, default=5.0, metavar="SECONDS", help="with --wait: status poll interval")
    kr.set_defaults(fn=_cmd_k8s_render)

    b = sub.add_parser("bench", help="benchmark ftdist against a bare DeepSpeed loop; prints a table")
    b.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    b.add_argument("--only", choices=["throughput", "memory", "load", "checkpoint", "tune", "gpu", "peak", "dpo",
                                      "tracking", "generate", "data", "resize", "elastic", "gpu-8b"],
                   action="append", help="run only these parts (repeatable)")
    b.add_argument("--rounds", type=int, default=2,
                   help="throughput: how many times ftdist and the bare loop take turns (the ratio is of the means)")
    b.add_argument("--gpu-variants", default="eager,liger",
                   help="gpu: comma-separated model variants to measure (eager, compile, liger)")
    b.add_argument("--gpu-global-batch", type=int, default=32,
                   help="gpu: sequences per optimizer step (micro batch 8, the rest by gradient accumulation)")
    b.add_argument("--ckpt-mb", type=int, default=256, help="checkpoint: MiB per rank of the benchmark checkpoint")
    b.add_argument("--s3-bucket", default=None,
                   help="checkpoint: use this existing bucket at AWS_ENDPOINT_URL (default: start a local SeaweedFS)")
    b.add_argument("--data-rows", type=int, default=200_000, help="data: rows of the generated data set")
    b.add_argument("--json", default=None, help="also write the table rows to this file")
    b.set_defaults(fn=_cmd_bench)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as e:
        # One line, and never a secret: messages name keys, not values, and `redact` is the last guard.
        print(f"ftdist: error: {redact(' '.join(str(e).split()))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ftdist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
