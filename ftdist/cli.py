"""The `ftdist` command: parse argv, load the job file, hand off. No logic here, and no torch/ray at import time."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

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


def _first_line(e: BaseException) -> str:
    # Ray wraps the worker error; the last line of its message names the real exception.
    text = str(e).strip().splitlines()
    tail = [ln for ln in text if ln and not ln.startswith((" ", "Traceback", "["))]
    return (tail[-1] if tail else type(e).__name__)[:400]


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

    b = sub.add_parser("bench", help="benchmark ftdist against a bare DeepSpeed loop; prints a table")
    b.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    b.add_argument("--only", choices=["throughput", "memory", "load"], action="append",
                   help="run only these parts (repeatable)")
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
