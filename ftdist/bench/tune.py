"""`ftdist bench --only tune`: the sweep benchmarks, side by side in one run on the quickstart sweep's tiny LoRA model
(its own copy of jobs/quickstart-sweep.yaml on the bench task, 2 DeepSpeed workers per trial, embedded local Ray).

1. early stopping: the same lr x LoRA-rank grid run twice through `ftdist tune`, once with FIFO (every trial to the
   end) and once with ASHA. Reports optimizer steps run (ASHA / full grid), sweep wall time, and whether ASHA's best
   configuration is the full grid's best (the metric is deterministic per configuration: fixed seeds).
2. per-trial overhead: seconds from trial start (the Tune trainable's first line) to the end of the first optimizer
   step, for an ftdist trial and for a bare Ray Tune function trial that runs a TorchTrainer doing the same DeepSpeed
   work (same model, LoRA, data, DeepSpeed dict) with no ftdist in between. Median over the trials of each sweep;
   the ftdist workers' own breakdown (Ray worker group, imports, data, model, DeepSpeed, first step) says where the
   time goes.
"""

from __future__ import annotations

import os
import statistics
import time

import deepspeed
import ray.train
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from ray import tune
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from transformers import AutoConfig, AutoModelForCausalLM

from ftdist.bench.common import BENCH_LLAMA, batches, task
from ftdist.spec import JobSpec, spec_from_dict, with_overrides
from ftdist.spec.load import parse_override
from ftdist.sweep.tune import run_sweep
from ftdist.train.ds_config import to_deepspeed
from ftdist.train.ray_runtime import connect_ray, disconnect_ray


# Early-stopping sweep: 8 configurations, 48 steps each, eval (the metric) every 4 steps. ASHA with grace 4 and
# reduction factor 3 (rungs at steps 4, 12 and 36) and 4 (Ray's default; rungs at 4 and 16).
ASHA_SPACE = {"optim.lr": [3.0e-2, 1.0e-2, 3.0e-3, 1.0e-3], "lora.rank": [4, 16]}
ASHA_STEPS, ASHA_EVAL_EVERY, ASHA_GRACE, ASHA_RFS = 48, 4, 4, (3, 4)
OVERHEAD_TRIALS = [1.0e-2, 3.0e-3, 1.0e-3]


def sweep_job(storage: str, name: str) -> dict:
    """The quickstart sweep's job (jobs/quickstart-sweep.yaml) on the benchmark's own task files: a tiny LoRA Llama,
    2 DeepSpeed workers per trial, lr x LoRA-rank grid, ASHA on eval_loss."""
    files = task()
    return {
        "name": name,
        "model": {"from_config": {**BENCH_LLAMA, "hidden_size": 128, "intermediate_size": 344, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "tie_word_embeddings": True},
                  "tokenizer": files.tokenizer, "dtype": "fp32"},
        "data": {"train": files.train, "eval": files.eval, "format": "prompt_completion", "max_length": 48},
        "method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "optim": {"lr": 1e-2, "weight_decay": 0.01, "schedule": "cosine", "warmup_steps": 5, "micro_batch_size": 16,
                  "global_batch_size": 64, "max_steps": 60, "seed": 7},
        "resources": {"num_workers": 2, "cpus_per_worker": 1},
        "checkpoint": {"storage": storage, "every_n_steps": 30, "keep_last": 2},
        "eval": {"every_n_steps": 10, "max_batches": 8},
        "logging": {"every_n_steps": 10},
        "sweep": {"search": "grid", "space": {"optim.lr": [3e-2, 1e-2, 1e-3], "lora.rank": [4, 16]},
                  "alpha_per_rank": 2.0, "metric": "eval_loss", "mode": "min",
                  "scheduler": {"type": "asha", "grace_period": 20, "reduction_factor": 2},
                  "keep_best_trials": 100, "export_best": False},
    }

def _spec(storage: str, name: str, sets: list[str]) -> JobSpec:
    return with_overrides(spec_from_dict(sweep_job(storage, name), "bench sweep"),
                          {".".join(keys): value for keys, value in map(parse_override, sets)})

def asha_spec(storage: str, name: str, rf: int | None):
    sched = f"{{type: asha, grace_period: {ASHA_GRACE}, reduction_factor: {rf}}}" if rf else "{type: fifo}"
    space = "{" + ", ".join(f"{k}: {v}" for k, v in ASHA_SPACE.items()) + "}"
    return _spec(storage, name, [
        f"sweep.space={space}", f"sweep.scheduler={sched}", f"optim.max_steps={ASHA_STEPS}",
        "optim.global_batch_size=32", "optim.warmup_steps=2", f"eval.every_n_steps={ASHA_EVAL_EVERY}",
        "eval.max_batches=4", f"logging.every_n_steps={ASHA_EVAL_EVERY}", "checkpoint.every_n_steps=null",
    ])

def _sweep(spec) -> dict:

    t0 = time.perf_counter()
    summary = run_sweep(spec)
    wall = time.perf_counter() - t0
    report = summary.report
    if summary.errors:
        raise RuntimeError(f"sweep {spec.name}: {len(summary.errors)} trial(s) failed: {summary.errors[0].error}")
    best = report.best
    return {
        "steps": sum(t.steps for t in report.trials),
        "trials": len(report.trials),
        "early": sum(1 for t in report.trials if t.steps < spec.optim.max_steps),
        "wall": wall,
        "best": {k: v for k, v in best.params.items()},
        "best_metric": best.last(spec.sweep.metric),
        "by_config": {tuple(sorted(t.params.items())): t.last(spec.sweep.metric) for t in report.trials},
        "report": report,
    }

def bench_asha(tmp: str) -> tuple[dict, list[dict]]:
    grid = _sweep(asha_spec(os.path.join(tmp, "asha"), "grid-fifo", None))
    out = []
    for rf in ASHA_RFS:
        asha = _sweep(asha_spec(os.path.join(tmp, "asha"), f"grid-asha-rf{rf}", rf))
        # ASHA's best configuration, scored by where the full grid puts it (its final metric there).
        best_in_grid = grid["by_config"][tuple(sorted(asha["best"].items()))]
        out.append({**asha, "rf": rf, "same_best": asha["best"] == grid["best"], "best_in_grid": best_in_grid})
    return grid, out

# ---------------------------------------------------------------------------------------------------------------
# per-trial overhead


def overhead_spec(storage: str, name: str):
    """A short FIFO sweep whose trials log every step (the first report carries the startup breakdown); no eval
    split and no baseline eval, so both sides do the same work before the first step."""
    return _spec(storage, name, [
        f"sweep.space={{optim.lr: {OVERHEAD_TRIALS}}}", "sweep.scheduler={type: fifo}", "sweep.metric=loss",
        "optim.max_steps=2", "optim.warmup_steps=0", "data.eval=null", "eval.every_n_steps=null",
        "logging.every_n_steps=1", "checkpoint.every_n_steps=null",
    ])

def _bare_worker(config: dict) -> None:
    """A plain Ray Train worker: transformers model from the config, peft LoRA, DeepSpeed, one step, report."""
    t_worker = time.time()

    deepspeed.init_distributed(dist_backend=dist.get_backend())
    torch.set_num_threads(1)
    spec = spec_from_dict(config["spec"])
    ds_cfg = to_deepspeed(spec, dist.get_world_size())
    next_batch = batches(spec, ray.train.get_context().get_world_rank())
    cfg = dict(spec.model.from_config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=torch.float32)
    lo = spec.lora
    model = get_peft_model(model, LoraConfig(r=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                             target_modules=lo.target_modules, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.optim.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg, dist_init_required=False)
    for _ in range(spec.grad_accum):
        loss = engine(**next_batch()).loss
        engine.backward(loss)
        engine.step()
    loss.item()
    now = time.time()
    ray.train.report({"startup_s": now - config["t0"], "workers_s": t_worker - config["t0"]})

def _bare_trial(config: dict, spec_json: dict | None = None, storage: str = "") -> None:
    t0 = time.time()

    spec_json = {**spec_json, "optim": {**spec_json["optim"], "lr": config["optim.lr"]}}
    TorchTrainer(
        _bare_worker,
        train_loop_config={"spec": spec_json, "t0": t0},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=spec_json["resources"]["num_workers"],
                                     resources_per_worker={"CPU": spec_json["resources"]["cpus_per_worker"]}),
        run_config=RunConfig(name=f"bare-{tune.get_context().get_trial_id()}", storage_path=storage,
                             worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}},
                             callbacks=[TuneReportCallback()]),  # Ray's documented Train-in-Tune wiring
    ).fit()

def _bare_sweep(spec, storage: str) -> list[dict]:

    fn = tune.with_parameters(_bare_trial, spec_json=spec.model_dump(mode="json"), storage=storage)
    tuner = tune.Tuner(
        tune.with_resources(fn, {"cpu": 0, "memory": 2**20}),
        param_space={"optim.lr": tune.grid_search(OVERHEAD_TRIALS)},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(name="bare-overhead", storage_path=storage),
    )
    results = tuner.fit()
    errs = [r.error for r in results if r.error]
    if errs:
        raise RuntimeError(f"bare Tune trial failed: {errs[0]}")
    return [dict(r.metrics) for r in results]

def bench_overhead(tmp: str) -> dict:

    storage = os.path.join(tmp, "overhead")
    spec = overhead_spec(storage, "ftdist-overhead")
    bare = _bare_sweep(spec, storage)
    summary = run_sweep(spec)
    if summary.errors:
        raise RuntimeError(f"ftdist overhead sweep: {summary.errors[0].error}")
    rows = []
    for t in summary.report.trials:
        first = next((r for r in t.rows if r.get("startup/s") is not None), None)
        if first is None:
            raise RuntimeError(f"trial {t.trial_id}: no startup breakdown reported")
        rows.append({k[len("startup/"):]: v for k, v in first.items() if k.startswith("startup/")})
    phases = [k for k in rows[0] if k != "s"]
    ftdist_s = statistics.median(r["s"] for r in rows)
    bare_s = statistics.median(b["startup_s"] for b in bare)
    return {
        "ftdist_s": ftdist_s,
        "bare_s": bare_s,
        "ratio": ftdist_s / bare_s,
        "bare_workers_s": statistics.median(b["workers_s"] for b in bare),
        "phases": {p: statistics.median(r.get(p, 0.0) for r in rows) for p in phases},
        "n": len(rows),
    }

def run(lines: list[str], tmp: str) -> None:

    # One embedded Ray for every sweep here (each sweep joins it), so no side pays a cluster start.
    started = connect_ray(None, 3)
    try:
        _run(lines, tmp)
    finally:
        disconnect_ray(started)

def _run(lines: list[str], tmp: str) -> None:
    o = bench_overhead(tmp)
    breakdown = ", ".join(f"{k} {v:.1f}" for k, v in o["phases"].items())
    lines.append(f"| sweep: trial start to end of first optimizer step (median of {o['n']}; ftdist: {breakdown} s) | "
                 f"{o['ftdist_s']:.1f} s | {o['bare_s']:.1f} s (bare Tune function trial + TorchTrainer; worker "
                 f"group {o['bare_workers_s']:.1f} s) | {o['ratio']:.3f} | <= 1.2 |")
    g, runs = bench_asha(tmp)
    metric = runs[0]["report"].spec.sweep.metric

    def cfg(d: dict) -> str:
        return ", ".join(f"{k.split('.')[-1]} {v:g}" for k, v in sorted(d.items()))

    for s in runs:
        what = f"ASHA grace {ASHA_GRACE}, rf {s['rf']}"
        lines.append(f"| sweep: optimizer steps run, {g['trials']} trials x {ASHA_STEPS} steps ({what}; {s['early']} "
                     f"stopped early) | {s['steps']} (ASHA) | {g['steps']} (full grid, FIFO) | "
                     f"{s['steps'] / g['steps']:.3f} | <= 0.5 |")
        lines.append(f"| sweep: wall time ({what}) | {s['wall']:.0f} s (ASHA) | {g['wall']:.0f} s (full grid) | "
                     f"{s['wall'] / g['wall']:.3f} | |")
        verdict = "same" if s["same_best"] else f"differs; {metric} {s['best_in_grid']:.4g} in the full grid"
        lines.append(f"| sweep: best configuration ({what}) | {cfg(s['best'])} ({metric} {s['best_metric']:.4g}) | "
                     f"{cfg(g['best'])} ({metric} {g['best_metric']:.4g}) | {verdict} | same |")
