"""The training sections of `ftdist bench`, each ftdist against the bare libraries doing the same work:

1. throughput: tokens/s of `run_training` (Ray Train + DeepSpeed, 2 workers) / a bare DeepSpeed loop
   (torch.distributed gloo, 2 spawned processes, no Ray) on the same tiny Llama, data, batches and DeepSpeed dict.
2. memory: per-rank bytes of parameters + gradients + optimizer state held by the DeepSpeed engine under ZeRO-1/2/3
   / the ZeRO paper's per-rank model-state formula, fp32 variant, as `ftdist plan` computes it.
3. load: peak resident memory of a rank while ftdist loads a model under ZeRO-3 / the full model's size.
4. gpu: tokens/s and model FLOPs utilisation of `run_training` against the bare loop on one GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import threading
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama import modeling_llama  # noqa: F401  (imported before RSS is sampled: code is not model memory)

from ftdist.bench.common import BENCH_LLAMA, WORLD, batches, bench_spec, engine_for, spawn, task
from ftdist.plan.memory import model_state_bytes
from ftdist.plan.shape import ModelShape
from ftdist.spec import ModelSpec, spec_from_dict
from ftdist.train.driver import run_training
from ftdist.train.modeling import load_model

# fp32 on CPU: parameters 4 bytes, gradients 4 bytes, optimizer K = 12 bytes per parameter (DeepSpeed keeps an
# fp32 master copy of its partition even in fp32 mode, plus Adam's exp_avg and exp_avg_sq). The paper's
# mixed-precision numbers (2 + 2 + 12) become (4 + 4 + 12); the prediction is `ftdist plan`'s (model_state_bytes):
#   stage 1: 4Ψ + 4Ψ + 12Ψ/N    stage 2: 4Ψ + (4 + 12)Ψ/N    stage 3: (4 + 4 + 12)Ψ/N
FORMULA_TEXT = {1: "8Ψ+12Ψ/N", 2: "4Ψ+16Ψ/N", 3: "20Ψ/N"}

# ---------------------------------------------------------------------------------------------------------------
# 1. throughput


def _bare_loop(rank: int, spec_json: dict, warmup: int, steps: int) -> dict:
    """The plain DeepSpeed loop: forward, backward, step; no Ray, no metrics, no checkpoints."""
    spec, engine = engine_for(spec_json)
    next_batch = batches(spec, rank)
    tokens, t0 = 0, 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens = 0
        for _ in range(spec.grad_accum):
            host = next_batch()
            tokens += int(host["attention_mask"].sum())  # counted on the host: no device sync
            b = {k: v.to(engine.device) for k, v in host.items()}
            engine.backward(engine(**b).loss)
            engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return {"tokens": tokens, "seconds": time.perf_counter() - t0}


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def bench_throughput(steps: int, tmp: str, rounds: int = 2, workers: int = WORLD) -> dict:
    """Tokens/s of `ftdist train` and of the bare loop, the two taking turns `rounds` times (on a small shared machine
    a single pair swings by several percent); the ratio is of the means over the rounds. `workers` below WORLD
    keeps the global batch (more accumulation per worker)."""
    warmup, log_every = 5, 5
    total = warmup + steps
    bare_runs, ftdist_runs = [], []
    for i in range(rounds):
        spec = bench_spec(os.path.join(tmp, f"store-{workers}-{i}"), total, log_every=log_every, workers=workers)
        bare = spawn(_bare_loop, spec.model_dump(mode="json"), warmup, steps, world=workers)
        bare_runs.append(sum(r["tokens"] for r in bare) / max(r["seconds"] for r in bare))
        s = run_training(spec)
        if s.error:
            raise RuntimeError(s.error)
        # Windows after the warmup window, weighted by their step count (all windows are log_every steps).
        windows = [h["tokens_per_s"] for h in s.history if "tokens_per_s" in h and h["step"] > warmup]
        ftdist_runs.append(statistics.mean(windows))
    ftdist_tps, bare_tps = statistics.mean(ftdist_runs), statistics.mean(bare_runs)
    return {"ftdist_tps": ftdist_tps, "bare_tps": bare_tps, "ratio": ftdist_tps / bare_tps,
            "round_ratios": [f / b for f, b in zip(ftdist_runs, bare_runs)]}


# ---------------------------------------------------------------------------------------------------------------
# 2. model-state memory per rank


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def _tensors_in(obj: Any, depth: int = 0, skip=("ipg", "bucket", "buffer")):
    """Tensors reachable from a DeepSpeed optimizer's attributes (lists, dicts), skipping comm buckets."""
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, depth + 1, skip)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v, depth + 1, skip)
    elif depth == 0 or isinstance(obj, torch.optim.Optimizer):
        for k, v in vars(obj).items():
            if any(s in k.lower() for s in skip) or k in ("param_names", "param_groups_names"):
                continue
            yield from _tensors_in(v, depth + 1, skip)


def held_model_states(engine: Any) -> tuple[int, int]:
    """(bytes of params + grads + optimizer state the engine holds now, bytes of its comm buckets)."""
    params = list(engine.module.parameters())
    opt = engine.optimizer
    param_t = [getattr(p, "ds_tensor", p) if hasattr(p, "ds_tensor") else p.data for p in params]
    grads = [p.grad for p in params]
    inner = getattr(opt, "optimizer", opt)
    state = [t for s in inner.state.values() for t in s.values() if hasattr(t, "untyped_storage")]
    everything = _storage_bytes(param_t + grads + list(_tensors_in(opt)) + state)
    comm = _storage_bytes(list(_tensors_in(opt, skip=()))) - _storage_bytes(list(_tensors_in(opt)))
    return everything, comm


def _model_state(rank: int, spec_json: dict) -> dict:
    """Bytes of params + grads + optimizer state held on this rank once Adam's state exists (second step): the
    largest over the step's micro-batches, each measured after its backward (under ZeRO-1 a micro-batch inside an
    accumulation window holds every full gradient; at the boundary DeepSpeed has already reduced them into
    partitions)."""
    spec, engine = engine_for(spec_json)
    next_batch = batches(spec, rank)
    psi = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    measured = {"bytes": 0, "comm_buffers": 0}
    for step in range(2):
        for _ in range(spec.grad_accum):
            b = next_batch()
            engine.backward(engine(**b).loss)
            if step == 1:
                everything, comm = held_model_states(engine)
                measured = {"bytes": max(measured["bytes"], everything),
                            "comm_buffers": max(measured["comm_buffers"], comm)}
            engine.step()
    return {"psi": psi, **measured}


def bench_memory(tmp: str) -> list[dict]:
    rows = []
    for stage in (1, 2, 3):
        spec = bench_spec(os.path.join(tmp, "m"), 4, stage=stage)
        res = spawn(_model_state, spec.model_dump(mode="json"))
        psi = res[0]["psi"]
        measured = max(r["bytes"] for r in res)
        formula = sum(model_state_bytes(spec, ModelShape.from_config(BENCH_LLAMA), WORLD).values())
        rows.append({"stage": stage, "psi": psi, "measured": measured, "formula": formula,
                     "ratio": measured / formula, "comm_buffers": max(r["comm_buffers"] for r in res)})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 3. ZeRO-3 load peak RSS


def _rss() -> int:
    import psutil  # Ray's dependency, not ftdist's: only this section needs it

    return psutil.Process().memory_info().rss


def _load_peak(rank: int, model_dir: str, stage: int) -> dict:

    AutoConfig.from_pretrained(model_dir)
    spec = ModelSpec(name_or_path=model_dir, dtype="fp32")
    ds_cfg = {"train_batch_size": WORLD, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}}
    dist.barrier()
    base, peak, stop = _rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    model = load_model(spec, model_dir, ds_cfg)
    stop.set()
    th.join()
    peak[0] = max(peak[0], _rss())
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return {"peak_delta": peak[0] - base, "params": n}


def bench_load(tmp: str) -> list[dict]:
    cfg = dict(BENCH_LLAMA, vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
               num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048)
    mt = cfg.pop("model_type")
    model_dir = os.path.join(tmp, "load-model")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **cfg), dtype=torch.float32)
    model.save_pretrained(model_dir)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    res = spawn(_load_peak, model_dir, 3)
    peak = max(r["peak_delta"] for r in res)
    return [{"stage": 3, "model_bytes": size, "peak": peak, "ratio": peak / size, "params": res[0]["params"]}]


# ---------------------------------------------------------------------------------------------------------------
# 4. GPU: a ~1.1B-parameter Llama built from a config, bf16, one GPU


GPU_LLAMA = dict(BENCH_LLAMA, vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
# Dense bf16 peak of the card (tensor cores, no sparsity), by device name.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}


def gpu_spec(storage: str, data_path: str, steps: int, seq: int, micro_batch: int, name: str = "bench-gpu",
             compile: bool = False, liger: bool = False, global_batch: Optional[int] = None):
    return spec_from_dict({
        "name": name,
        "model": {"from_config": GPU_LLAMA, "tokenizer": task().tokenizer, "dtype": "bf16",
                  "attn_implementation": "sdpa", "compile": compile, "use_liger_kernel": liger},
        "data": {"train": data_path, "format": "text", "max_length": seq, "packing": True},
        "zero": {"stage": 2},
        "optim": {"lr": 1e-4, "micro_batch_size": micro_batch, "global_batch_size": global_batch or micro_batch,
                  "max_steps": steps, "schedule": "constant", "seed": 1},
        "resources": {"num_workers": 1, "cpus_per_worker": 4, "gpus_per_worker": 1, "max_failures": 0},
        "checkpoint": {"storage": storage, "every_n_steps": None},
        "logging": {"every_n_steps": 5},
        "export": {"enabled": False},
    })


def write_text_data(path: str, tokens_wanted: int) -> None:
    """Plain-text training data from the quickstart examples, repeated until it holds enough tokens for the run."""
    rows = [json.loads(line) for line in open(task().train)]
    texts = [r["prompt"] + r["completion"] for r in rows]
    chars_wanted = tokens_wanted * 4  # generous: this tokenizer makes more than one token per 4 characters
    with open(path, "w") as fh:
        written = 0
        while written < chars_wanted:
            for i in range(0, len(texts), 50):
                line = "\n".join(texts[i:i + 50])
                fh.write(json.dumps({"text": line}) + "\n")
                written += len(line)


def sum_params(cfg: dict) -> int:
    """All parameters of the benchmark's Llama (the planner's count: tested equal to transformers')."""
    return ModelShape.from_config(cfg).params()


def model_flops_per_token(cfg: dict, seq: int) -> float:
    """Training FLOPs per token (PaLM appendix B), as `ftdist plan` computes them."""
    return ModelShape.from_config(cfg).flops_per_token(seq)


def _bare_gpu(rank: int, spec_json: dict, warmup: int, steps: int) -> dict:
    res = _bare_loop(rank, spec_json, warmup, steps)
    res["device"] = torch.cuda.get_device_name()
    res["peak_mem"] = torch.cuda.max_memory_allocated()
    return res


GPU_VARIANTS = ("eager", "compile", "liger")


def bench_gpu(steps: int, tmp: str, seq: int = 2048, micro_batch: int = 8, variant: str = "eager",
              global_batch: Optional[int] = None) -> dict:
    compile, liger = variant == "compile", variant == "liger"
    warmup = 10 if compile else 5  # compiled: the first steps also compile (and recompile once for the backward)
    total = warmup + steps
    data = os.path.join(tmp, "gpu-text.jsonl")
    spec = gpu_spec(os.path.join(tmp, "gpu-store"), data, total, seq, micro_batch, name="bench-gpu-" + variant,
                    compile=compile, liger=liger, global_batch=global_batch)
    write_text_data(data, total * spec.optim.global_batch_size * seq)
    bare = spawn(_bare_gpu, spec.model_dump(mode="json"), warmup, steps, world=1, backend="nccl")[0]
    bare_tps = bare["tokens"] / bare["seconds"]
    s = run_training(spec)
    if s.error:
        raise RuntimeError(s.error)
    windows = [h["tokens_per_s"] for h in s.history if "tokens_per_s" in h and h["step"] > warmup]
    ftdist_tps = statistics.mean(windows)
    shutil.rmtree(os.path.join(tmp, "gpu-store"), ignore_errors=True)  # the final checkpoint: ~16 bytes/param
    flops = model_flops_per_token(GPU_LLAMA, seq)
    name = bare["device"]
    peak = next((v for k, v in PEAK_BF16.items() if k in name.split() or f" {k} " in f" {name} "), None)
    return {"ftdist_tps": ftdist_tps, "bare_tps": bare_tps, "ratio": ftdist_tps / bare_tps, "device": name,
            "flops_per_token": flops, "peak": peak, "peak_mem": bare["peak_mem"], "seq": seq, "mb": micro_batch,
            "gb": spec.optim.global_batch_size,
            "ftdist_mfu": ftdist_tps * flops / peak if peak else None,
            "bare_mfu": bare_tps * flops / peak if peak else None}
