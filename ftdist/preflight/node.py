"""What `ftdist preflight` learns on each node, from a zero-CPU Ray task pinned there with the job's runtime
environment, i.e. in the conditions the job's workers will have: that node's credentials, packages, disks and
memory. Stdlib and boto3 only (no torch import: seconds per node for nothing)."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from typing import Optional

from botocore.exceptions import BotoCoreError, ClientError

from ftdist.storage import s3
from ftdist.storage.probe import roundtrip
from ftdist.storage.uri import is_remote, local_path, split_s3

PACKAGES = ("ftdist", "ray", "torch", "deepspeed", "transformers", "peft")
"""What a worker imports and the driver pickles for it: a different version on one node breaks the job there."""
SHM = "/dev/shm"


@dataclass
class NodeRequest:
    storage: str
    """The job's run folder (local or s3://): the round trip runs under it."""
    extra_args: dict = field(default_factory=dict)
    """Server-side encryption arguments, as checkpoints are written."""
    locations: list[tuple[str, str]] = field(default_factory=list)
    """(job key, location) of every input the workers read on this node: data, model, tokenizer."""
    shared_marker: Optional[str] = None
    """A file the driver wrote under a local run folder: every node must see it (one shared filesystem)."""


@dataclass
class NodeFacts:
    hostname: str
    python: str
    versions: dict[str, Optional[str]]
    shm_bytes: Optional[int]
    staging_dir: str
    staging_free: int
    memory_bytes: int
    storage_problem: Optional[str]
    location_problems: list[tuple[str, str]]


def versions() -> dict[str, Optional[str]]:
    """Installed versions (package metadata, as pip sees them), None where a package is missing."""
    out: dict[str, Optional[str]] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def inspect_node(req: NodeRequest) -> NodeFacts:
    staging = tempfile.gettempdir()  # where each rank stages its checkpoint files before the upload
    return NodeFacts(
        hostname=socket.gethostname(),
        python=platform.python_version(),
        versions=versions(),
        shm_bytes=shutil.disk_usage(SHM).total if os.path.isdir(SHM) else None,
        staging_dir=staging,
        staging_free=shutil.disk_usage(staging).free,
        memory_bytes=memory_limit(),
        storage_problem=roundtrip(req.storage, req.extra_args) or _unshared(req),
        location_problems=[(key, p) for key, where in req.locations if (p := location_problem(where))],
    )


def _unshared(req: NodeRequest) -> Optional[str]:
    if req.shared_marker is None or os.path.exists(req.shared_marker):
        return None
    return (f"{req.storage}: this node does not see what the driver wrote there: a local checkpoint.storage must be "
            f"one shared filesystem mounted on every node (or use s3://)")


def memory_limit() -> int:
    """Memory this node's processes may use: physical memory, or the container's cgroup limit when lower (a pod's
    limit, not the host's RAM, is what the kernel enforces)."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                raw = fh.read().strip()
        except OSError:
            continue
        if raw.isdigit():
            return min(physical, int(raw))
    return physical


def location_problem(where: str) -> Optional[str]:
    """None if this node can read `where` (an s3:// object or prefix, or a local path), else why not."""
    if not is_remote(where):
        path = local_path(where)
        if not os.path.exists(path):
            return f"{where}: no such file or directory on this node"
        if not os.access(path, os.R_OK):
            return f"{where}: not readable by this node's user"
        return None
    bucket, key = split_s3(where)
    try:
        listed = s3.client(s3.PROBE).list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    except (ClientError, BotoCoreError) as e:
        return s3.describe_error(e, where)
    return None if listed.get("KeyCount", 0) else f"{where}: nothing there"
