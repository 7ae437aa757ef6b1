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


def save_hf_metadata(module: Any, tokenizer: Any, out_dir: str) -> None:
    """config.json (of the base model), tokenizer files and, for LoRA, adapter_config.json into out_dir, so a
    checkpoint can be exported on its own later (`ftdist export`)."""
    os.makedirs(out_dir, exist_ok=True)
    base = module.get_base_model() if hasattr(module, "peft_config") else module
    base.config.save_pretrained(out_dir)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if hasattr(module, "peft_config"):
        module.peft_config["default"].save_pretrained(out_dir)


class RankCheckpointer:
    """This rank's side of checkpointing through Ray Train: save the DeepSpeed shard locally, hand it to
    `ray.train.report` with ftdist's uploader as `checkpoint_upload_fn` (async by default), commit with a manifest
    from rank 0, and on (re)start pick and fetch the latest committed checkpoint (only this rank's files)."""

    def __init__(self, spec: Any, rank: int, world: int):
        import threading

        import ray.train
        from pyarrow import fs as pafs

        from ftdist.storage.checkpoints import CheckpointStore
        from ftdist.storage.store import TransferOptions

        self.spec, self.rank, self.world = spec, rank, world
        storage = ray.train.get_context().get_storage()
        self.fs = storage.storage_filesystem
        self.exp_path = storage.experiment_fs_path.rstrip("/")
        s3 = isinstance(self.fs, pafs.S3FileSystem)
        self.job_uri = f"s3://{self.exp_path}" if s3 else self.exp_path
        self.store = CheckpointStore(self.job_uri, TransferOptions.from_spec(spec.checkpoint))
        self._idle = threading.Event()
        self._idle.set()
        self._meta: dict = {}

    # --- restart ------------------------------------------------------------------------------------------------

    def resume_point(self, ray_checkpoint: Any) -> Optional[str]:
        """Rank 0 chooses (Ray's latest checkpoint if it is committed and complete, else the newest committed one
        in storage) and removes uncommitted leftovers of a crashed attempt; every rank gets the same answer."""
        import torch.distributed as dist

        from ftdist.storage.checkpoints import CheckpointError

        choice: list = [None, None]
        if self.rank == 0:
            removed = self.store.remove_uncommitted()
            if removed:
                _log0(f"[ftdist] removed uncommitted checkpoint folders (crash during upload): {', '.join(removed)}")
            name = os.path.basename(ray_checkpoint.path.rstrip("/")) if ray_checkpoint is not None else None
            if name and not self.store.problems(name):
                choice[0] = name
            else:
                latest = self.store.latest_valid()
                choice[0] = latest.name if latest else None
                if name and latest and latest.name != name:
                    _log0(f"[ftdist] Ray's latest checkpoint {name} is incomplete; using {latest.name}")
            if choice[0]:
                m = self.store.read_manifest(choice[0])
                if m["world_size"] != self.world:
                    choice[1] = (f"{self.store.store.child(choice[0])} was written by {m['world_size']} workers and "
                                 f"this run has {self.world}: set resources.num_workers={m['world_size']} to resume, "
                                 "or export it (ftdist export) and start a new job from the exported model")
        dist.broadcast_object_list(choice, src=0)
        if choice[1]:
            raise CheckpointError(choice[1])
        return choice[0]

    def fetch(self, name: str) -> str:
        import tempfile

        dest = tempfile.mkdtemp(prefix=f"ftdist-restore-r{self.rank}-")
        self.store.fetch_for_rank(name, self.rank, dest)
        return dest

    # --- saving -------------------------------------------------------------------------------------------------

    def save(self, engine: Any, step: int, state: dict, metrics: dict, tokenizer: Any) -> None:
        import tempfile

        self._idle.wait()  # at most one upload in flight per rank: bounded local disk, no piling up
        tmp = tempfile.mkdtemp(prefix=f"ftdist-ckpt-r{self.rank}-")
        save_per_worker(engine, tmp, step, state, self.rank)
        if self.rank == 0:
            save_hf_metadata(engine.module, tokenizer, os.path.join(tmp, "hf"))
        self.publish(tmp, step, metrics)

    def publish(self, local_dir: str, step: int, metrics: dict) -> None:
        """Hand a locally saved checkpoint folder to Ray Train with ftdist's uploader; async by default. The
        folder is deleted once uploaded."""
        import ray.train
        from ray.train import CheckpointUploadMode

        from ftdist.storage.checkpoints import checkpoint_name, manifest_meta

        self._idle.wait()
        self._meta = manifest_meta(self.spec, step, metrics)
        self._idle.clear()
        mode = CheckpointUploadMode.ASYNC if self.spec.checkpoint.upload.mode == "async" else CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local_dir),
                         checkpoint_dir_name=checkpoint_name(step), checkpoint_upload_mode=mode,
                         checkpoint_upload_fn=self._upload, delete_local_checkpoint_after_upload=True)

    def _upload(self, checkpoint: Any, dir_name: str) -> Any:
        """Runs in Ray's upload thread (ASYNC) or inline (SYNC): upload this rank's files; rank 0 commits."""
        import ray.train

        try:
            self.store.upload_rank(checkpoint.path, dir_name, self.rank)
            if self.rank == 0:
                c = self.spec.checkpoint
                self.store.commit(dir_name, self.world, self._meta, c.upload.commit_timeout_s)
                if c.keep_last:
                    self.store.apply_retention(c.keep_last, c.keep_best_by, c.best_mode)
            return ray.train.Checkpoint(path=f"{self.exp_path}/{dir_name}", filesystem=self.fs)
        finally:
            self._idle.set()

    def drain(self) -> None:
        self._idle.wait()


def _log0(msg: str) -> None:
    import sys

    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


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


def export_in_workers(spec: Any) -> bool:
    """ZeRO 0-2: the workers write the end-of-job export from the live engine. ZeRO-3: never gather the whole model
    in one process; the driver streams the export from the final checkpoint instead (as `ftdist export` does)."""
    return spec.zero.stage != 3


def export_per_worker(engine: Any, spec: Any, tokenizer: Any, out_dir: str) -> Optional[dict]:
    """All ranks call this (ZeRO-3 gathers are collective); rank 0 writes out_dir. Returns {kind: path} on rank 0."""
    import torch.distributed as dist

    from ftdist.export import merged_lora

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
                merged = dict(merged_lora(lambda want: ((k, v) for k, v in full.items() if want(k)),
                                          peft_cfg.to_dict()))
                _save_hf_folder(merged, base.config, merged_dir,
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
