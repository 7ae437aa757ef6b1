"""`to_deepspeed(spec, world_size)`: the DeepSpeed config dict, a pure function of the job spec.

Every value is a real number: DeepSpeed outside the HF Trainer does not resolve `"auto"`.
"""

from __future__ import annotations

from typing import Any

from ftdist.spec import JobSpec


def to_deepspeed(spec: JobSpec, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """`load_universal`: this run resumes a checkpoint of another world size from its universal form
    (train/universal.py)."""
    o, z = spec.optim, spec.zero
    micro = o.micro_batch_size
    if o.global_batch_size % (micro * world_size):
        raise ValueError(
            f"global batch {o.global_batch_size} is not a multiple of micro batch {micro} x world size {world_size}"
        )
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
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": z.offload_optimizer, "pin_memory": spec.resources.use_gpu}
    if z.offload_params != "none":
        zero["offload_param"] = {"device": z.offload_params, "pin_memory": spec.resources.use_gpu}

    cfg: dict[str, Any] = {
        "train_batch_size": o.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.model.dtype == "bf16"},
        "fp16": {"enabled": spec.model.dtype == "fp16"},
        "steps_per_print": 1_000_000_000,  # ftdist logs; keep DeepSpeed's own step print quiet
        "wall_clock_breakdown": False,
    }
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
    return cfg
