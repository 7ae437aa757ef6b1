"""The commit record of a checkpoint, `ftdist_manifest.json`: what was trained (step, world size, ZeRO stage,
method, job-spec hash, metrics) and every file with its size and hash. Typed, and validated where it is read."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

FORMAT = "ftdist-checkpoint/1"
DIGEST = "blake3"
"""The hash of new manifests: a 256-bit cryptographic hash (as Hugging Face's Xet storage uses for content
addressing) at 5.3 GB/s on one core here, against SHA-256's 1.1 GB/s with SHA-NI; on a node whose cores train,
hashing every checkpoint byte at upload and at resume is CPU taken from training."""
DIGEST_NAMES = {"blake3": "BLAKE3", "sha256": "SHA-256"}
"""Every algorithm a manifest may carry, newest first (manifests from before 2026-11-23 list SHA-256)."""


class _Record(BaseModel):
    # Unknown keys are kept out, not refused: a manifest written by a newer ftdist still reads.
    model_config = ConfigDict(extra="ignore", frozen=True)


class RecordEntry(_Record):
    """A byte range of a file that a reader fetches and verifies on its own (an export reads the fp32 master
    weights out of a ZeRO-3 optimizer file, not the Adam moments beside them)."""

    name: str
    offset: int = Field(ge=0)
    size: int = Field(ge=0)
    blake3: str


class FileEntry(_Record):
    """One file of a checkpoint, as a rank uploaded it."""

    path: str
    size: int = Field(ge=0)
    rank: Optional[int] = None
    blake3: Optional[str] = None
    sha256: Optional[str] = None
    records: Optional[list[RecordEntry]] = None
    """Ranges of the file hashed on their own, for readers that need only those (manifests from before
    2026-12-03 have none: such readers download the whole file)."""

    @model_validator(mode="after")
    def _has_digest(self) -> "FileEntry":
        if self.blake3 is None and self.sha256 is None:
            raise ValueError(f"manifest entry {self.path!r} has no checksum")
        return self

    def digest(self) -> tuple[str, str]:
        """(algorithm, hex digest): BLAKE3, or SHA-256 in manifests from before BLAKE3."""
        return ("blake3", self.blake3) if self.blake3 is not None else ("sha256", self.sha256)  # type: ignore


class CheckpointMeta(_Record):
    """What rank 0 knows about a checkpoint before the files are in: the trainer's side of the manifest."""

    step: int = Field(ge=0)
    zero_stage: int = Field(ge=0, le=3)
    method: str
    job_name: str
    spec_sha256: str
    base_model: Optional[str] = None
    """Where the base weights live (hub id, path or s3:// prefix; None for a from_config model), for
    `ftdist export --interpolate` and for the frozen weights a checkpoint leaves out. An identifier, never a
    credential."""
    base_revision: Optional[str] = None
    """The hub revision of `base_model` the job trained from."""
    frozen_excluded: bool = False
    """LoRA and freeze checkpoints of a model loaded from `base_model` leave its frozen parameters out (they are the
    base's, unchanged): the checkpoint carries the trained tensors and their optimizer state only. `hf/frozen.json`
    lists the left-out names and shapes; resume and export take them from the base."""
    merge_on_export: bool = False
    export_max_shard_size: str = "5GB"
    """The job's export.max_shard_size: `ftdist export` of this checkpoint uses it unless told otherwise."""
    metrics: dict[str, float] = {}
    worker_hours: float = 0.0
    """Worker-hours (wall hours x workers) the run spent up to this checkpoint, every attempt included."""
    gpu_hours: float = 0.0
    """GPU-hours the run spent up to this checkpoint (0 on CPU), for `ftdist plan`'s prediction beside it."""


class Manifest(CheckpointMeta):
    """The commit marker: written last, with a conditional create."""

    format: str = FORMAT
    name: str
    world_size: int = Field(ge=1)
    files: list[FileEntry]
    total_bytes: int = Field(ge=0)
    committed_at: str
