"""Manifest metadata for storage tests that do not look at the trainer's fields."""

from __future__ import annotations

from ftdist.storage.manifest import CheckpointMeta


def meta(step: int, **fields) -> CheckpointMeta:
    """The trainer's part of a manifest, with placeholders for what these storage tests do not look at."""
    return CheckpointMeta(**{"zero_stage": 2, "method": "full", "job_name": "job1", "spec_sha256": "x", **fields,
                             "step": step})
