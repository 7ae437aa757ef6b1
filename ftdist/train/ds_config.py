"""`to_deepspeed(spec, world_size)`: the DeepSpeed config dict, a pure function of the job spec;
`check_with_deepspeed(spec)`: that dict read by DeepSpeed's own parser (the CLI's check of keys passed through).

Every value is a real number: DeepSpeed outside the HF Trainer does not resolve `"auto"`.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ftdist.errors import SpecError, did_you_mean, last_line
from ftdist.spec import JobSpec


def to_deepspeed(spec: JobSpec, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """`load_universal`: this run resumes a checkpoint of another world size from its universal form
    (train/universal.py)."""
    o, z, sp = spec.optim, spec.zero, spec.parallel.sequence
    micro = o.micro_batch_size
    problem = spec.batch_problem(world_size)
    if problem and not (spec.resources.elastic and world_size % sp == 0):  # (elastic pads the rest: ShardedLoader)
        raise ValueError(problem)
    grad_accum = spec.grad_accum_at(world_size)

    zero: dict[str, Any] = {"stage": z.stage}
    if z.stage >= 1:
        zero.update(
            overlap_comm=z.overlap_comm,
            contiguous_gradients=z.contiguous_gradients,
            reduce_bucket_size=z.reduce_bucket_size,
            reduce_scatter=True,
        )
    if z.stage in (1, 2):
        zero.update(allgather_partitions=True, allgather_bucket_size=z.allgather_bucket_size)
    if z.stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=z.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=z.stage3_param_persistence_threshold,
            stage3_max_live_parameters=z.stage3_max_live_parameters,
            stage3_max_reuse_distance=z.stage3_max_live_parameters,
            # No stage3_gather_16bit_weights_on_model_save: nothing gathers the model; the export streams the fp32
            # partitions of the final checkpoint (train/export.py).
        )
        if z.hpz_partition_size > 1:
            zero["zero_hpz_partition_size"] = z.hpz_partition_size
        if z.quantized_weights:
            zero["zero_quantized_weights"] = True
        if z.quantized_gradients:
            zero["zero_quantized_gradients"] = True
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": z.offload_optimizer, "pin_memory": spec.resources.use_gpu}
    if z.offload_params != "none":
        zero["offload_param"] = {"device": z.offload_params, "pin_memory": spec.resources.use_gpu}

    cfg: dict[str, Any] = {
        # the job's global batch, plus any padding micro batches (elastic sizes)
        "train_batch_size": micro * grad_accum * spec.data_parallel_at(world_size),
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.model.dtype == "bf16"},
        "fp16": {"enabled": spec.model.dtype == "fp16"},
        "steps_per_print": 1_000_000_000,  # ftdist logs; keep DeepSpeed's own step print quiet
        "wall_clock_breakdown": False,
    }
    if sp > 1:
        # DeepSpeed learns the groups from the mpu handed to deepspeed.initialize; ZeRO-3's zero.Init (model
        # construction, before that) reads the data-parallel size for its batch check from this key.
        cfg["sequence_parallel_size"] = sp
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    if spec.model.dtype == "fp16":
        cfg["fp16"].update(loss_scale=0, initial_scale_power=16, loss_scale_window=1000, hysteresis=2, min_loss_scale=1)
    if spec.model.dtype == "bf16":
        # Gradients are accumulated and reduced in fp32 for stability across many micro-batches.
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}

    if o.optimizer == "deepspeed_adamw":
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay},
        }
    else:
        # ftdist passes torch.optim.AdamW; DeepSpeed's CPU Adam would need a C++ build.
        cfg["zero_allow_untested_optimizer"] = True
        if z.offload_optimizer != "none":
            cfg["zero_force_ds_cpu_optimizer"] = False
    return merged(cfg, spec.deepspeed_extra) if spec.deepspeed_extra else cfg


def merged(base: dict, extra: dict) -> dict:
    """`extra` over `base`, nested sections key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _ReadKeys(dict):
    """A config dict that notes every key DeepSpeed looks up in it."""

    def __init__(self, *args: Any, read: set) -> None:
        super().__init__(*args)
        self.read = read

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: Any) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def __copy__(self) -> "_ReadKeys":
        return _ReadKeys(self, read=self.read)


def check_with_deepspeed(spec: JobSpec) -> None:
    """The job's config as DeepSpeed's own parser reads it (`DeepSpeedConfig`: its pydantic section models refuse
    unknown or ill-typed keys, its sanity checks run), one line on failure; run by the CLI before Ray starts, for
    jobs that pass keys (deepspeed_extra). DeepSpeed ignores top-level keys it does not know, so a passed top-level key
    its parser never looked up is a typo and refused the same way."""
    from deepspeed.runtime.config import DeepSpeedConfig  # torch and DeepSpeed load only for jobs that pass keys

    cfg, extra = to_deepspeed(spec, spec.resources.num_workers), spec.deepspeed_extra
    read: set = set()
    # Checked as one process would read it: without the world size, DeepSpeed derives the total batch itself.
    probe = _ReadKeys({k: v for k, v in cfg.items() if k != "train_batch_size"}, read=read)
    try:
        DeepSpeedConfig(probe)
    except ValidationError as e:  # a section's pydantic model: name the key in the job's terms
        raise SpecError(_section_error(e, extra)) from None
    except Exception as e:  # noqa: BLE001  (DeepSpeed's own asserts and ValueErrors)
        raise SpecError(f"deepspeed_extra: DeepSpeed refuses the config: {last_line(e, 300)}") from None
    for key in extra:
        if key not in read:
            raise SpecError(f"deepspeed_extra.{key}: not a DeepSpeed config key{did_you_mean(key, sorted(read))}")


def _section_error(e: Any, extra: dict) -> str:
    """`deepspeed_extra.<section>.<key>: <what is wrong>` for the first error of a DeepSpeed section model."""
    err = e.errors()[0]
    field = ".".join(str(p) for p in err["loc"])
    section = next((k for k, v in extra.items() if isinstance(v, dict) and str(err["loc"][0]) in v), None)
    where = f"deepspeed_extra.{section}.{field}" if section else f"deepspeed_extra ({e.title}.{field})"
    if err["type"] == "extra_forbidden":
        model = _config_model(e.title)
        known = list(model.model_fields) if model else []
        return f"{where}: not a key of DeepSpeed's {e.title}{did_you_mean(str(err['loc'][-1]), known)}"
    return f"{where}: {err['msg']} (DeepSpeed's {e.title})"


def _config_model(name: str) -> Any:
    """DeepSpeed's pydantic section model called `name`."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo = [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    return None
