"""What the benchmark sections share: the benchmark model and task, the job spec every CPU section starts from, and
a bare multi-process launcher (torch.distributed without Ray) for the reference loops."""

from __future__ import annotations

import os
import tempfile
import traceback

import deepspeed
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ftdist.bench.task import TaskFiles, write_task
from ftdist.spec import JobSpec, spec_from_dict
from ftdist.train.sampling import ShardedLoader
from ftdist.train.ds_config import to_deepspeed
from ftdist.train.locations import load_tokenizer
from ftdist.train.modeling import apply_kernels, apply_method, load_model
from ftdist.train.objectives import objective_for, splits_for
from ftdist.train.optim import torch_adamw
from ftdist.train.ray_runtime import free_port
from ftdist.train.worker import skip_inference_comm_op


def task() -> TaskFiles:
    """The benchmark's task files (made once per machine in the temp folder)."""
    return write_task(os.path.join(tempfile.gettempdir(), "ftdist-bench-task"))


BENCH_LLAMA = {
    "model_type": "llama", "vocab_size": 320, "hidden_size": 256, "intermediate_size": 688,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 64,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
WORLD = 2


def bench_spec(storage: str, steps: int, stage: int = 2, name: str = "bench", log_every: int = 5,
               workers: int = WORLD) -> JobSpec:
    files = task()
    return spec_from_dict({
        "name": name,
        "model": {"from_config": BENCH_LLAMA, "tokenizer": files.tokenizer, "dtype": "fp32"},
        "data": {"train": files.train, "format": "prompt_completion", "max_length": 48},
        # Persistence threshold 0: every tensor is partitioned under ZeRO-3, as the paper's formula assumes. (The
        # default keeps tensors under 100k elements whole on each rank: all of this tiny model's, none of a 7B's.)
        "zero": {"stage": stage, "reduce_bucket_size": 2_000_000, "allgather_bucket_size": 2_000_000,
                 "stage3_param_persistence_threshold": 0},
        "optim": {"lr": 1e-3, "micro_batch_size": 16, "global_batch_size": 64, "max_steps": steps,
                  "schedule": "constant", "seed": 1},
        "resources": {"num_workers": workers, "cpus_per_worker": 1, "max_failures": 0},
        "checkpoint": {"storage": storage, "every_n_steps": None},
        "logging": {"every_n_steps": log_every},
        "export": {"enabled": False},
    })



def spawn(fn, *args, world: int = WORLD, backend: str = "gloo") -> list:
    """Run fn(rank, *args) in `world` fresh processes with a torch process group (gloo on CPU, nccl on GPUs);
    return the rank results."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, backend, port, q, args)) for r in range(world)]
    for p in procs:
        p.start()
    out = [q.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errs = [o for o in out if isinstance(o, str)]
    if errs:
        raise RuntimeError(errs[0])
    return sorted(out, key=lambda o: o["rank"])


def _entry(fn, rank, world, backend, port, q, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), TOKENIZERS_PARALLELISM="false")
    if backend == "gloo":
        os.environ["DS_ACCELERATOR"] = "cpu"
    elif os.environ.get("DS_ACCELERATOR") == "cpu":
        del os.environ["DS_ACCELERATOR"]
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(1)
        dist.init_process_group(backend, rank=rank, world_size=world)
        if backend == "gloo":
            skip_inference_comm_op()  # as ftdist's CPU workers do: like for like
        deepspeed.init_distributed(dist_backend=backend)
        res = fn(rank, *args)
        res["rank"] = rank
        q.put(res)
        dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # report to the parent instead of hanging it
        q.put(f"rank {rank}: {e.__class__.__name__}: {e}\n{traceback.format_exc()[-2000:]}")


def engine_for(spec_json: dict):
    """(spec, DeepSpeed engine) of a bench job in a process of spawn()."""
    spec = spec_from_dict(spec_json)
    ds_cfg = to_deepspeed(spec, dist.get_world_size())
    model = apply_method(apply_kernels(load_model(spec.model, None, ds_cfg), spec), spec)  # as the worker does
    opt = torch_adamw(model, spec)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg, dist_init_required=False)
    if spec.model.compile:
        engine.compile()
    return spec, engine


def batches(spec: JobSpec, rank: int):
    """A function returning the rank's next collated micro-batch, as ftdist's loader hands them out."""
    tok = load_tokenizer(spec.model.tokenizer_path)
    splits = splits_for(spec, tok)
    it = ShardedLoader.for_job(spec, [splits.train], rank, dist.get_world_size()).micro_batches(0)
    collate = objective_for(spec).collate
    return lambda: collate(next(it), tok.pad_token_id)
