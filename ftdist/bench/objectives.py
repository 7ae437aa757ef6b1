"""`ftdist bench --only dpo`: what preference tuning costs against SFT on the same sequences (2 gloo ranks, the
bench's Llama, ZeRO-2). SFT trains on every pair's chosen and rejected completions as prompt + completion rows,
twice the micro batch, so both objectives push the same tokens through the model per step:
- full fine-tuning, DPO with the precomputed reference / SFT: training tokens/s, and peak resident memory per rank
  during the timed steps (DPO keeps no second model); the one-off reference pass / one training epoch;
- LoRA, DPO with the adapters-off reference (one extra no-grad forward per batch) / LoRA SFT: tokens/s.
Each setting runs in its own two processes (nothing one leaves behind counts in the next)."""

from __future__ import annotations

import gc
import os
import statistics
import time

from ftdist.bench.common import WORLD, bench_spec, engine_for, spawn, task
from ftdist.bench.peak import freed_memory_leaves_process, proc_status, reset_peak_rss
from ftdist.spec import JobSpec, spec_from_dict, with_overrides
from ftdist.train.sampling import ShardedLoader
from ftdist.train.locations import load_tokenizer
from ftdist.train.objectives import objective_for, splits_for
from ftdist.train.objectives.reference import score, set_references

MICRO_PAIRS = 8


def dpo_spec(storage: str, steps: int, objective: str, method: str) -> JobSpec:
    files = task()
    base = bench_spec(storage, steps)
    if objective == "dpo":
        over = {"objective": "dpo", "data.train": files.pairs, "optim.micro_batch_size": MICRO_PAIRS,
                "optim.global_batch_size": MICRO_PAIRS * WORLD * 2}
    else:
        over = {"data.train": files.pair_sequences, "optim.micro_batch_size": 2 * MICRO_PAIRS,
                "optim.global_batch_size": 2 * MICRO_PAIRS * WORLD * 2}
    if method == "lora":
        over["method"] = "lora"
    return with_overrides(base, {**over, "data.shuffle": False})  # in file order: SFT's rows are the pairs' sides


def _run(rank: int, spec_json: dict, warmup: int, steps: int) -> dict:
    spec = spec_from_dict(spec_json)
    objective = objective_for(spec)
    tok = load_tokenizer(spec.model.tokenizer_path)
    splits = splits_for(spec, tok)
    gc.collect()
    base = proc_status("VmRSS")
    spec, engine = engine_for(spec_json)

    def to_device(batch):
        return {k: v.to(engine.device) for k, v in objective.collate(batch, tok.pad_token_id).items()}

    loader = ShardedLoader.for_job(spec, [splits.train], rank, WORLD)
    reference_s = 0.0
    if objective.precomputes_reference:
        t0 = time.perf_counter()
        refs = score(objective, engine, splits.train, spec.optim.micro_batch_size, rank, WORLD, to_device)
        reference_s = time.perf_counter() - t0
        set_references(splits.train, refs.tolist())
    it = loader.micro_batches(0)
    tokens, t0 = 0, 0.0
    for step in range(warmup + steps):
        if step == warmup:
            reset_peak_rss()
            t0, tokens = time.perf_counter(), 0
        for _ in range(spec.grad_accum):
            b = to_device(next(it))
            tokens += int(objective.tokens(b))
            loss, _ = objective.forward(engine, b)
            engine.backward(loss)
            engine.step()
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "peak": proc_status("VmHWM") - base, "reference_s": reference_s,
            "epoch_s": seconds / steps * loader.steps_per_epoch}


def bench_dpo(tmp: str, steps: int = 20, rounds: int = 2, warmup: int = 3) -> dict:
    """{(method, objective): means over `rounds` in which SFT and DPO take turns (one pair of runs swings by 10-15%
    on a small shared machine), plus each round's DPO / SFT tokens/s under "round_ratios"."""
    runs: dict = {}
    with freed_memory_leaves_process():
        for method in ("full", "lora"):
            for i in range(rounds):
                for objective in ("sft", "dpo"):
                    spec = dpo_spec(os.path.join(tmp, f"dpo-{method}-{objective}-{i}"), warmup + steps, objective,
                                    method)
                    ranks = spawn(_run, spec.model_dump(mode="json"), warmup, steps)
                    runs.setdefault((method, objective), []).append({
                        "tps": sum(r["tokens"] for r in ranks) / max(r["seconds"] for r in ranks),
                        "peak": max(r["peak"] for r in ranks), "reference_s": max(r["reference_s"] for r in ranks),
                        "epoch_s": max(r["epoch_s"] for r in ranks)})
    out: dict = {key: {k: statistics.mean(r[k] for r in rs) for k in rs[0]} for key, rs in runs.items()}
    out["round_ratios"] = {m: [d["tps"] / s["tps"] for s, d in zip(runs[(m, "sft")], runs[(m, "dpo")])]
                           for m in ("full", "lora")}
    return out
