"""What knowing a run costs: tracking on against off (a real MLflow server and TensorBoard event files, the same
job, the two taking turns), and generation metrics batched against one prompt at a time."""

from __future__ import annotations

import os
import statistics
import time

import torch

from ftdist.bench.common import BENCH_LLAMA, bench_spec, task
from ftdist.bench.local_mlflow import new_password, start_mlflow
from ftdist.environ import temporary_environ
from ftdist.spec import with_overrides
from ftdist.train.driver import run_training
from ftdist.train.obs.tracking import check_tracking, finish_tracking, open_mlflow_run, plan_tracking
from ftdist.train.generation import greedy_generate, load_prompts
from ftdist.train.locations import load_tokenizer
from ftdist.train.ray_runtime import connect_ray, disconnect_ray


def bench_tracking(tmp: str, steps: int, rounds: int, workers: int = 2, auth: bool = True) -> dict:
    """Wall time of a whole `run_training` (logging every step: the most rows a job can send) with MLflow +
    TensorBoard on and off, alternating; the ratio of the means. One embedded Ray serves every run, so Ray's start
    is in neither. `workers` below the cores leaves one for the tracking thread and Ray's own processes. `auth`:
    the server checks a password on every request (MLflow's basic-auth app hashes it each time: about 1 s of this
    machine's CPU per request, beside the training); without it, what remains is ftdist's own cost."""
    server = start_mlflow(new_password() if auth else None)
    credentials = {k: v for k, v in server.env().items() if k != "MLFLOW_TRACKING_URI"}
    try:
        with temporary_environ(credentials):  # before Ray starts: its workers inherit them
            started = connect_ray(None, 3)
            try:
                walls, loops = _alternating_runs(server.uri, os.path.join(tmp, f"tracking-{workers}-{auth}"), steps,
                                                 rounds, workers)
            finally:
                disconnect_ray(started)
            critical = critical_path_seconds(server.uri, os.path.join(tmp, f"tracking-{workers}-{auth}"))
    finally:
        server.stop()
    on, off = statistics.mean(walls["on"]), statistics.mean(walls["off"])
    loop_on, loop_off = statistics.mean(loops["on"]), statistics.mean(loops["off"])
    return {"on": on, "off": off, "ratio": on / off, "loop_on": loop_on, "loop_off": loop_off, "critical": critical,
            "loop_ratio": loop_on / loop_off, "round_ratios": [a / b for a, b in zip(walls["on"], walls["off"])]}


def _alternating_runs(uri: str, tmp: str, steps: int, rounds: int, workers: int) -> tuple[dict, dict]:
    """({on, off}: wall seconds per run, {on, off}: step-loop seconds per run), the modes taking turns. The timed
    part of a tracked run includes `ftdist train`'s check of the server (which the command overlaps with tokenising
    the data, and this does not)."""
    walls: dict[str, list[float]] = {"on": [], "off": []}
    loops: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(rounds):
        for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
            spec = bench_spec(os.path.join(tmp, f"{mode}-{i}"), steps, log_every=1, workers=workers)
            tracking = {"mlflow": {"tracking_uri": uri, "experiment": "bench"}, "tensorboard": True}
            # With the export, as the quickstart runs (the report's upload overlaps it).
            spec = with_overrides(spec, {"tracking": tracking if mode == "on" else {"tensorboard": False},
                                         "export.enabled": True})
            t0 = time.perf_counter()
            check_tracking(spec)
            s = run_training(spec)
            if s.error:
                raise RuntimeError(s.error)
            walls[mode].append(time.perf_counter() - t0)
            loops[mode].append(s.history[-1]["train_time_s"])
    return walls, loops


def critical_path_seconds(uri: str, tmp: str, rows: int = 16) -> dict:
    """ftdist's own cost, without the noise of whole runs: the tracking requests a run cannot overlap with other
    work, timed against the server one after another as a run makes them: the check before Ray, rank 0's last
    flush (5 s of rows logged every step), and the close (tags beside outputs.json, then the status)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    spec = with_overrides(bench_spec(os.path.join(tmp, "critical"), 1),
                          {"tracking": {"mlflow": {"tracking_uri": uri, "experiment": "bench"}}})
    t0 = time.perf_counter()
    check_tracking(spec)
    check = time.perf_counter() - t0
    target = plan_tracking(spec, attempt=1)
    run_id, _ = open_mlflow_run(target, spec.run_dir)  # off the path: rank 0's thread, during start-up
    now = int(time.time() * 1000)
    batch = [Metric(k, 1.0, now, step) for step in range(rows) for k in ("loss", "lr", "grad_norm", "tokens_per_s",
                                                                        "step_time_s", "epoch", "train_time_s")]
    t0 = time.perf_counter()
    MlflowClient(uri).log_batch(run_id, metrics=batch)
    flush = time.perf_counter() - t0
    t0 = time.perf_counter()
    warning = finish_tracking(target, spec.run_dir, failed=False, outputs={"checkpoint_uri": "/x", "export_uri": "/y"})
    close = time.perf_counter() - t0
    if warning:
        raise RuntimeError(warning)
    return {"check": check, "flush": flush, "close": close, "total": check + flush + close}


def bench_generation(prompts: int = 100, batch: int = 16, max_new_tokens: int = 24) -> dict:
    """Seconds per `prompts` held-out prompts of greedy decoding on the benchmark model: in batches of `batch`
    (as eval.generate runs) and one prompt at a time. The model is random, so every prompt runs the full
    max_new_tokens on both sides."""
    from transformers import AutoConfig, AutoModelForCausalLM

    files = task()
    spec = with_overrides(bench_spec("/tmp/unused", 1), {"data.eval": files.eval,
                                                        "eval.generate": {"max_prompts": prompts}})
    tok = load_tokenizer(files.tokenizer, False)
    rows = [p.ids for p in load_prompts(spec, tok)]
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**BENCH_LLAMA)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    # No EOS, no early stop: the same work per prompt either way.
    run = lambda ids: greedy_generate(model, ids, tok.pad_token_id, None, max_new_tokens)  # noqa: E731
    with torch.no_grad():
        run(rows[:batch])  # warm-up
        t0 = time.perf_counter()
        batched = [out for i in range(0, len(rows), batch) for out in run(rows[i:i + batch])]
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = [run([ids])[0] for ids in rows]
        t_single = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(batched, single))
    return {"batched_s": t_batched * 100 / len(rows), "single_s": t_single * 100 / len(rows),
            "ratio": t_batched / t_single, "same": same, "n": len(rows), "batch": batch, "tokens": max_new_tokens}
