"""Storage locations, parsed in one place: a local path, `file://` path or `s3://bucket/prefix`. Pure string work;
the one module every layer (spec, train, sweep, remote) asks "is this object storage?"."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from ftdist.errors import SpecError

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def is_remote(uri: str) -> bool:
    """Object storage (s3://), as opposed to a path on this machine."""
    return uri.startswith(S3_SCHEME)


def has_scheme(uri: str) -> bool:
    """Any URL-like location (s3://, file://, hf://, ...): never a path relative to a job file."""
    return "://" in uri


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b")."""
    if not is_remote(uri):
        raise SpecError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise SpecError(f"{uri}: no bucket in URI")
    return bucket, key.strip("/")


def without_scheme(uri: str) -> str:
    """s3://bucket/prefix -> bucket/prefix (how Ray and pyarrow name S3 paths next to their filesystem)."""
    return uri[len(S3_SCHEME):] if is_remote(uri) else uri


def bucket_problem(uri: str) -> Optional[str]:
    """Why an s3:// URI's bucket part is unusable (credentials typed into it, an invalid name), or None. Never echoes
    a value that may hold a key."""
    bucket = uri[len(S3_SCHEME):].split("/", 1)[0]
    if "@" in bucket or ":" in bucket:
        return ("credentials do not belong in the storage URI; use the AWS environment or credential chain "
                "(AWS_PROFILE, instance/pod identity)")
    if not _BUCKET_RE.fullmatch(bucket):
        return f"{bucket!r} is not a valid S3 bucket name"
    return None


_ONE_SLASH_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)")


def location_problem(value: str, schemes: tuple[str, ...] = (S3_SCHEME,)) -> Optional[str]:
    """Why a data, model or storage location cannot be used, or None: an unsupported scheme, an s3:// URI without a
    valid bucket (or with credentials typed into it), a scheme written with one slash, an empty value or one with
    spaces around it (a YAML quoting slip). Never echoes the value."""
    if not value.strip():
        return "empty (give a path or URI)"
    if value != value.strip():
        return "has spaces or a line break at its start or end"
    if has_scheme(value):
        scheme = value.split("://", 1)[0] + "://"
        if scheme not in schemes:
            allowed = " or ".join(schemes)
            return f"unsupported URI scheme {scheme[:20]} (use a local path or {allowed})"
        if is_remote(value):
            if not value[len(S3_SCHEME):].split("/", 1)[0]:
                return "no bucket in the s3:// URI (s3://<bucket>/<prefix>)"
            return bucket_problem(value)
        return None
    m = _ONE_SLASH_RE.match(value)
    if m and len(m.group(1)) > 1:  # not a Windows drive letter
        return f"{m.group(1)}:/ has one slash; did you mean {m.group(1)}://...?"
    return None


def local_path(uri: str) -> str:
    """The filesystem path of a local location (file:// stripped, ~ expanded)."""
    path = uri[len(FILE_SCHEME):] if uri.startswith(FILE_SCHEME) else uri
    return os.path.expanduser(path)


def resolve(uri: str, base: Optional[Path] = None) -> str:
    """An absolute local path (relative ones against `base`, default the cwd), or the s3:// URI without a trailing
    slash. An absolute path needs no cwd (inside a Ray job the driver's cwd can vanish under it)."""
    if is_remote(uri):
        return uri.rstrip("/")
    path = local_path(uri)
    if os.path.isabs(path):
        return os.path.normpath(path)
    return str((base or Path.cwd()).joinpath(path).resolve())
