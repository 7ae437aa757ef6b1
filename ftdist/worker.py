"""The training loop run inside every Ray Train worker: one loop for full, freeze and LoRA.

spec -> DeepSpeed dict -> tokenizer, data shard -> model (ZeRO-3 aware) -> method -> deepspeed.initialize
-> restore -> step loop (same report cadence on every rank) -> per-rank checkpoint shards -> export.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from ftdist.config import JobSpec, spec_from_dict

EXPORT_DIR = "export"


def print0(rank: int, msg: str) -> None:
    """Rank-0-only progress output (Ray forwards worker stdout to the driver)."""
    if rank == 0:
        # Not print(): Ray Train patches print into its logger, which would show each line twice.
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()


def lr_lambda(spec: JobSpec, total_steps: int):
    """Multiplier on optim.lr: linear warmup, then cosine/linear decay to min_lr_ratio (or constant)."""
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


def torch_adamw(model: Any, spec: JobSpec) -> Any:
    """torch.optim.AdamW over the trainable parameters. On GPUs its fused CUDA kernel (one launch for all tensors,
    as the Hugging Face Trainer's default `adamw_torch_fused`); DeepSpeed later points it at its fp32 partitions."""
    import torch

    o = spec.optim
    return torch.optim.AdamW(_param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                             fused=True if spec.resources.use_gpu else None)


def _param_groups(model: Any, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors), the usual AdamW practice."""
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


def _quiet_libraries() -> None:
    for name in ("DeepSpeed", "deepspeed", "ray.train", "torch.distributed", "botocore", "boto3", "s3transfer"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:  # Ray Train names this logger by its file path, so the ray.train level filter misses its INFO lines
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass


class StartupClock:
    """Where the time from run start (the driver's `fit()`, or a sweep trial's start) to the first optimizer step
    goes: Ray worker group, imports, data, model, DeepSpeed, restore, first step. Wall clock, so the driver's stamp
    and the workers' line up (same host, or NTP-synced nodes)."""

    def __init__(self, started_at: float | None) -> None:
        now = time.time()
        self.t0 = started_at or now
        self.phases: dict[str, float] = {"workers": now - self.t0}
        self._last = now

    def mark(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return sum(self.phases.values())

    def line(self) -> str:
        return (f"[ftdist] first step {self.total:.1f} s after start: "
                + ", ".join(f"{k} {v:.1f}" for k, v in self.phases.items()))


def train_fn_per_worker(config: dict) -> None:
    clock = StartupClock(config.get("started_at"))
    spec = spec_from_dict(config["spec"], "job spec")
    if spec.resources.use_gpu:
        if os.environ.get("DS_ACCELERATOR") == "cpu":  # inherited from a CPU run on the same driver
            del os.environ["DS_ACCELERATOR"]
    else:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import numpy as np
    import random

    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from ftdist.checkpointing import RankCheckpointer, export_in_workers, export_per_worker, restore_per_worker
    from ftdist.data import ShardedLoader, build_splits, collate, eval_batches
    from ftdist.ds_config import to_deepspeed
    from ftdist.modeling import (apply_kernels, apply_method, count_params, load_model, load_tokenizer,
                                 prefetch_per_node)
    from ftdist.storage import publish_dir
    from ftdist.storage.store import TransferOptions

    _quiet_libraries()
    clock.mark("imports")
    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    # Ray Train already created the torch process group (gloo on CPU, nccl on GPU); DeepSpeed adopts it.
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    if spec.resources.use_gpu:
        torch.cuda.set_device(ray.train.torch.get_device())
    if not spec.resources.use_gpu:
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))

    o = spec.optim
    ds_cfg = to_deepspeed(spec, world)
    model_path, tok_path = prefetch_per_node(spec.model, local_rank, dist.barrier)
    tokenizer = load_tokenizer(tok_path, spec.model.trust_remote_code)

    splits = build_splits(spec.data, tokenizer, o.seed)
    loader = ShardedLoader.for_job(spec, splits.train, rank, world)
    total_steps = o.max_steps or math.ceil(o.epochs * loader.steps_per_epoch)
    print0(rank, f"[ftdist] data: train {splits.stats.summary()}"
                 + (f"; eval {len(splits.eval)} examples" if splits.eval else "")
                 + f"; {loader.steps_per_epoch} steps/epoch, {total_steps} steps")
    clock.mark("data")

    model = apply_method(apply_kernels(load_model(spec.model, model_path, ds_cfg), spec), spec)
    clock.mark("model")
    trainable, total = count_params(model)
    print0(rank, f"[ftdist] model: {total / 1e6:.2f}M params, {trainable / 1e6:.3f}M trainable "
                 f"({spec.method}, ZeRO-{spec.zero.stage}, {world} workers, grad accum {spec.grad_accum})")

    if o.optimizer == "torch_adamw":
        optimizer, model_parameters = torch_adamw(model, spec), None
    else:
        optimizer, model_parameters = None, _param_groups(model, o.weight_decay)
    schedule = lr_lambda(spec, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=model_parameters,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_cfg,
        dist_init_required=False,
    )
    if spec.model.compile:
        engine.compile()
    device = engine.device
    clock.mark("deepspeed")

    # Per-rank RNG (dropout differs across ranks); restored exactly on resume.
    random.seed(o.seed + rank)
    np.random.seed(o.seed + rank)
    torch.manual_seed(o.seed + rank)

    start_step = 0
    history: list[dict] = []  # every logged metrics row; travels in each checkpoint's state file
    resumes: list[int] = []  # steps this run resumed at (a restart after a crash, or a re-run of the job)
    ckpt_io = RankCheckpointer(spec, rank, world)
    resume = ckpt_io.resume_point(ray.train.get_checkpoint())
    if resume is not None:
        d = ckpt_io.fetch(resume)  # only this rank's shard files, each hash-verified
        state = restore_per_worker(engine, d, rank)
        shutil.rmtree(d, ignore_errors=True)
        start_step = state["step"]
        history = [h for h in state.get("history", []) if h["step"] <= start_step]
        resumes = state.get("resumes", []) + [start_step]
        print0(rank, f"[ftdist] resumed from {ckpt_io.store.store.child(resume)} at step {start_step}")
    clock.mark("restore")

    def evaluate() -> dict:
        engine.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, token count]
        with torch.no_grad():
            for batch in eval_batches(splits.eval, o.micro_batch_size, rank, world, spec.eval.max_batches):
                weight = 1.0
                if not batch:  # keep ZeRO-3 collectives in step on ranks with a short shard
                    batch, weight = splits.eval[:1], 0.0
                b = {k: v.to(device) for k, v in collate(batch, tokenizer.pad_token_id).items()}
                n = (b["labels"][:, 1:] != -100).sum()
                loss = engine(**b).loss
                tot += torch.stack([loss.double() * n * weight, n.double() * weight])
        dist.all_reduce(tot)
        engine.train()
        loss = (tot[0] / tot[1].clamp(min=1)).item()
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    log_every = spec.logging.every_n_steps
    ck_every = spec.checkpoint.every_n_steps
    ev_every = spec.eval.every_n_steps
    window = torch.zeros(3, dtype=torch.float64, device=device)  # [loss sum, micro steps, tokens]
    window_t0 = time.perf_counter()
    window_steps = 0
    batches = loader.micro_batches(start_step)
    loop_t0 = time.perf_counter()  # wall time of this attempt's loop, checkpoint saves included
    metrics: dict = {}
    if start_step == 0 and splits.eval:
        # Baseline held-out loss before the first update, so the log shows how far fine-tuning moved it.
        metrics = {"step": 0, **evaluate()}
        history.append(metrics)
        print0(rank, f"[ftdist] step 0/{total_steps} | eval_loss {metrics['eval_loss']:.4g} | "
                     f"eval_perplexity {metrics['eval_perplexity']:.4g}")
        ray.train.report(metrics)
        clock.mark("eval")
    engine.train()
    startup: dict | None = None  # the startup breakdown, sent once with the first report after the first step

    for step in range(start_step, total_steps):
        for _ in range(spec.grad_accum):
            b = {k: v.to(device) for k, v in collate(next(batches), tokenizer.pad_token_id).items()}
            loss = engine(**b).loss
            engine.backward(loss)
            engine.step()
            window += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device),
                                   b["attention_mask"].sum().double()])
        window_steps += 1
        if step == start_step:
            window[0].item()  # the first step's work is done (GPU: waits for the device)
            clock.mark("first_step")
            print0(rank, clock.line())
            startup = {"s": clock.total, **clock.phases}
        done = step + 1
        last = done == total_steps
        want_ckpt = last or (ck_every is not None and done % ck_every == 0)
        want_eval = bool(splits.eval) and (last or (ev_every is not None and done % ev_every == 0))
        if not (last or want_ckpt or want_eval or done % log_every == 0):
            continue
        # Same decision on every rank (it depends on the step only): report() stays a barrier in lockstep.
        dist.all_reduce(window)
        loss_sum, micro_steps, tokens = window.tolist()  # waits for the device, so the window's time covers its work
        elapsed = time.perf_counter() - window_t0
        gn = engine.get_global_grad_norm()
        metrics = {
            "step": done,
            "loss": loss_sum / micro_steps,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(gn) if gn is not None else float("nan"),
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed / window_steps,
            "epoch": done / loader.steps_per_epoch,
            "train_time_s": time.perf_counter() - loop_t0,
        }
        if startup is not None:
            metrics["startup"], startup = startup, None
        if want_eval:
            metrics.update(evaluate())
        history.append(metrics)
        line = " | ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
            if k not in ("step", "startup")
        )
        print0(rank, f"[ftdist] step {done}/{total_steps} | {line}")
        if want_ckpt:
            state = {"metrics": metrics, "world_size": world, "history": history, "resumes": resumes}
            ckpt_io.save(engine, done, state, metrics, tokenizer)
        else:
            ray.train.report(metrics)
        window.zero_()
        window_steps = 0
        window_t0 = time.perf_counter()

    if spec.export.enabled and not export_in_workers(spec):
        print0(rank, "[ftdist] export: streamed from the final checkpoint after training (ZeRO-3: the model is never "
                     "gathered in one process)")
    elif spec.export.enabled:
        out = tempfile.mkdtemp(prefix="ftdist-export-")
        written = export_per_worker(engine, spec, tokenizer, out)
        if rank == 0:
            dest = config["export_uri"]
            publish_dir(out, dest, TransferOptions.from_spec(spec.checkpoint))
            print0(rank, f"[ftdist] exported {', '.join(sorted(written))} to {dest}")
        shutil.rmtree(out, ignore_errors=True)
    sys.stdout.flush()
