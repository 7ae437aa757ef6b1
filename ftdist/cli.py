"""The `ftdist` command: parse argv, load the job file, hand off. No logic here, and no torch/ray at import time."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator, Optional

from ftdist.errors import SpecError


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a job-file key (repeatable), e.g. --set optim.lr=2e-5")


def _cmd_validate(args: argparse.Namespace) -> int:
    from ftdist.config import check_local_inputs, load_spec

    spec = load_spec(args.job, args.overrides)
    check_local_inputs(spec)
    print(f"{args.job}: ok ({spec.name}: method {spec.method}, ZeRO-{spec.zero.stage}, "
          f"{spec.resources.num_workers} workers, grad accum {spec.grad_accum})")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ftdist.config import check_local_inputs, load_spec

    spec = load_spec(args.job, args.overrides)
    check_local_inputs(spec)
    from ftdist.driver import preflight_data, preflight_storage, run_training

    preflight_data(spec)
    preflight_storage(spec)
    summary = run_training(spec, address=args.address)
    if summary.error is not None:
        print(f"ftdist: training failed: {_first_line(summary.error)}", file=sys.stderr)
        print(f"ftdist: run folder (re-run the same job to resume): {summary.run_dir}", file=sys.stderr)
        return 1
    m = summary.metrics
    shown = ", ".join(f"{k} {m[k]:.4g}" for k in ("loss", "eval_loss", "eval_perplexity") if k in m)
    print(f"ftdist: done at step {m.get('step')}: {shown}")
    print(f"ftdist: checkpoint: {summary.checkpoint}")
    if summary.export_dir:
        print(f"ftdist: exported model: {summary.export_dir}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from ftdist.config import check_local_inputs, load_spec
    from ftdist.tune import validate_sweep

    spec = load_spec(args.job, args.overrides)
    check_local_inputs(spec)
    validate_sweep(spec, args.job)
    from ftdist.driver import preflight_data, preflight_storage
    from ftdist.tune import run_sweep

    preflight_data(spec)
    preflight_storage(spec)
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
    for kind, uri in (out.exported or {}).items():
        print(f"ftdist: best trial exported ({kind}): {uri}")
    for t in out.errors:
        print(f"ftdist: trial {t.trial_id} failed: {t.error}", file=sys.stderr)


def _cmd_sweep_report(args: argparse.Namespace) -> int:
    from ftdist.tune import finish, load_saved_spec

    with _storage_errors(args.sweep_uri):
        spec = load_saved_spec(args.sweep_uri)
        out = finish(spec, retention=False, export=False)
    _print_sweep(out)
    return 0


def _first_line(e: BaseException) -> str:
    # Ray wraps the worker error; the last line of its message names the real exception.
    text = str(e).strip().splitlines()
    tail = [ln for ln in text if ln and not ln.startswith((" ", "Traceback", "["))]
    return (tail[-1] if tail else type(e).__name__)[:400]


@contextlib.contextmanager
def _storage_errors(uri: str) -> Iterator[None]:
    """Storage/checkpoint mistakes as one-line SpecErrors (exit 2)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from ftdist.storage.checkpoints import CheckpointError
    from ftdist.storage.s3 import describe_error

    try:
        yield
    except (ClientError, BotoCoreError) as e:
        raise SpecError(describe_error(e, uri)) from None
    except (CheckpointError, ValueError, FileNotFoundError, KeyError) as e:
        raise SpecError(str(e).strip("'\"")) from None


def _cmd_checkpoints(args: argparse.Namespace) -> int:
    from ftdist.storage.checkpoints import CheckpointStore

    with _storage_errors(args.job_uri):
        cs = CheckpointStore(args.job_uri)
        found = cs.checkpoints(committed_only=not args.all)
        if not found:
            print(f"{args.job_uri}: no committed checkpoints")
            return 1 if args.verify else 0
        keys = ("loss", "eval_loss")
        print(f"{'checkpoint':<16} {'step':>8} {'workers':>7} {'zero':>4} {'method':<6} {'size':>10}  metrics")
        for c in found:
            m = c.manifest or {}
            shown = " ".join(f"{k}={m['metrics'][k]:.4g}" for k in keys if k in m.get("metrics", {}))
            status = "" if c.committed else "  (uncommitted)"
            print(f"{c.name:<16} {c.step:>8} {m.get('world_size', '-'):>7} {m.get('zero_stage', '-'):>4} "
                  f"{m.get('method', '-'):<6} {_human(c.size):>10}  {shown}{status}")
        if args.verify:
            name = found[-1].name if args.verify == "latest" else args.verify
            problems = cs.problems(name, deep=not args.shallow)
            what = "sizes" if args.shallow else "sizes and SHA-256"
            if problems:
                for p in problems:
                    print(f"{name}: {p}", file=sys.stderr)
                return 1
            print(f"{name}: verified ({what} of {len(cs.read_manifest(name)['files'])} files)")
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _cmd_export(args: argparse.Namespace) -> int:
    from ftdist.export import export_checkpoint

    if args.interpolate is not None and not 0.0 <= args.interpolate <= 1.0:
        raise SpecError(f"--interpolate {args.interpolate}: alpha must be between 0 (base) and 1 (fine-tuned)")
    with _storage_errors(args.checkpoint):
        out = export_checkpoint(args.checkpoint, args.to, interpolate=args.interpolate, base_model=args.base,
                                merged=args.merged, max_shard_size=args.max_shard_size)
    for kind, uri in out.items():
        print(f"ftdist: exported {kind}: {uri}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from ftdist.bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftdist", description="Fine-tune LLMs with Ray Train + DeepSpeed ZeRO.")
    sub = p.add_subparsers(dest="cmd", required=True)

    v = sub.add_parser("validate", help="check a job file (fast: no torch, no Ray)")
    _add_job_args(v)
    v.set_defaults(fn=_cmd_validate)

    t = sub.add_parser("train", help="run a job with Ray Train + DeepSpeed")
    _add_job_args(t)
    t.add_argument("--address", default=None,
                   help="join this Ray cluster (default: RAY_ADDRESS, else start an embedded local Ray)")
    t.set_defaults(fn=_cmd_train)

    tu = sub.add_parser("tune", help="hyperparameter sweep (the job's sweep: section) with Ray Tune")
    _add_job_args(tu)
    tu.add_argument("--address", default=None,
                    help="join this Ray cluster (default: RAY_ADDRESS, else start an embedded local Ray)")
    tu.add_argument("--resume", action="store_true",
                    help="finish an interrupted sweep of the same name (completed trials are not rerun)")
    tu.set_defaults(fn=_cmd_tune)

    sr = sub.add_parser("sweep-report", help="rebuild a sweep's results table, CSV/Markdown and plot from storage")
    sr.add_argument("sweep_uri", help="<checkpoint.storage>/<sweep name>, local or s3://")
    sr.set_defaults(fn=_cmd_sweep_report)

    c = sub.add_parser("checkpoints", help="list a job's committed checkpoints; verify one")
    c.add_argument("job_uri", help="<checkpoint.storage>/<job name>, local or s3://")
    c.add_argument("--verify", nargs="?", const="latest", default=None, metavar="NAME",
                   help="verify a checkpoint (default: the latest): every file present with its size and SHA-256")
    c.add_argument("--shallow", action="store_true", help="with --verify: check sizes only (no download)")
    c.add_argument("--all", action="store_true", help="also list uncommitted (incomplete) checkpoint folders")
    c.set_defaults(fn=_cmd_checkpoints)

    e = sub.add_parser("export", help="write a Hugging Face model folder (safetensors) from a checkpoint")
    e.add_argument("checkpoint", help="checkpoint URI: <storage>/<job>/step_NNNNNNNN (see `ftdist checkpoints`)")
    e.add_argument("--to", required=True, help="destination folder or s3:// prefix")
    e.add_argument("--interpolate", type=float, default=None, metavar="ALPHA",
                   help="WiSE-FT: write (1-ALPHA)*base + ALPHA*fine-tuned weights (0 = base, 1 = fine-tuned)")
    e.add_argument("--base", default=None, help="base model for --interpolate (default: the job's model)")
    e.add_argument("--merged", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA: also write the merged model (default: the job's lora.merge_on_export)")
    e.add_argument("--max-shard-size", default="5GB")
    e.set_defaults(fn=_cmd_export)

    b = sub.add_parser("bench", help="benchmark ftdist against a bare DeepSpeed loop; prints a table")
    b.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    b.add_argument("--only", choices=["throughput", "memory", "load", "checkpoint", "gpu"], action="append",
                   help="run only these parts (repeatable)")
    b.add_argument("--ckpt-mb", type=int, default=256, help="checkpoint: MiB per rank of the benchmark checkpoint")
    b.add_argument("--s3-bucket", default=None,
                   help="checkpoint: use this existing bucket at AWS_ENDPOINT_URL (default: start a local SeaweedFS)")
    b.add_argument("--json", default=None, help="also write the table rows to this file")
    b.set_defaults(fn=_cmd_bench)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as e:
        print(f"ftdist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ftdist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
