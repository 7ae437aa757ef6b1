"""`ftdist plan`: put shape, memory, speed and cost together for one job (and its sweep); print a table or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from ftdist.errors import SpecError
from ftdist.plan.cost import Speed, asha_fraction, count_rows, job_steps, plan_speed
from ftdist.plan.gpus import GiB, Gpu, gpu, size_text
from ftdist.plan.memory import (CheckpointSize, MemoryPlan, checkpoint_size, fixes, job_shape, plan_memory,
                                 qlora_base_bytes, trainable_params)
from ftdist.plan.shape import ModelShape
from ftdist.plan.source import model_config
from ftdist.spec import JobSpec
from ftdist.storage.uri import is_remote


@dataclass
class SweepCost:
    trials: int
    steps_per_trial: int
    share: float
    """share of trials x steps that run (1.0 without ASHA)"""
    gpu_hours: float


@dataclass
class Plan:
    spec: JobSpec
    card: Gpu
    world: int
    gpus_per_node: int
    shape: ModelShape
    trainable: int
    memory: MemoryPlan
    fix: Optional[tuple[str, MemoryPlan]]
    speed: Speed
    steps: Optional[int]
    price: Optional[float]
    sweep: Optional[SweepCost]
    notes: list[str]
    checkpoint: Optional[CheckpointSize] = None

    @property
    def wall_s(self) -> Optional[float]:
        return None if self.steps is None else self.steps * self.speed.step_s

    @property
    def gpu_hours(self) -> Optional[float]:
        return None if self.wall_s is None else self.wall_s * self.world / 3600


def make_plan(spec: JobSpec, *, gpu_name: Optional[str] = None, gpus: Optional[int] = None, gpus_per_node: int = 8,
              price: Optional[float] = None, rows: Optional[int] = None) -> Plan:
    notes: list[str] = []
    card = gpu(gpu_name, spec.resources.accelerator_type)
    world = gpus or spec.resources.num_workers
    if gpus is None and not spec.resources.use_gpu:
        notes.append(f"the job runs on CPU (resources.gpus_per_worker: 0); planned as {world} x {card.name}, one "
                     f"per worker")
    problem = spec.batch_problem(world, "{n} GPUs")
    if problem:
        raise SpecError(f"--gpus {world}: {problem}")
    cfg = model_config(spec.model)
    try:
        shape = job_shape(spec, cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise SpecError(f"model: its config has no usable {e} (the planner covers decoder-only transformers of the "
                        f"Llama family)") from None
    memory = plan_memory(spec, shape, card, world, gpus_per_node)
    fix = None if memory.fits else next(iter(fixes(spec, shape, card, world, gpus_per_node)), None)
    speed = plan_speed(spec, shape, card, world, memory.setting.micro_batch, memory.setting.gradient_checkpointing,
                       memory.setting.method)
    if rows is None and not any(is_remote(p) for p in spec.data.train_paths):
        rows = sum(count_rows(p) for p in spec.data.train_paths)
    steps = job_steps(spec, rows)
    if steps is None:
        notes.append("steps unknown: optim.epochs over data the planner cannot count; give --rows N")
    if (sp := spec.parallel.sequence) > 1:
        notes.append(f"parallel.sequence {sp}: activations and logits per GPU hold 1/{sp} of each sequence; the "
                     f"speed leaves out the all-to-alls around each attention call")
    if spec.method == "lora" and spec.lora.quantize and memory.setting.stage == 3:
        notes.append(f"QLoRA under ZeRO-3: each GPU holds the whole 4-bit base ({size_text(qlora_base_bytes(spec, shape))})"
                     f" while it loads, before DeepSpeed partitions it")
    if not spec.data.packing:
        notes.append(f"sequences counted at data.max_length ({spec.data.max_length}); shorter examples without "
                     f"packing make every number here an upper bound")
    plan = Plan(spec, card, world, gpus_per_node, shape, trainable_params(spec, shape, memory.setting.method), memory,
                fix, speed, steps, price, None, notes, checkpoint_size(spec, shape, world, memory.setting))
    plan.sweep = _sweep_cost(plan)
    return plan


def _sweep_cost(plan: Plan) -> Optional[SweepCost]:
    spec = plan.spec
    if spec.sweep is None or plan.steps is None:
        return None
    from ftdist.sweep.space import trial_count

    sw, trials = spec.sweep, trial_count(spec)
    share = 1.0
    if sw.scheduler.type == "asha" and plan.steps > sw.scheduler.grace_period:
        share = asha_fraction(trials, plan.steps, sw.scheduler.grace_period, sw.scheduler.reduction_factor,
                              sw.max_concurrent_trials or trials)
    gpu_hours = trials * plan.steps * share * plan.speed.step_s * plan.world / 3600
    return SweepCost(trials, plan.steps, share, gpu_hours)


# ---------------------------------------------------------------------------------------------------------------
# Output


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _money(hours: float, price: Optional[float]) -> str:
    return f"; ${hours * price:,.2f} at ${price:g}/GPU-hour" if price is not None else ""


def render(plan: Plan) -> str:
    spec, m, s = plan.spec, plan.memory, plan.speed
    total = plan.shape.params()
    method = spec.method + (f" (rank {spec.lora.rank})" if spec.method == "lora" and spec.lora else "")
    out = [f"ftdist plan: {spec.name} on {plan.world} x {plan.card.name}, ZeRO-{m.setting.stage}"
           f"{', optimizer offload' if m.setting.offload_optimizer else ''}"
           f"{', parameter offload' if m.setting.offload_params else ''}, {method}",
           f"model: {spec.model.name_or_path or 'from_config ' + str(spec.model.from_config.get('model_type'))}: "
           f"{total / 1e9:.2f} B parameters, {plan.trainable / 1e6:,.1f} M trainable "
           f"({100 * plan.trainable / total:.2f}%), {spec.model.dtype}, sequence {spec.data.max_length}"
           + (f" split over {spec.parallel.sequence} GPUs" if spec.parallel.sequence > 1 else "") + ", micro batch "
           f"{m.setting.micro_batch}, gradient checkpointing {'on' if m.setting.gradient_checkpointing else 'off'}",
           "", f"{'per GPU':<48}{'GiB':>8}"]
    out += [f"  {what:<46}{_gib(b)}" for what, b in m.gpu]
    verdict = "fits" if m.fits else "DOES NOT FIT"
    out.append(f"  {'total (model states ' + _gib(m.model_states).strip() + ' GiB)':<46}{_gib(m.peak)}   of "
               f"{m.capacity / GiB:.1f} GiB: {verdict} ({100 * m.peak / m.capacity:.0f}%)")
    if not m.fits:
        if plan.fix:
            what, p = plan.fix
            out.append(f"  smallest change that fits: {what} (peak {p.peak / GiB:.1f} GiB)")
        else:
            out.append(f"  no single setting makes it fit on {plan.world} x {plan.card.name}: more GPUs, or larger "
                       f"ones")
    out += ["", f"{'per node (host memory, ' + str(min(plan.gpus_per_node, plan.world)) + ' GPUs)':<48}{'GiB':>8}"]
    out += [f"  {what:<46}{_gib(b)}" for what, b in m.host]
    c = plan.checkpoint
    parts = ([f"{size_text(c.module)} from rank 0"] if c.module else []) + \
        ([f"{size_text(c.per_rank)} from each of {plan.world} ranks"] if c.per_rank else [])
    out += [f"checkpoint: {size_text(c.total(plan.world))} ({' + '.join(parts)}), staged on the nodes' local disks "
            f"before the upload"]
    out += ["", f"speed: {s.flops_per_token / 1e9:.2f} GFLOP/token x {s.tokens_per_s_per_gpu:,.0f} tokens/s per GPU "
                f"at {s.utilisation.mfu:.1%} MFU ({s.utilisation.source})",
            f"  optimizer step {s.step_s:.2f} s ({spec.optim.global_batch_size} sequences)"]
    if plan.steps is not None:
        out.append(f"  {plan.steps} steps: {_duration(plan.wall_s)}; {plan.gpu_hours:,.1f} GPU-hours"
                   f"{_money(plan.gpu_hours, plan.price)}")
    if plan.sweep:
        sw = plan.sweep
        asha = f", ASHA runs {sw.share:.0%} of the grid's steps (simulated)" if sw.share < 1 else ""
        out.append(f"sweep: {sw.trials} trials x {sw.steps_per_trial} steps{asha}: {sw.gpu_hours:,.1f} GPU-hours"
                   f"{_money(sw.gpu_hours, plan.price)}")
    out += [f"note: {n}" for n in plan.notes]
    return "\n".join(out)


def to_json(plan: Plan) -> dict[str, Any]:
    m, s = plan.memory, plan.speed
    out: dict[str, Any] = {
        "job": plan.spec.name, "gpu": plan.card.name, "gpus": plan.world,
        "parameters": plan.shape.params(), "trainable_parameters": plan.trainable,
        "setting": asdict(m.setting), "fits": m.fits, "capacity_bytes": m.capacity, "peak_bytes": m.peak,
        "model_state_bytes": m.model_states, "gpu_bytes": dict(m.gpu), "host_bytes_per_node": dict(m.host),
        "checkpoint_bytes": plan.checkpoint.total(plan.world), "checkpoint_bytes_per_rank": plan.checkpoint.per_rank,
        "fix": {"change": plan.fix[0], "peak_bytes": plan.fix[1].peak} if plan.fix else None,
        "flops_per_token": s.flops_per_token, "mfu": s.utilisation.mfu, "mfu_source": s.utilisation.source,
        "tokens_per_s_per_gpu": s.tokens_per_s_per_gpu, "step_s": s.step_s, "steps": plan.steps,
        "wall_s": plan.wall_s, "gpu_hours": plan.gpu_hours, "price_per_gpu_hour": plan.price,
        "cost": plan.gpu_hours * plan.price if plan.gpu_hours is not None and plan.price is not None else None,
        "notes": plan.notes,
    }
    if plan.sweep:
        sw = plan.sweep
        out["sweep"] = {"trials": sw.trials, "steps_per_trial": sw.steps_per_trial, "share_of_grid": sw.share,
                        "gpu_hours": sw.gpu_hours,
                        "cost": sw.gpu_hours * plan.price if plan.price is not None else None}
    return out
