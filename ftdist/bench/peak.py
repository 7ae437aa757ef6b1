"""`ftdist bench --only peak`: the planner's per-rank memory against what real DeepSpeed ranks hold, on CPU.

For each setting of a grid (ZeRO 0-3, optimizer and parameter offload, full and LoRA, micro batches 1 and 4,
gradient checkpointing on and off), two gloo ranks train the benchmark Llama (at sequence 256, packed) for two
steps and measure, during the second (Adam's state exists):
- model states: bytes of parameters, gradients and optimizer states the engine holds (the `--only memory` counters);
- peak training memory: the process's peak resident memory (VmHWM, reset before the step by /proc/self/clear_refs)
  minus its resident memory before the engine was built. glibc is told to serve every allocation of 64 KiB or more
  with mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the process and resident memory is what is alive.
Predicted: `ftdist plan`'s model states and `cpu_process_bytes` (its per-GPU lines without CUDA's context and
headroom, plus offloaded states, which on a CPU run live in the same RAM; what differs on a CPU is said there).
Settings run one after another in the same two processes (each engine freed before the next, after a warm-up per ZeRO
stage), so the grid costs one start-up."""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Any, Iterator

import torch

from ftdist.bench.common import BENCH_LLAMA, WORLD, batches, bench_spec, engine_for, spawn
from ftdist.bench.training import held_model_states
from ftdist.plan.gpus import gpu
from ftdist.plan.memory import cpu_process_bytes, model_state_bytes, plan_memory
from ftdist.plan.shape import ModelShape
from ftdist.spec import JobSpec, spec_from_dict, with_overrides

SEQ = 256
PEAK_LLAMA = {**BENCH_LLAMA, "max_position_embeddings": SEQ}

GRID: list[tuple[str, dict]] = [
    ("ZeRO-0 full, micro batch 4", {"zero.stage": 0}),
    ("ZeRO-1 full, micro batch 4", {"zero.stage": 1}),
    ("ZeRO-2 full, micro batch 4", {"zero.stage": 2}),
    ("ZeRO-3 full, micro batch 4", {"zero.stage": 3}),
    ("ZeRO-2 full, micro batch 1", {"zero.stage": 2, "optim.micro_batch_size": 1}),
    ("ZeRO-0 full, micro batch 4, checkpointing", {"zero.stage": 0, "model.gradient_checkpointing": True}),
    ("ZeRO-3 full, micro batch 1, checkpointing", {"zero.stage": 3, "optim.micro_batch_size": 1,
                                                   "model.gradient_checkpointing": True}),
    ("ZeRO-2 LoRA, micro batch 4", {"zero.stage": 2, "method": "lora"}),
    ("ZeRO-3 LoRA, micro batch 1, checkpointing", {"zero.stage": 3, "method": "lora", "optim.micro_batch_size": 1,
                                                   "model.gradient_checkpointing": True}),
    ("ZeRO-2 optimizer offload, micro batch 4", {"zero.stage": 2, "zero.offload_optimizer": "cpu"}),
    ("ZeRO-3 optimizer + parameter offload, micro batch 4", {"zero.stage": 3, "zero.offload_optimizer": "cpu",
                                                             "zero.offload_params": "cpu"}),
]


def peak_spec(storage: str, overrides: dict) -> JobSpec:
    base = with_overrides(bench_spec(storage, 2), {"model.from_config": PEAK_LLAMA, "data.max_length": SEQ,
                                                   "data.packing": True, "optim.micro_batch_size": 4,
                                                   "optim.global_batch_size": 16})
    spec = with_overrides(base, overrides)
    # Two micro batches per step whatever the micro batch: memory is one micro batch's; more would only cost time.
    return with_overrides(spec, {"optim.global_batch_size": spec.optim.micro_batch_size * WORLD * 2})


def predicted(spec: JobSpec) -> dict[str, int]:
    shape = ModelShape.from_config(PEAK_LLAMA)
    plan = plan_memory(spec, shape, gpu(None), WORLD, gpus_per_node=1)
    return {"model_states": int(sum(model_state_bytes(spec, shape, WORLD).values())),
            "peak": cpu_process_bytes(plan)}


def proc_status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


@contextlib.contextmanager
def freed_memory_leaves_process() -> Iterator[None]:
    """Processes spawned inside serve every allocation of 64 KiB or more with mmap (glibc reads
    MALLOC_MMAP_THRESHOLD_ at start), so a freed tensor leaves the process and resident memory is what is alive."""
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5": reset the peak resident set size (VmHWM) to now
        fh.write("5")


def _measure(rank: int, spec_jsons: list[dict]) -> dict:
    # The first engine of a process, and again the first of each ZeRO stage, allocates what stays for the process's
    # life (thread pools, DeepSpeed's process groups and their gloo contexts: 39 MiB for the first ZeRO-1 engine after
    # a ZeRO-0 one, measured). The first setting of each stage runs once as a warm-up, its numbers dropped, so that
    # they do not count as that setting's training memory.
    first_of_stage = {}
    for spec_json in spec_jsons:
        first_of_stage.setdefault(spec_json["zero"]["stage"], spec_json)
    for spec_json in first_of_stage.values():
        _measure_one(rank, spec_json)
    return {"settings": [_measure_one(rank, spec_json) for spec_json in spec_jsons]}


def _measure_one(rank: int, spec_json: dict) -> dict:
    # ZeRO-3's zero.Init replaces F.linear for the rest of the process; each setting runs with its own.
    linear = torch.nn.functional.linear
    try:
        next_batch = batches(spec_from_dict(spec_json), rank)
        next_batch()  # tokenizer and data loaded before the baseline: they are not training memory
        gc.collect()
        base = proc_status("VmRSS")
        spec, engine = engine_for(spec_json)
        states = 0
        for step in range(2):
            if step == 1:
                reset_peak_rss()
            for _ in range(spec.grad_accum):  # DeepSpeed steps at the accumulation boundary
                engine.backward(engine(**next_batch()).loss)
                if step == 1:
                    states = max(states, held_model_states(engine)[0])
                engine.step()
        peak = proc_status("VmHWM") - base
        engine.destroy()
        del engine, next_batch
        gc.collect()
        return {"peak": peak, "model_states": states}
    finally:
        torch.nn.functional.linear = linear


def bench_peak(tmp: str) -> list[dict[str, Any]]:
    specs = [(label, peak_spec(os.path.join(tmp, "peak"), over)) for label, over in GRID]
    with freed_memory_leaves_process():
        ranks = spawn(_measure, [s.model_dump(mode="json") for _, s in specs])
    rows = []
    for i, (label, spec) in enumerate(specs):
        measured = {k: max(r["settings"][i][k] for r in ranks) for k in ("model_states", "peak")}
        pred = predicted(spec)
        rows.append({"setting": label, **{f"{k}_predicted": pred[k] for k in pred},
                     **{f"{k}_measured": measured[k] for k in measured},
                     **{f"{k}_ratio": pred[k] / measured[k] for k in pred}})
    return rows
