"""The training loop run inside every Ray Train worker: one loop for full, freeze and LoRA.

spec -> DeepSpeed dict -> tokenizer, data shard -> model (ZeRO-3 aware) -> method -> deepspeed.initialize
-> restore -> step loop (same report cadence on every rank) -> per-rank checkpoint shards. The export runs after
the workers are done (train/export.py), from the final checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import sys
import time
import warnings

import deepspeed
import numpy as np
import psutil
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
from deepspeed.utils import logger as ds_logger
from ray.train.v2._internal.execution import context as train_context
from transformers.utils import logging as hf_logging

from ftdist.errors import SpecError, last_line
from ftdist.storage.checkpoints import checkpoint_name
from ftdist.train.checkpointing import RankCheckpointer, restore_per_worker
from ftdist.train.universal import needs_conversion
from ftdist.train.contracts import STARTUP_KEY, TrainState, WorkerConfig
from ftdist.train.ds_config import to_deepspeed
from ftdist.train.evaluation import Evaluator, load_references
from ftdist.train.generation import GenerationEval
from ftdist.train.locations import load_tokenizer, prefetch_per_node
from ftdist.train.modeling import apply_kernels, apply_method, count_params, load_model
from ftdist.train.objectives import objective_for
from ftdist.train.objectives.reference import attach_reference
from ftdist.progress import eta
from ftdist.train.obs.sinks import MetricsLog
from ftdist.train.optim import lr_lambda, param_groups, torch_adamw, total_steps
from ftdist.train.prepare import worker_data
from ftdist.train.sampling import ShardedLoader
from ftdist.train.sequence_parallel import SequenceParallel


def memory_peaks(gpu: bool) -> dict:
    """This process's memory high-water marks in GiB (contracts.GPU_METRICS): host resident set (ru_maxrss, KiB on
    Linux) and, on a GPU, what torch allocated."""
    peaks = {"host_mem_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if gpu:
        peaks["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return peaks


def print0(rank: int, msg: str) -> None:
    """Rank-0-only progress output (Ray forwards worker stdout to the driver)."""
    if rank == 0:
        # Not print(): Ray Train patches print into its logger, which would show each line twice.
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()


def skip_inference_comm_op() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory all-reduce op when its comm backend starts. The op
    serves `inference_all_reduce` (tensor-parallel inference) only, which training never calls; building it took
    110 s of a fresh machine's first `ftdist train` on 2 cores. Marked incompatible, DeepSpeed skips it (and would
    fall back to torch.distributed). DeepSpeed caches the compatibility table in its module for such edits."""
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def _quiet_libraries() -> None:
    """One clean line per interval is the product's voice: library chatter that says nothing to the user goes."""
    # DeepSpeed's ZeRO calls torch's all_gather_into_tensor, which torch 2.13 deprecates: once per rank per run.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    # peft asks transformers 5 for a renamed property: once per LoRA model, nothing the user can change.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    hf_logging.disable_progress_bar()  # "Loading weights" bars from every rank; the model line says what loaded
    # transformers 5 checks every loaded model against its tensor-parallel plan and lists the layers it would not
    # shard, on every rank, though no tensor parallelism is in use.
    logging.getLogger("transformers.distributed.tensor_parallel").setLevel(logging.ERROR)
    for name in ("DeepSpeed", "deepspeed", "ray.train", "torch.distributed", "botocore", "boto3", "s3transfer"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Train names this logger by its file path, so the ray.train level filter misses its INFO lines.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    ds_logger.setLevel(logging.WARNING)


def metrics_line(metrics: dict) -> str:
    """`loss 0.4521 | lr 0.0003 | ...`: one log line's metrics (the step and the startup breakdown go elsewhere)."""
    return " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                      if k not in ("step", STARTUP_KEY))


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


def restart_line(before: int, now: int, clock: StartupClock) -> str:
    """What a restart cost: from this attempt's worker processes starting (Ray Train restarts the whole group, at
    another size for a resize) to its first step, and how much of it went to converting and loading the checkpoint.
    (The time before, from a loss to the new group's start, is Ray's detection: `ftdist bench --only elastic`.)"""
    if now != before:
        why = ("more workers fit the cluster now" if now > before else
               "fewer workers fit the cluster now (a worker or its node was lost)")
        what = f"resized {before} -> {now} workers ({why}, or the job was re-run at another size)"
    else:
        what = f"resumed on {now} workers"
    started = psutil.Process().create_time()
    return (f"[ftdist] {what}: first step {time.time() - started:.1f} s after this attempt's workers started, "
            f"{clock.phases.get('restore', 0):.1f} s of it converting and loading the checkpoint")


def train_fn_per_worker(config: dict) -> None:
    cfg = WorkerConfig.model_validate(config)
    clock = StartupClock(cfg.started_at)
    spec = cfg.spec
    _quiet_libraries()
    clock.mark("imports")
    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    # Ray Train already created the torch process group (gloo on CPU, nccl on GPU); DeepSpeed adopts it.
    if not spec.resources.use_gpu:  # (on GPUs DeepSpeed has no such op and never probes: nothing to skip)
        skip_inference_comm_op()
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    if spec.resources.use_gpu:
        torch.cuda.set_device(ray.train.torch.get_device())
    if not spec.resources.use_gpu:
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))

    o = spec.optim
    if world % spec.parallel.sequence:
        raise SpecError(f"parallel.sequence {spec.parallel.sequence} must divide the {world} workers this run has")
    # Where this run continues from decides the DeepSpeed config: a checkpoint of another world size loads from its
    # universal form.
    ckpt_io = RankCheckpointer(spec, rank, world, local_rank, cfg.lease_generation)
    resume = ckpt_io.resume_point(ray.train.get_checkpoint())
    ds_cfg = to_deepspeed(spec, world, load_universal=resume is not None and needs_conversion(resume.manifest, world))
    grad_accum = ds_cfg["gradient_accumulation_steps"]  # the global batch is the job's at any world size
    model_path, tok_path = prefetch_per_node(spec.model, local_rank, dist.barrier)
    tokenizer = load_tokenizer(tok_path, spec.model.trust_remote_code)

    objective = objective_for(spec)
    flag_device = ray.train.torch.get_device() if spec.resources.use_gpu else torch.device("cpu")

    def everyone(ok: bool) -> bool:
        flag = torch.tensor([float(ok)], device=flag_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    sources = worker_data(spec, tokenizer, objective, rank, everyone, dist.barrier, show=rank == 0)
    mixture = spec.data.is_mixture
    references = load_references(spec, tokenizer)
    loader = ShardedLoader.for_job(spec, [s.splits.train for s in sources], rank, world)
    n_steps = total_steps(spec, loader.steps_per_epoch)
    print0(rank, "[ftdist] data: " + "; ".join(
        (f"{s.name} (weight {s.weight:g}): " if mixture else "train ") + s.splits.stats.summary()
        + (f"; eval {len(s.splits.eval)} examples" if len(s.splits.eval) else "") for s in sources)
        + "".join(f"; reference {r.name} {len(r.examples)} examples" for r in references)
        + f"; {loader.steps_per_epoch} steps/epoch, {n_steps} steps")
    clock.mark("data")

    head = objective.score_head(tokenizer)
    model = load_model(spec.model, model_path, ds_cfg, head, o.seed, lora=spec.lora)
    model = apply_method(apply_kernels(model, spec), spec)
    sp, mpu = (SequenceParallel.attach(model, spec, tokenizer.pad_token_id) if spec.parallel.sequence > 1
               else (None, None))
    clock.mark("model")
    trainable, total = count_params(model)
    print0(rank, f"[ftdist] model: {total / 1e6:.2f}M params, {trainable / 1e6:.3f}M trainable "
                 f"({spec.method}, ZeRO-{spec.zero.stage}, {world} workers"
                 + (f", sequence parallel {sp.size}" if sp else "") + f", grad accum {grad_accum})"
                 + ("" if head is None else "; new head: "
                    + (f"labels {', '.join(head.labels)}" if head.labels else "one reward score")))

    if o.optimizer == "torch_adamw":
        optimizer, model_parameters = torch_adamw(model, spec), None
    else:
        optimizer, model_parameters = None, param_groups(model, o.weight_decay)
    schedule = lr_lambda(spec, n_steps)
    try:
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=model_parameters,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=ds_cfg,
            mpu=mpu,
            dist_init_required=False,
        )
    except (AssertionError, ValueError) as e:
        # DeepSpeed's config parser took the passed keys (checked before Ray started); its engine checks some
        # combinations only here (prescale_gradients with ZeRO-2's reduce-scatter, say): name the pass-through.
        if not spec.deepspeed_extra:
            raise
        raise SpecError(f"deepspeed_extra: DeepSpeed refuses the config at start: {last_line(e, 300)}") from None
    if spec.model.compile:
        engine.compile()
    device = engine.device
    clock.mark("deepspeed")

    # Per-rank RNG (dropout differs across ranks); restored exactly on resume.
    random.seed(o.seed + rank)
    np.random.seed(o.seed + rank)
    torch.manual_seed(o.seed + rank)

    def to_device(batch: list) -> dict:
        return {k: v.to(device) for k, v in objective.collate(batch, tokenizer.pad_token_id).items()}

    if objective.precomputes_reference:  # before restore: the engine still holds the initial weights
        model_key = json.dumps(spec.model.model_dump(mode="json"), sort_keys=True)
        scored = {f"{s.name}:{k}" if mixture else k: getattr(s.splits, k) for s in sources for k in ("train", "eval")}
        attach_reference(objective, engine, scored, ckpt_io.store.store, model_key, rank, world, o.micro_batch_size,
                         to_device, lambda m: print0(rank, m))
        clock.mark("reference")

    start_step = 0
    history: list[dict] = []  # every logged metrics row; travels in each checkpoint's state file
    resumes: list[int] = []  # steps this run resumed at (a restart after a crash, or a re-run of the job)
    spent_before = (0.0, 0.0, 0.0)  # (worker-, GPU-, wall seconds) of earlier attempts, from the checkpoint
    if resume is not None:
        d = ckpt_io.fetch(resume)
        state = restore_per_worker(engine, d, rank, resume.manifest.frozen_excluded)
        ckpt_io.release(d, resume)
        start_step = state.step
        history = [h for h in state.history if h["step"] <= start_step]
        resumes = [*state.resumes, start_step]
        spent_before = (state.worker_seconds, state.gpu_seconds, state.wall_seconds)
        print0(rank, f"[ftdist] resumed from {ckpt_io.store.store.child(resume.name)} at step {start_step}"
                     + (f" (written by {resume.manifest.world_size} workers, {world} now: {ckpt_io.resized}; global "
                        f"batch {o.global_batch_size} kept, grad accum {grad_accum})" if ckpt_io.resized else ""))
    clock.mark("restore")
    # Rank 0 logs to the tracking runs the driver opened; every rank's rows are the same (all-reduced).
    tracker = (MetricsLog(cfg.tracking, spec.run_dir, start_step, lambda m: print0(rank, m))
               if rank == 0 and cfg.tracking.any else None)

    def record(metrics: dict) -> None:
        history.append(metrics)
        left = eta(metrics["step"] - start_step, n_steps - start_step, metrics.get("train_time_s", 0.0))
        print0(rank, f"[ftdist] step {metrics['step']}/{n_steps} | {metrics_line(metrics)}"
                     + (f" | eta {left}" if left else ""))
        if tracker is not None:
            tracker.log(metrics)

    generation = GenerationEval(spec, tokenizer, rank, world) if spec.eval.generate else None
    evaluate = Evaluator(spec, objective, [(s.name if mixture else "", s.splits.eval) for s in sources], references,
                         generation, rank, world, to_device, tokenizer.pad_token_id)

    log_every = spec.logging.every_n_steps
    ck_every = spec.checkpoint.every_n_steps
    ev_every = spec.eval.every_n_steps
    # Summed over the log window: [loss sum, micro steps, tokens] + the objective's metric sums (one all-reduce).
    window: torch.Tensor | None = None
    # A micro step counts once in the logged loss; a sequence-parallel rank's loss is its share of the group's.
    one = torch.tensor(sp.micro_share if sp else 1.0, dtype=torch.float64, device=device)
    # Training batches (not eval's: those run whole on every rank) split over the sequence-parallel group.
    train_batch = (lambda examples: sp.shard(to_device(examples))) if sp else to_device
    train_forward = sp.forward if sp else objective.forward
    window_t0 = time.perf_counter()
    window_steps = 0
    batches = loader.micro_batches(start_step)
    loop_t0 = time.perf_counter()  # wall time of this attempt's loop, checkpoint saves included
    metrics: dict = {}
    if start_step == 0 and evaluate.enabled:
        # Baseline held-out loss (and reference loss) before the first update: how far fine-tuning moved them.
        metrics = {"step": 0, **evaluate(engine, 0, last=n_steps == 0)}
        record(metrics)
        ray.train.report(metrics)
        clock.mark("eval")
    engine.train()
    startup: dict | None = None  # the startup breakdown, sent once with the first report after the first step

    for step in range(start_step, n_steps):
        for m in range(grad_accum):
            b = train_batch(next(batches))
            loss, sums = train_forward(engine, b)
            real = not loader.is_padding(m)  # (padding: an elastic size that does not divide the global batch)
            engine.backward(loss * loader.real_weight if real else loss * 0.0)
            engine.step()
            counts = torch.stack([loss.detach().double(), one, objective.tokens(b).double()])
            micro = torch.cat([counts, sums]) * real
            window = micro if window is None else window + micro
        window_steps += 1
        if step == start_step:
            window[0].item()  # the first step's work is done (GPU: waits for the device)
            clock.mark("first_step")
            print0(rank, clock.line())
            if resume is not None:
                print0(rank, restart_line(resume.manifest.world_size, world, clock))
            startup = {"s": clock.total, **clock.phases}
        done = step + 1
        last = done == n_steps
        want_ckpt = last or (ck_every is not None and done % ck_every == 0)
        want_eval = evaluate.enabled and (last or (ev_every is not None and done % ev_every == 0))
        if not (last or want_ckpt or want_eval or done % log_every == 0):
            continue
        # Same decision on every rank (it depends on the step only): report() stays a barrier in lockstep.
        dist.all_reduce(window)
        totals = window.tolist()  # waits for the device, so the window's time covers its work
        loss_sum, micro_steps, tokens = totals[:3]
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
            **memory_peaks(spec.resources.use_gpu),
            **objective.train_metrics_from(totals[3:]),
            **({f"data_share_{n}": v for n, v in loader.shares(done).items()} if mixture else {}),
        }
        if startup is not None:
            metrics[STARTUP_KEY], startup = startup, None
        if want_eval:
            metrics.update(evaluate(engine, done, last))
        record(metrics)
        if want_ckpt:
            wall_s = time.time() - clock.t0  # this attempt, from the run's start stamp
            state = TrainState(step=done, tag=checkpoint_name(done), world_size=world, metrics=metrics,
                               history=history, resumes=resumes, worker_seconds=spent_before[0] + wall_s * world,
                               gpu_seconds=spent_before[1] + wall_s * world * spec.resources.gpus_per_worker,
                               wall_seconds=spent_before[2] + wall_s)
            ckpt_io.save(engine, state, tokenizer)
            if tracker is not None:
                tracker.sync()
        else:
            ray.train.report(metrics)
        window = None
        window_steps = 0
        window_t0 = time.perf_counter()

    if tracker is not None:
        tracker.close()
    sys.stdout.flush()
