"""A rank's side of checkpoints: save its DeepSpeed shard and RNG state locally, hand the folder to
`ray.train.report` with ftdist's uploader (async by default), commit from rank 0; on (re)start, choose and fetch the
latest committed checkpoint (only this rank's files) and restore engine, RNG and trainer state."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from pyarrow import fs as pafs
from ray.train import CheckpointUploadMode

from ftdist.errors import last_line
from ftdist.spec import JobSpec
from ftdist.storage.checkpoints import CheckpointError, CheckpointStore, checkpoint_name, is_shared, rank_of
from ftdist.storage.lease import GroupFence, Lease
from ftdist.storage.manifest import CheckpointMeta, Manifest
from ftdist.storage.store import TransferOptions
from ftdist.storage.uri import S3_SCHEME
from ftdist.train.contracts import FROZEN_FILE, STATE_FILE, TrainState
from ftdist.train.export import export_records
from ftdist.train.universal import UniversalCheckpoints, needs_conversion, node_dir

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
        base_model=spec.model.name_or_path, base_revision=spec.model.revision,
        frozen_excluded=spec.checkpoints_leave_frozen_out,
        merge_on_export=spec.method == "lora" and spec.lora.merge_on_export,
        export_max_shard_size=spec.export.max_shard_size,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        worker_hours=worker_seconds / 3600, gpu_hours=gpu_seconds / 3600,
    )


def save_per_worker(engine: Any, local_dir: str, state: TrainState, rank: int, exclude_frozen: bool = False) -> None:
    """Each rank writes its own DeepSpeed shard files (and RNG state) under local_dir/<tag>/; rank 0 the state."""
    engine.save_checkpoint(local_dir, tag=state.tag, save_latest=True, exclude_frozen_parameters=exclude_frozen)
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


def unshare_step_counters(optimizer: Any) -> None:
    """DeepSpeed's universal-checkpoint load gives every parameter group the same `step` tensor object. torch's Adam
    increments its step in place, once per group: ZeRO-3 steps each group apart, so a shared counter advanced twice a
    step and the second group's bias correction ran one step ahead (measured: 2.6e-5 relative loss difference after
    one step of a 2 -> 3 worker resize, 0 after this). One counter per group, as a same-size load has."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for st in getattr(inner, "state", {}).values():
        step = st.get("step") if isinstance(st, dict) else None
        if isinstance(step, torch.Tensor):
            st["step"] = step.clone()


def restore_per_worker(engine: Any, ckpt_dir: str, rank: int, frozen_excluded: bool = False) -> TrainState:
    """Load this rank's DeepSpeed shard + RNG; return the trainer state (step, data position, metrics).
    `frozen_excluded`: the checkpoint has only the trained parameters; the frozen ones stay as loaded from the base."""
    state = read_state(ckpt_dir)
    load_path, _ = engine.load_checkpoint(ckpt_dir, tag=state.tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True, load_module_strict=not frozen_excluded)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint {state.tag} in {ckpt_dir}")
    unshare_step_counters(engine.optimizer)
    rng_file = os.path.join(ckpt_dir, state.tag, f"rng_state_rank{rank}.pt")
    if os.path.exists(rng_file):
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def frozen_shapes(module: Any) -> dict[str, list[int]]:
    """{name: shape} of the module's frozen parameters (whole shapes, also when ZeRO-3 partitioned them)."""
    return {n: list(full_shape(p)) for n, p in module.named_parameters() if not p.requires_grad}


def full_shape(p: Any) -> torch.Size:
    """The shape of the tensor a parameter stands for: whole under ZeRO-3, unpacked for a 4-bit weight (two values
    a byte)."""
    quant_state = getattr(p, "quant_state", None)
    return quant_state.shape if quant_state is not None else getattr(p, "ds_shape", p.shape)


def save_hf_metadata(module: Any, tokenizer: Any, out_dir: str, exclude_frozen: bool = False) -> None:
    """config.json (of the base model), tokenizer files and, for LoRA, adapter_config.json into out_dir, so a
    checkpoint can be exported on its own later (`ftdist export`); with `exclude_frozen`, the frozen parameters'
    names and shapes (FROZEN_FILE) that the export takes from the base."""
    os.makedirs(out_dir, exist_ok=True)
    if exclude_frozen:
        with open(os.path.join(out_dir, FROZEN_FILE), "w") as fh:
            json.dump(frozen_shapes(module), fh)
    base = module.get_base_model() if hasattr(module, "peft_config") else module
    base.config.save_pretrained(out_dir)
    _drop_quantization(os.path.join(out_dir, "config.json"))
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if hasattr(module, "peft_config"):
        module.peft_config["default"].save_pretrained(out_dir)


def _drop_quantization(config_file: str) -> None:
    """A QLoRA base was loaded in 4-bit (its config says so); the checkpoint's config describes the model the export
    writes: the full-precision base with the adapter merged in, which loads without bitsandbytes."""
    with open(config_file) as fh:
        config = json.load(fh)
    if config.pop("quantization_config", None) is not None:
        with open(config_file, "w") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)


def link_tree(src: str, dest: str) -> None:
    """Symbolic links in dest to every file under src, at the same relative paths (the node's shared files beside a
    rank's own)."""
    for d, _, files in os.walk(src):
        rel = os.path.relpath(d, src)
        os.makedirs(os.path.join(dest, rel), exist_ok=True)
        for f in files:
            os.symlink(os.path.join(d, f), os.path.join(dest, rel, f))


@dataclass(frozen=True)
class Resume:
    """The committed checkpoint a (re)start continues from."""

    name: str
    manifest: Manifest


def _log0(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


class RankCheckpointer:
    """This rank's side of checkpointing through Ray Train: save the DeepSpeed shard locally, hand it to
    `ray.train.report` with ftdist's uploader as `checkpoint_upload_fn` (async by default), commit with a manifest
    from rank 0, and on (re)start pick and fetch the latest committed checkpoint (only this rank's files)."""

    def __init__(self, spec: JobSpec, rank: int, world: int, local_rank: int = 0, lease_generation: int = 0):
        self.spec, self.rank, self.world, self.local_rank = spec, rank, world, local_rank
        self.resized: Optional[str] = None
        """After fetch(): how a checkpoint of another world size was made loadable (for the resume line)."""
        storage = ray.train.get_context().get_storage()
        self.fs = storage.storage_filesystem
        self.exp_path = storage.experiment_fs_path.rstrip("/")
        on_s3 = isinstance(self.fs, pafs.S3FileSystem)
        self.job_uri = f"{S3_SCHEME}{self.exp_path}" if on_s3 else self.exp_path
        self.store = CheckpointStore(self.job_uri, TransferOptions.from_spec(spec.checkpoint))
        # Commits and deletions are fenced by the driver's lease generation (a stalled, taken-over attempt's workers
        # cannot write over the new attempt's checkpoints) and by this worker group's number within it (a group Ray
        # Train replaced cannot either: GroupFence).
        self.group = GroupFence(Lease(self.store.store, self.job_uri, generation=lease_generation))
        self.fence = self.group.check
        self._idle = threading.Event()
        self._idle.set()
        self._meta: Optional[CheckpointMeta] = None

    # --- restart ------------------------------------------------------------------------------------------------

    def resume_point(self, ray_checkpoint: Any) -> Optional[Resume]:
        """Rank 0 claims this worker group's fence number, then chooses the newest committed and complete checkpoint
        (Ray's latest, or a newer one in storage: committed by a group that was lost before Ray heard of it) and
        removes uncommitted leftovers of a crashed attempt; every rank gets the same answer."""
        choice: list = [None, 0]
        if self.rank == 0:
            choice[1] = self.group.claim()
            removed = self.store.remove_uncommitted()
            if removed:
                _log0(f"[ftdist] removed uncommitted checkpoint folders (crash during upload): {', '.join(removed)}")
            name = os.path.basename(ray_checkpoint.path.rstrip("/")) if ray_checkpoint is not None else None
            latest = self.store.latest_valid()
            chosen = latest.name if latest else None
            if name and name != chosen and self.store.problems(name):
                _log0(f"[ftdist] Ray's latest checkpoint {name} is incomplete; using {chosen}")
            if chosen:
                choice[0] = Resume(chosen, self.store.read_manifest(chosen))
        dist.broadcast_object_list(choice, src=0)
        self.group.number = choice[1]
        return choice[0]

    def fetch(self, resume: Resume) -> str:
        """A local folder with what this rank loads, each file hash-verified. At the checkpoint's world size: its own
        shard files, beside the shared files (trainer state, ZeRO 0-2 model weights, config) that one rank per node
        downloads for the node. At another world size: the checkpoint's universal form (converted by rank 0 if it
        is not stored yet), one download per node."""
        node = node_dir(self.job_uri, resume.name)
        if needs_conversion(resume.manifest, self.world):
            self._universal(resume, node)
            return node
        self._per_node(lambda: self.store.fetch(resume.name, node, is_shared, show=self.rank == 0),
                       f"downloading {resume.name}")
        dest = tempfile.mkdtemp(prefix=f"ftdist-restore-r{self.rank}-")
        self.store.fetch(resume.name, dest, lambda path: rank_of(path) == self.rank)
        link_tree(node, dest)
        return dest

    def _universal(self, resume: Resume, node: str) -> None:
        universal = UniversalCheckpoints(self.store)
        outcome: list = [None]
        if self.rank == 0:
            t0 = time.perf_counter()
            try:
                if universal.stored(resume.name) is None:
                    _log0(f"[ftdist] {resume.name} was written by {resume.manifest.world_size} workers and this run "
                          f"has {self.world}: converting it to DeepSpeed's universal checkpoint format")
                    shutil.rmtree(node, ignore_errors=True)
                    size = universal.create(resume.name, max(1, int(self.spec.resources.cpus_per_worker)), node)
                    outcome[0] = ("converted", f"converted to the universal format in {time.perf_counter() - t0:.1f} "
                                               f"s ({size / 1e6:.1f} MB, stored beside it for later resizes)")
                else:
                    outcome[0] = ("stored", "its stored universal form reused")
            except Exception as e:  # noqa: BLE001  (every rank raises the same one-line error)
                outcome[0] = ("failed", last_line(e, 400))
        dist.broadcast_object_list(outcome, src=0)
        how, what = outcome[0]
        if how == "failed":
            raise CheckpointError(f"cannot resume {resume.name} on {self.world} workers: {what}")
        self.resized = what
        converted_here = self.rank == 0 and how == "converted"  # rank 0's node has the folder it converted into
        self._per_node(None if converted_here else lambda: universal.fetch(resume.name, node),
                       f"downloading the universal form of {resume.name}")

    def _per_node(self, download: Optional[Callable[[], Any]], what: str) -> None:
        """Local rank 0 of each node runs `download` into the node's shared folder; every rank learns whether all
        of them succeeded (an all-reduce, not a bare barrier: a failed download must not leave the others waiting)."""
        error = ""
        if self.local_rank == 0 and download is not None:
            try:
                download()
            except Exception as e:  # noqa: BLE001
                error = last_line(e, 400)
        flag = torch.tensor([0.0 if error else 1.0],
                            device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if error:
            raise CheckpointError(f"{what}: {error}")
        if flag.item() < 1:
            raise CheckpointError(f"{what} failed on another node (see its rank's error)")

    def release(self, local: str, resume: Resume) -> None:
        """Remove the restored folders once every rank of the node has loaded from them."""
        dist.barrier()
        node = node_dir(self.job_uri, resume.name)
        if local != node:
            shutil.rmtree(local, ignore_errors=True)
        if self.local_rank == 0:
            shutil.rmtree(node, ignore_errors=True)

    # --- saving -------------------------------------------------------------------------------------------------

    def save(self, engine: Any, state: TrainState, tokenizer: Any) -> None:
        self._idle.wait()  # at most one upload in flight per rank: bounded local disk, no piling up
        tmp = tempfile.mkdtemp(prefix=f"ftdist-ckpt-r{self.rank}-")
        exclude = self.spec.checkpoints_leave_frozen_out
        save_per_worker(engine, tmp, state, self.rank, exclude)
        if self.rank == 0:
            save_hf_metadata(engine.module, tokenizer, os.path.join(tmp, HF_DIR), exclude)
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
            # ZeRO-3: the manifest lists the master weights' ranges of each optimizer file (an export reads those).
            records = export_records if self.spec.zero.stage == 3 else None
            self.store.upload_rank(checkpoint.path, dir_name, self.rank, records)
            if self.rank == 0:
                c = self.spec.checkpoint
                self.store.commit(dir_name, self.world, self._meta, c.upload.commit_timeout_s, fence=self.fence)
                if c.keep_last:
                    self.store.apply_retention(c.keep_last, c.keep_best_by, c.best_mode, fence=self.fence)
            return ray.train.Checkpoint(path=f"{self.exp_path}/{dir_name}", filesystem=self.fs)
        finally:
            self._idle.set()

    def drain(self) -> None:
        self._idle.wait()
