"""Resuming on a different number of workers: a rank-sharded DeepSpeed checkpoint converted to DeepSpeed's universal
format (one folder per parameter with its fp32 weights and Adam moments, any data-parallel size loads it), stored
beside the checkpoint it came from with its own manifest, so a second resize downloads it instead of converting
again:

    <job>/step_00000040/universal/<tag>/zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt, optimizer_state.pt
    <job>/step_00000040/universal/<tag>/*model_states.pt, rng_state_rank*.pt
    <job>/step_00000040/universal/ftdist_state.json
    <job>/step_00000040/universal/ftdist_manifest.json      (its commit marker, as a checkpoint's)

The conversion is DeepSpeed's own `ds_to_universal` (the reference implementation of the format, kept in step with
ZeRO's partitioning), run as a child process: it extracts each old rank's optimizer shard into per-parameter
fragments and merges them one parameter at a time in a process pool, so no process holds the whole model, and its
memory goes when it exits instead of staying in a training worker. ZeRO-0 checkpoints need no conversion (their
optimizer state is whole on every rank).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

from ftdist.errors import last_line
from ftdist.storage.checkpoints import CheckpointError, CheckpointStore
from ftdist.storage.manifest import CheckpointMeta, Manifest
from ftdist.train.contracts import STATE_FILE

UNIVERSAL = "universal"
"""The converted form's folder inside a checkpoint."""
_RNG_PREFIX = "rng_state_rank"


def needs_conversion(manifest: Manifest, world: int) -> bool:
    """A checkpoint of another world size is loaded from its universal form, except under ZeRO-0 (replicated)."""
    return manifest.world_size != world and manifest.zero_stage > 0


def wanted_for_conversion(path: str) -> bool:
    """Everything of the original but its Hugging Face metadata (the universal form does not carry it)."""
    return not path.startswith("hf/")


def convert(src_tag_dir: str, out_tag_dir: str, processes: int) -> None:
    """DeepSpeed's ds_to_universal on one checkpoint tag folder, in a child process with `processes` extraction
    and merge workers. Raises CheckpointError with the converter's last line on failure."""
    os.makedirs(os.path.dirname(out_tag_dir), exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src_tag_dir,
           "--output_folder", out_tag_dir, "--num_extract_workers", str(processes),
           "--num_merge_workers", str(processes),
           # ftdist saves no Megatron-style universal_checkpoint_info; the converter then adds the default one.
           "--inject_missing_state"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckpointError(f"converting {src_tag_dir} to DeepSpeed's universal format failed: "
                              f"{last_line(done.stderr.strip() or done.stdout.strip(), 400)}")
    # The RNG states travel as they are: new rank r < the old world size continues old rank r's streams.
    for f in os.listdir(src_tag_dir):
        if f.startswith(_RNG_PREFIX):
            shutil.copy(os.path.join(src_tag_dir, f), os.path.join(out_tag_dir, f))


class UniversalCheckpoints:
    """The universal forms of the checkpoints in one job's CheckpointStore."""

    def __init__(self, store: CheckpointStore):
        self.store = store

    def stored(self, name: str) -> Optional[Manifest]:
        """The committed universal form of checkpoint `name`, if one is stored and complete."""
        inner = self.store.inside(name)
        return None if inner.problems(UNIVERSAL) else inner.read_manifest(UNIVERSAL)

    def create(self, name: str, processes: int, out: str) -> int:
        """Download checkpoint `name` (beside `out`), convert it into `out`, upload and commit the universal form.
        Returns its bytes. Nothing is committed unless every file is uploaded."""
        src = out.rstrip("/") + ".src"
        try:
            manifest = self.store.fetch(name, src, wanted_for_conversion, show=True)
            tag = _tag_of(src)
            convert(os.path.join(src, tag), os.path.join(out, tag), processes)
            shutil.copy(os.path.join(src, STATE_FILE), os.path.join(out, STATE_FILE))
        finally:
            shutil.rmtree(src, ignore_errors=True)
        inner = self.store.inside(name)
        inner.remove_if_uncommitted(UNIVERSAL)
        files = inner.upload_rank(out, UNIVERSAL, 0)
        meta = CheckpointMeta.model_validate(manifest.model_dump(include=set(CheckpointMeta.model_fields)))
        inner.commit(UNIVERSAL, 1, meta)
        return sum(f.size for f in files)

    def fetch(self, name: str, dest: str) -> Manifest:
        return self.store.inside(name).fetch(UNIVERSAL, dest)


def _tag_of(ckpt_dir: str) -> str:
    """The DeepSpeed tag folder of a downloaded checkpoint (the one folder next to ftdist_state.json)."""
    tags = [d for d in os.listdir(ckpt_dir) if os.path.isdir(os.path.join(ckpt_dir, d)) and d != "hf"]
    if len(tags) != 1:
        raise CheckpointError(f"{ckpt_dir}: expected one DeepSpeed tag folder, found {sorted(tags)}")
    return tags[0]


def node_dir(job_uri: str, name: str) -> str:
    """The folder one node's ranks share for a checkpoint's files (its shared files, or its universal form): the
    same path on every rank of a node."""
    key = hashlib.sha256(f"{job_uri}/{name}".encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"ftdist-universal-{key}")
