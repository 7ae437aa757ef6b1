"""`ftdist bench --only gpu-8b`: an 8B Llama-architecture model (Llama-3.1-8B's config, random bf16 weights: speed and
memory do not depend on the values) on the machine's first GPU, one run per method, each beside `ftdist plan`'s
prediction for the same job:

- LoRA (rank 16 on every linear) and QLoRA (the same adapters on an NF4 base): training tokens/s, anchored on NVIDIA
  NeMo AutoModel's published 12,473 tokens/s per H100 for LoRA on Llama-3 8B, and peak GPU memory;
- full fine-tuning under ZeRO-3 with the optimizer offloaded to the host (CPUAdam): tokens/s, peak GPU and host
  memory. It runs only where the planner says the host holds the offloaded states (16 bytes a parameter).

The weights are written once (save_pretrained, ~16 GB) so the QLoRA run quantises them as a real base loads.
"""

from __future__ import annotations

import os
import shutil
import statistics
from typing import Any, Optional

from ftdist.bench.common import task
from ftdist.bench.training import write_text_data
from ftdist.spec import JobSpec, spec_from_dict
from ftdist.train.driver import run_training

LLAMA_31_8B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    # The bench tokenizer's special ids (its ids all fall inside the 128k vocabulary; the head still computes all).
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
NEMO_LORA_H100_TPS = 12_473
"""NVIDIA NeMo AutoModel's published LoRA training throughput on Llama-3 8B, tokens/s per H100."""
METHODS = ("lora", "qlora", "full-offload")


def save_random_base(cfg: dict, out: str, device: str) -> str:
    """A Hugging Face folder of the model with seeded random bf16 weights (built on `device`), and the bench
    tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = dict(cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg),
                                                 dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(task().tokenizer).save_pretrained(out)
    del model
    return out


def method_spec(method: str, base: str, storage: str, data: str, steps: int, seq: int, micro: int,
                gpus: int = 1, dtype: str = "bf16") -> JobSpec:
    """The job a user would write for `method` on this base (one worker per GPU; `gpus` 0: a CPU smoke run)."""
    lora = {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    by_method: dict[str, dict[str, Any]] = {
        "lora": {"method": "lora", "lora": lora, "zero": {"stage": 2}},
        "qlora": {"method": "lora", "lora": {**lora, "quantize": "nf4"}, "zero": {"stage": 2}},
        "full-offload": {"method": "full", "zero": {"stage": 3, "offload_optimizer": "cpu"},
                         "optim": {"optimizer": "deepspeed_adamw"}},
    }
    job = dict(by_method[method])
    optim_over = job.pop("optim", {})
    return spec_from_dict({
        "name": f"bench-8b-{method}",
        "model": {"name_or_path": base, "dtype": dtype, "attn_implementation": "sdpa"},
        "data": {"train": data, "format": "text", "max_length": seq, "packing": True},
        "optim": {"lr": 1e-4, "micro_batch_size": micro, "global_batch_size": micro * max(gpus, 1),
                  "max_steps": steps, "schedule": "constant", "seed": 1, **optim_over},
        **job,
        "resources": {"num_workers": max(gpus, 1), "cpus_per_worker": 4 if gpus else 1, "gpus_per_worker": min(gpus, 1),
                      "max_failures": 0},
        "checkpoint": {"storage": storage, "every_n_steps": None},
        "logging": {"every_n_steps": 2},
        "export": {"enabled": False},
    })


def _plan(spec: JobSpec, card: Optional[str]) -> Any:
    from ftdist.plan.report import make_plan

    return make_plan(spec, gpu_name=card, gpus=spec.resources.num_workers, gpus_per_node=1, rows=1)


def card_name(device_name: str) -> Optional[str]:
    """The planner's card for a CUDA device name (None: the planner's default)."""
    from ftdist.plan.gpus import GPUS

    return next((name for name, g in GPUS.items() if g.ray_type in device_name.split()), None)


def bench_gpu_8b(tmp: str, steps: int, seq: int = 2048, micro: int = 4, methods: tuple = METHODS,
                 cfg: dict = LLAMA_31_8B, gpus: int = 1, host_bytes: Optional[int] = None) -> dict:
    """{method: row} measured side by side in one invocation. `gpus` 0 with a tiny `cfg`: the CPU smoke run of the
    same path (fp32)."""
    import psutil  # Ray's dependency (this module loads only for `ftdist bench --only gpu-8b`)
    import torch

    device = "cuda" if gpus else "cpu"
    device_name = torch.cuda.get_device_name(0) if gpus else "cpu"
    card = card_name(device_name) if gpus else None
    base = save_random_base(cfg, os.path.join(tmp, "base-8b"), device)
    warmup = 4
    data = os.path.join(tmp, "gpu-8b-text.jsonl")
    write_text_data(data, (warmup + steps) * micro * max(gpus, 1) * seq)
    host_bytes = host_bytes or psutil.virtual_memory().total
    out: dict = {"device": device_name, "seq": seq, "micro": micro}
    for method in methods:
        storage = os.path.join(tmp, f"store-{method}")
        spec = method_spec(method, base, storage, data, warmup + steps, seq, micro, gpus,
                           "bf16" if gpus else "fp32")
        plan = _plan(spec, card)
        host_planned = sum(b for _, b in plan.memory.host)
        row: dict = {"planned_gpu": plan.memory.peak, "planned_host": host_planned}
        if method == "full-offload" and host_planned > 0.9 * host_bytes:
            row["skipped"] = (f"the planner puts the host at {host_planned / 2**30:.0f} GiB of its "
                              f"{host_bytes / 2**30:.0f} GiB")
            out[method] = row
            continue
        s = run_training(spec)
        if s.error is not None:
            raise RuntimeError(f"bench 8B {method} failed: {s.error}")
        rows = [h for h in s.history if "tokens_per_s" in h and h["step"] > warmup]
        row.update(tps=statistics.mean(h["tokens_per_s"] for h in rows),
                   gpu_peak=max((h.get("gpu_mem_peak_gib", 0.0) for h in s.history), default=0.0) * 2**30,
                   host_peak=max(h["host_mem_peak_gib"] for h in s.history if "host_mem_peak_gib" in h) * 2**30)
        out[method] = row
        shutil.rmtree(storage, ignore_errors=True)
    return out
