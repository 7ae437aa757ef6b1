"""Save and restore DeepSpeed training state (one shard per rank, plus per-rank RNG), and export a Hugging Face
model folder (safetensors): consolidated weights for full/freeze, the adapter (and optionally merged) for LoRA."""

from __future__ import annotations

import json
import os
import random
from typing import Any, Optional

import numpy as np

STATE_FILE = "ftdist_state.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def save_per_worker(engine: Any, local_dir: str, step: int, state: dict, rank: int) -> None:
    """Each rank writes its own DeepSpeed shard files (and RNG state) under local_dir/<tag>/."""
    import torch

    tag = tag_for(step)
    engine.save_checkpoint(local_dir, tag=tag, save_latest=True)
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(rng, os.path.join(local_dir, tag, f"rng_state_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(local_dir, STATE_FILE), "w") as fh:
            json.dump({**state, "step": step, "tag": tag}, fh, indent=1, sort_keys=True)


def read_state(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, STATE_FILE)) as fh:
        return json.load(fh)


def restore_per_worker(engine: Any, ckpt_dir: str, rank: int) -> dict:
    """Load this rank's DeepSpeed shard + RNG; return the trainer state (step, data position, metrics)."""
    import torch

    state = read_state(ckpt_dir)
    load_path, _ = engine.load_checkpoint(
        ckpt_dir, tag=state["tag"], load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint {state['tag']} in {ckpt_dir}")
    rng_file = os.path.join(ckpt_dir, state["tag"], f"rng_state_rank{rank}.pt")
    if os.path.exists(rng_file):
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state


# ---------------------------------------------------------------------------------------------------------------
# Export


def _gathered_state_dict(engine: Any, only_trainable: bool = False) -> Optional[dict]:
    """Full (unpartitioned) state dict on rank 0, None elsewhere. Collective under ZeRO-3."""
    import deepspeed
    import torch.distributed as dist

    module = engine.module
    rank = dist.get_rank()
    if engine.zero_optimization_stage() != 3:
        if rank != 0:
            return None
        sd = module.state_dict()
        if only_trainable:
            names = {n for n, p in module.named_parameters() if p.requires_grad}
            sd = {k: v for k, v in sd.items() if k in names}
        return {k: v.detach().cpu().clone() for k, v in sd.items()}
    if not only_trainable:
        sd = engine._zero3_consolidated_16bit_state_dict()
        return {k: v.cpu() for k, v in sd.items()} if rank == 0 else None
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    out = {}
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        if rank == 0:
            out = {n: p.detach().cpu().clone() for n, p in params}
    return out if rank == 0 else None


def _save_hf_folder(state_dict: dict, config: Any, out_dir: str, max_shard_size: str, tokenizer: Any,
                    generation_config: Any = None) -> None:
    from huggingface_hub import save_torch_state_dict

    os.makedirs(out_dir, exist_ok=True)
    save_torch_state_dict(state_dict, out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    config.save_pretrained(out_dir)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def merge_lora_state_dict(sd: dict, peft_config: Any) -> dict:
    """Fold LoRA deltas into base weights: W' = W + (alpha / r) * B @ A (transposed for fan_in_fan_out layers)."""
    import torch

    scale = peft_config.lora_alpha / (peft_config.r ** 0.5 if peft_config.use_rslora else peft_config.r)
    prefix = "base_model.model."
    out = {}
    lora_a = {k[: -len(".lora_A.default.weight")]: v for k, v in sd.items() if k.endswith(".lora_A.default.weight")}
    for k, v in sd.items():
        if ".lora_" in k:
            continue
        name = k[len(prefix):] if k.startswith(prefix) else k
        if ".base_layer." in k:
            mod = k.split(".base_layer.")[0]
            name = name.replace(".base_layer.", ".")
            if k.endswith(".weight") and mod in lora_a:
                a = lora_a[mod].float()  # [r, in]
                b = sd[f"{mod}.lora_B.default.weight"].float()  # [out, r]
                delta = (b @ a) * scale  # [out, in]
                if peft_config.fan_in_fan_out:
                    delta = delta.T
                v = (v.float() + delta).to(v.dtype)
        out[name] = v.contiguous()
    return out


def export_per_worker(engine: Any, spec: Any, tokenizer: Any, out_dir: str) -> Optional[dict]:
    """All ranks call this (ZeRO-3 gathers are collective); rank 0 writes out_dir. Returns {kind: path} on rank 0."""
    import torch.distributed as dist

    rank = dist.get_rank()
    module = engine.module
    written: dict = {}
    if spec.method == "lora":
        adapter_sd = _gathered_state_dict(engine, only_trainable=True)
        if rank == 0:
            adapter_dir = os.path.join(out_dir, "adapter")
            # peft writes adapter_config.json + adapter_model.safetensors from the gathered weights.
            module.save_pretrained(adapter_dir, state_dict=adapter_sd)
            if tokenizer is not None:
                tokenizer.save_pretrained(adapter_dir)
            written["adapter"] = adapter_dir
        if spec.lora_spec.merge_on_export:
            full = _gathered_state_dict(engine)
            if rank == 0:
                peft_cfg = module.peft_config["default"]
                merged_dir = os.path.join(out_dir, "merged")
                base = module.get_base_model()
                _save_hf_folder(merge_lora_state_dict(full, peft_cfg), base.config, merged_dir,
                                spec.export.max_shard_size, tokenizer, getattr(base, "generation_config", None))
                written["merged"] = merged_dir
    else:
        full = _gathered_state_dict(engine)
        if rank == 0:
            _save_hf_folder(full, module.config, out_dir, spec.export.max_shard_size, tokenizer,
                            getattr(module, "generation_config", None))
            written["model"] = out_dir
    dist.barrier()
    return written if rank == 0 else None
