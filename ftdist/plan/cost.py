"""Speed, wall time, GPU-hours and money for a job and for its sweep.

Speed: tokens/s per GPU = MFU x the card's dense bf16 peak / the FLOPs a step executes per token (full fine-tuning:
the PaLM count `ftdist bench` reports MFU against; less for LoRA and frozen layers; one more forward with gradient
checkpointing). Sweeps: trials x steps, with ASHA's
share of the grid simulated from the scheduler settings (Ray Tune's asynchronous successive halving rules: rungs at
grace x rf^k, a trial stops at a rung when it is below the (1 - 1/rf) percentile of the trials recorded there
before it; trials of persistent, random quality arriving as `concurrency` slots free up).
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ftdist.plan.gpus import Gpu, Utilisation, utilisation
from ftdist.plan.memory import sequences_per_row
from ftdist.plan.shape import ModelShape
from ftdist.spec import JobSpec


@dataclass(frozen=True)
class Speed:
    flops_per_token: float
    utilisation: Utilisation
    tokens_per_s_per_gpu: float
    step_s: float


def executed_flops_per_token(spec: JobSpec, shape: ModelShape, method: str, gradient_checkpointing: bool) -> float:
    """FLOPs a training step executes per token. Full fine-tuning: forward F, backward 2F (the PaLM count). The
    backward of a frozen matmul needs the input gradient only (half its backward): LoRA's base costs F + F; frozen
    lower layers (freeze) run forward only, no backward at all. Gradient checkpointing recomputes the forward.
    DPO with LoRA runs one more forward per token for its reference (the adapters switched off)."""
    seq = spec.data.max_length
    attn = 4 * shape.heads * shape.head_dim * seq  # per layer, forward: scores and values
    layer_fwd = 2 * shape.layer_matmul_params() + attn
    head_fwd = 2 * shape.hidden * shape.outputs
    if method == "lora":
        total = 2 * (shape.layers * layer_fwd + head_fwd) + 2 * shape.layers * attn  # attention's backward is 2x
    elif method == "freeze" and spec.freeze is not None:
        top = min(spec.freeze.train_top_layers, shape.layers)
        head = 3 if spec.freeze.train_head else 2  # a frozen head still passes its input gradient back
        total = (shape.layers - top) * layer_fwd + top * 3 * layer_fwd + head * head_fwd
    else:
        total = 3 * (shape.layers * layer_fwd + head_fwd)
    if gradient_checkpointing:
        total += shape.layers * layer_fwd
    if spec.objective == "dpo" and method == "lora" and spec.dpo.uses_reference:
        total += shape.layers * layer_fwd + head_fwd
    return float(total)


def plan_speed(spec: JobSpec, shape: ModelShape, card: Gpu, world: int, micro_batch: int,
               gradient_checkpointing: bool, method: str) -> Speed:
    """MFU is measured against full fine-tuning's model FLOPs; the same hardware efficiency is assumed for the FLOPs
    a method actually executes."""
    seq = spec.data.max_length
    flops = executed_flops_per_token(spec, shape, method, gradient_checkpointing)
    variant = "liger" if spec.model.use_liger_kernel else ("compile" if spec.model.compile else "eager")
    accumulation = spec.optim.global_batch_size // (micro_batch * spec.data_parallel_at(world)) > 1
    u = utilisation(card, variant, accumulation)
    tps = u.mfu * card.peak_bf16 / flops
    tokens_per_step = spec.optim.global_batch_size * seq * sequences_per_row(spec)
    return Speed(flops, u, tps, tokens_per_step / (tps * world))


def job_steps(spec: JobSpec, rows: Optional[int]) -> Optional[int]:
    """Optimizer steps of the job: optim.max_steps, or epochs over `rows` examples (None when rows are unknown)."""
    if spec.optim.max_steps is not None:
        return spec.optim.max_steps
    if rows is None:
        return None
    return max(1, math.floor(spec.optim.epochs * (rows // spec.optim.global_batch_size)))


def count_rows(path: str) -> Optional[int]:
    """Rows of a local JSONL file (a line count: fast, no parsing); None for anything else."""
    if not path.endswith((".jsonl", ".json")):
        return None
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return None


def asha_fraction(trials: int, max_t: int, grace: int, rf: float, concurrency: int, runs: int = 500,
                  seed: int = 0) -> float:
    """Expected share of `trials x max_t` steps that ASHA runs (Monte Carlo over random trial qualities, fixed seed:
    the same settings give the same number)."""
    rungs = [grace * rf ** k for k in range(int(np.log(max_t / grace) / np.log(rf) + 1))]
    rungs = [r for r in rungs if r < max_t]
    if not rungs or trials <= 1:
        return 1.0
    rng = np.random.default_rng(seed)
    steps = sum(_asha_steps(rng.random(trials), rungs, max_t, rf, max(1, concurrency)) for _ in range(runs))
    return steps / (runs * trials * max_t)


def _asha_steps(quality: np.ndarray, rungs: list, max_t: int, rf: float, concurrency: int) -> float:
    """Steps one sweep runs: trials start in order as slots free; at each rung (in time order) a trial below the
    (1 - 1/rf) percentile of those recorded there before it stops (Ray's _Bracket.on_result)."""
    q = 1 - 1 / rf
    recorded: list[list[float]] = [[] for _ in rungs]  # kept sorted
    events: list = []  # (time, trial, rung index, start time)
    pending = iter(range(len(quality)))
    steps = 0.0

    def start(at: float) -> None:
        trial = next(pending, None)
        if trial is not None:
            heapq.heappush(events, (at + rungs[0], trial, 0, at))

    for _ in range(concurrency):
        start(0.0)
    while events:
        _, trial, k, began = heapq.heappop(events)
        seen = recorded[k]
        stop = bool(seen) and quality[trial] < _percentile(seen, q)
        bisect.insort(seen, quality[trial])
        if stop or k + 1 == len(rungs):
            ran = rungs[k] if stop else max_t
            steps += ran
            start(began + ran)
        else:
            heapq.heappush(events, (began + rungs[k + 1], trial, k + 1, began))
    return steps


def _percentile(sorted_values: list, q: float) -> float:
    """numpy.percentile's default (linear) on a sorted list."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
