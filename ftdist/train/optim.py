"""The optimiser side of a worker: AdamW parameter groups and the learning-rate schedule (linear warmup, then
cosine / linear decay to `min_lr_ratio`, or constant). Pure torch; DeepSpeed takes the optimiser as built here."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ftdist.spec import JobSpec


def lr_lambda(spec: JobSpec, total_steps: int) -> Callable[[int], float]:
    """Multiplier on optim.lr at an optimizer step: linear warmup over `warmup_steps`, then cosine/linear decay to
    `min_lr_ratio` at `total_steps` (or constant). Matches transformers' get_{cosine,linear}_schedule_with_warmup
    with min_lr_ratio 0, except that warmup starts at 1/(warmup+1) instead of 0 (step 0 is not a wasted step)."""
    o = spec.optim
    warm, floor = o.warmup_steps, o.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1.0 - progress
        return floor + (1 - floor) * decay

    return f


def param_groups(model: Any, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: no weight decay on biases and norm weights (1-D tensors), the usual
    practice. Under ZeRO-3 a partitioned parameter's real shape is `ds_shape`."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def torch_adamw(model: Any, spec: JobSpec) -> torch.optim.AdamW:
    """torch.optim.AdamW over the trainable parameters. On GPUs its fused CUDA kernel (one launch for all tensors,
    as the Hugging Face Trainer's default `adamw_torch_fused`); DeepSpeed later points it at its fp32 partitions."""
    o = spec.optim
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                             fused=True if spec.resources.use_gpu else None)


def total_steps(spec: JobSpec, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run: optim.max_steps, or optim.epochs over the data (a partial epoch rounds up)."""
    o = spec.optim
    return o.max_steps or math.ceil(o.epochs * steps_per_epoch)
