"""Will the job's inputs and checkpoints reach the cluster? Shared by `ftdist submit` (the job file's folder travels
as the Ray working dir) and `ftdist k8s render` / `submit --image` (nothing travels: pods read s3://, hub ids and
paths inside the image or a volume). Returns notes for what cannot be checked from here; refuses what cannot work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ftdist.errors import SpecError
from ftdist.spec import JobSpec, local_paths
from ftdist.storage.uri import has_scheme


def is_under(path: str, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(root)
        return True
    except ValueError:
        return False


def check_paths(job_file: str, spec: JobSpec, working_dir: Path, overrides: Optional[list[str]] = None) -> list[str]:
    """Local inputs must travel in the working dir (or be absolute paths the cluster nodes have); checkpoints must
    go where every node and every later attempt can reach (s3:// or an absolute shared path), never the working dir,
    which Ray deletes with the job. Returns notes for absolute paths that are not shipped."""
    notes = []
    for key, raw_val, val in local_paths(job_file, spec, overrides):  # shipped with the working dir under it
        if has_scheme(val) or val == raw_val and not os.path.isabs(val):
            continue  # remote URI or hub id
        if is_under(val, working_dir):
            continue  # shipped; resolves the same way next to the job file on the cluster
        if raw_val is not None and not os.path.isabs(raw_val) and not raw_val.startswith("~"):
            raise SpecError(f"{key}: {raw_val} is outside the working dir {working_dir} and would not "
                            f"reach the cluster; move it under the job file's folder, use s3://, or --working-dir")
        notes.append(f"{key}: {val} is not shipped; it must exist at that path on the cluster nodes")
    storage = spec.checkpoint.storage
    if not has_scheme(storage):
        if not os.path.isabs(storage):
            raise SpecError(f"checkpoint.storage: {storage} is relative: on the cluster it would land in the job's "
                            f"working dir, which Ray deletes; use s3://bucket/prefix or an absolute path all nodes "
                            f"share (e.g. --set checkpoint.storage=/mnt/shared/runs)")
        notes.append(f"checkpoint.storage: {storage} must be storage every node shares (NFS, a mounted volume)")
    return notes


def check_portable(job_file: str, spec: JobSpec, overrides: Optional[list[str]] = None) -> list[str]:
    """Inputs must be reachable from a pod: s3://, a hub id, or an absolute path inside the image / a volume.
    A path relative to the job file exists only on this machine. Returns notes for absolute paths."""
    notes = []
    for key, raw_val, val in local_paths(job_file, spec, overrides):
        if raw_val is None or has_scheme(raw_val):
            continue
        if os.path.isabs(raw_val):
            notes.append(f"{key}: {raw_val} must exist in the image or a mounted volume")
        elif val != raw_val or raw_val.startswith((".", "~")):  # was resolved next to the job file: local
            kind = "folder" if os.path.isdir(val) else "file"
            raise SpecError(f"{key}: {raw_val} is a {kind} on this machine; a pod cannot read it: upload it "
                            f"(s3://bucket/...) or bake it into the image and give the absolute path")
    storage = spec.checkpoint.storage
    if not has_scheme(storage):
        if not os.path.isabs(storage):
            raise SpecError(f"checkpoint.storage: {storage} is a local folder; on Kubernetes checkpoints must outlive "
                            f"the pods: use s3://bucket/prefix (--set checkpoint.storage=s3://...)")
        notes.append(f"checkpoint.storage: {storage} must be a volume every pod mounts (a ReadWriteMany PVC)")
    return notes
