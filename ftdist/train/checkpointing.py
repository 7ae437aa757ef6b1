"""A rank's side of checkpoints: save its DeepSpeed shard and RNG state locally, hand the folder to
`ray.train.report` with ftdist's uploader (async by default), commit from rank 0; on (re)start, choose and fetch the
latest committed checkpoint (only this rank's files) and restore engine, RNG and trainer state."""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
import threading
from typing import Any, Optional

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from pyarrow import fs as pafs
from ray.train import CheckpointUploadMode

from ftdist.spec import JobSpec
from ftdist.storage.checkpoints import CheckpointError, CheckpointStore, checkpoint_name
from ftdist.storage.manifest import CheckpointMeta
from ftdist.storage.store import TransferOptions
from ftdist.storage.uri import S3_SCHEME
from ftdist.train.contracts import STATE_FILE, TrainState

HF_DIR = "hf"
"""Inside each checkpoint: the base config, tokenizer and (LoRA) adapter config, so it exports on its own."""


def spec_hash(spec: JobSpec) -> str:
    body = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def checkpoint_meta(spec: JobSpec, step: int, metrics: dict, worker_seconds: float = 0.0,
                    gpu_seconds: float = 0.0) -> CheckpointMeta:
    """The trainer's part of a checkpoint's manifest. The job spec is hashed, not copied."""
    return CheckpointMeta(
        step=step, zero_stage=spec.zero.stage, method=spec.method, job_name=spec.name, spec_sha256=spec_hash(spec),
        base_model=spec.model.name_or_path,
        merge_on_export=spec.method == "lora" and spec.lora.merge_on_export,
        export_max_shard_size=spec.export.max_shard_size,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        worker_hours=worker_seconds / 3600, gpu_hours=gpu_seconds / 3600,
    )


def save_per_worker(engine: Any, local_dir: str, state: TrainState, rank: int) -> None:
    """Each rank writes its own DeepSpeed shard files (and RNG state) under local_dir/<tag>/; rank 0 the state."""
    engine.save_checkpoint(local_dir, tag=state.tag, save_latest=True)
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(rng, os.path.join(local_dir, state.tag, f"rng_state_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(local_dir, STATE_FILE), "w") as fh:
            fh.write(state.model_dump_json(indent=1))


def read_state(ckpt_dir: str) -> TrainState:
    with open(os.path.join(ckpt_dir, STATE_FILE)) as fh:
        return TrainState.model_validate_json(fh.read())


def restore_per_worker(engine: Any, ckpt_dir: str, rank: int) -> TrainState:
    """Load this rank's DeepSpeed shard + RNG; return the trainer state (step, data position, metrics)."""
    state = read_state(ckpt_dir)
    load_path, _ = engine.load_checkpoint(ckpt_dir, tag=state.tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint {state.tag} in {ckpt_dir}")
    rng_file = os.path.join(ckpt_dir, state.tag, f"rng_state_rank{rank}.pt")
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


def _log0(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


class RankCheckpointer:
    """This rank's side of checkpointing through Ray Train: save the DeepSpeed shard locally, hand it to
    `ray.train.report` with ftdist's uploader as `checkpoint_upload_fn` (async by default), commit with a manifest
    from rank 0, and on (re)start pick and fetch the latest committed checkpoint (only this rank's files)."""

    def __init__(self, spec: JobSpec, rank: int, world: int):
        self.spec, self.rank, self.world = spec, rank, world
        storage = ray.train.get_context().get_storage()
        self.fs = storage.storage_filesystem
        self.exp_path = storage.experiment_fs_path.rstrip("/")
        on_s3 = isinstance(self.fs, pafs.S3FileSystem)
        self.job_uri = f"{S3_SCHEME}{self.exp_path}" if on_s3 else self.exp_path
        self.store = CheckpointStore(self.job_uri, TransferOptions.from_spec(spec.checkpoint))
        self._idle = threading.Event()
        self._idle.set()
        self._meta: Optional[CheckpointMeta] = None

    # --- restart ------------------------------------------------------------------------------------------------

    def resume_point(self, ray_checkpoint: Any) -> Optional[str]:
        """Rank 0 chooses (Ray's latest checkpoint if it is committed and complete, else the newest committed one
        in storage) and removes uncommitted leftovers of a crashed attempt; every rank gets the same answer."""
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
                if m.world_size != self.world:
                    choice[1] = (f"{self.store.store.child(choice[0])} was written by {m.world_size} workers and "
                                 f"this run has {self.world}: set resources.num_workers={m.world_size} to resume, "
                                 "or export it (ftdist export) and start a new job from the exported model")
        dist.broadcast_object_list(choice, src=0)
        if choice[1]:
            raise CheckpointError(choice[1])
        return choice[0]

    def fetch(self, name: str) -> str:
        dest = tempfile.mkdtemp(prefix=f"ftdist-restore-r{self.rank}-")
        self.store.fetch_for_rank(name, self.rank, dest)
        return dest

    # --- saving -------------------------------------------------------------------------------------------------

    def save(self, engine: Any, state: TrainState, tokenizer: Any) -> None:
        self._idle.wait()  # at most one upload in flight per rank: bounded local disk, no piling up
        tmp = tempfile.mkdtemp(prefix=f"ftdist-ckpt-r{self.rank}-")
        save_per_worker(engine, tmp, state, self.rank)
        if self.rank == 0:
            save_hf_metadata(engine.module, tokenizer, os.path.join(tmp, HF_DIR))
        self.publish(tmp, state.step, state.metrics, state.worker_seconds, state.gpu_seconds)

    def publish(self, local_dir: str, step: int, metrics: dict, worker_seconds: float = 0.0,
                gpu_seconds: float = 0.0) -> None:
        """Hand a locally saved checkpoint folder to Ray Train with ftdist's uploader; async by default. The
        folder is deleted once uploaded."""
        self._idle.wait()
        self._meta = checkpoint_meta(self.spec, step, metrics, worker_seconds, gpu_seconds)
        self._idle.clear()
        mode = CheckpointUploadMode.ASYNC if self.spec.checkpoint.upload.mode == "async" else CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local_dir),
                         checkpoint_dir_name=checkpoint_name(step), checkpoint_upload_mode=mode,
                         checkpoint_upload_fn=self._upload, delete_local_checkpoint_after_upload=True)

    def _upload(self, checkpoint: Any, dir_name: str) -> Any:
        """Runs in Ray's upload thread (ASYNC) or inline (SYNC): upload this rank's files; rank 0 commits."""
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
