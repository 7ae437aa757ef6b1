"""A round trip through a storage location with the credentials of the process that runs it: write a small object,
read it back, write one as a multipart upload (the way checkpoints go up), delete both. `ftdist preflight` runs it
on every node of a cluster, each node with its own credentials (pod identity, instance profile, mounted secret), so
the node whose pods cannot write to the bucket is found before the job starts rather than at its first checkpoint.
Everything it writes lies under one scratch prefix and is removed whatever happens."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from typing import Iterator, Optional

from botocore.exceptions import BotoCoreError, ClientError

from ftdist.storage import s3
from ftdist.storage.uri import is_remote, local_path, split_s3

MIN_PART = 5 << 20
"""S3's smallest part that is not the last: the probe's first part, so completing the upload exercises a real
multi-part assembly (a single small part would be accepted even where part uploads are refused)."""


def roundtrip(uri: str, extra_args: Optional[dict] = None) -> Optional[str]:
    """None when `uri` (a run folder, local or s3://) takes writes, reads, multipart uploads and deletes; else one
    line naming the step that failed and why."""
    uri = uri.rstrip("/")
    scratch = f"{uri}/.ftdist-preflight-{secrets.token_hex(4)}"
    return _s3_roundtrip(uri, scratch, extra_args or {}) if is_remote(uri) else _local_roundtrip(uri, scratch)


def _s3_roundtrip(uri: str, scratch: str, extra_args: dict) -> Optional[str]:
    bucket, prefix = split_s3(scratch)
    c = s3.client(s3.PROBE)
    small, big = f"{prefix}/small", f"{prefix}/multipart"
    payload = secrets.token_bytes(64)
    step, upload_id = "writing", None
    try:
        c.put_object(Bucket=bucket, Key=small, Body=payload, **extra_args)
        step = "reading back"
        if c.get_object(Bucket=bucket, Key=small)["Body"].read() != payload:
            return f"reading back: {uri}: the object read is not the object written"
        step = "a multipart upload"
        upload_id = c.create_multipart_upload(Bucket=bucket, Key=big, **extra_args)["UploadId"]
        parts = []
        for number, body in ((1, b"\0" * MIN_PART), (2, payload)):
            etag = c.upload_part(Bucket=bucket, Key=big, UploadId=upload_id, PartNumber=number, Body=body)["ETag"]
            parts.append({"PartNumber": number, "ETag": etag})
        c.complete_multipart_upload(Bucket=bucket, Key=big, UploadId=upload_id, MultipartUpload={"Parts": parts})
        upload_id = None
        size = c.head_object(Bucket=bucket, Key=big)["ContentLength"]
        if size != MIN_PART + len(payload):
            return f"a multipart upload: {uri}: {size} bytes stored of {MIN_PART + len(payload)} written"
        step = "deleting"
        for key in (small, big):
            c.delete_object(Bucket=bucket, Key=key)
        return None
    except (ClientError, BotoCoreError) as e:
        return f"{step}: {s3.describe_error(e, uri)}"
    finally:  # whatever failed, leave nothing behind (a failed delete is already the reported problem)
        _s3_cleanup(c, bucket, (small, big), upload_id)


def _s3_cleanup(c, bucket: str, keys: tuple[str, ...], upload_id: Optional[str]) -> None:
    try:
        if upload_id:
            c.abort_multipart_upload(Bucket=bucket, Key=keys[-1], UploadId=upload_id)
        for key in keys:
            c.delete_object(Bucket=bucket, Key=key)  # deleting what is not there succeeds on S3
    except (ClientError, BotoCoreError):
        pass


@contextlib.contextmanager
def leaves_no_folders(uri: str) -> Iterator[None]:
    """`no_new_folders` for a local path or an s3:// prefix. On S3 the folders are the empty `prefix/` keys that
    pyarrow (Ray Train's storage filesystem) writes for each level it creates, and that stores built on a filer
    (SeaweedFS) keep listing after their last object is deleted: those that appear inside and stay empty are deleted
    after (the content below `uri` is the caller's to delete)."""
    if not is_remote(uri):
        with no_new_folders(local_path(uri)):
            yield
        return
    bucket, key = split_s3(uri.rstrip("/"))
    parts = key.split("/")
    markers = ["/".join(parts[:i]) + "/" for i in range(1, len(parts) + 1)]
    c = s3.client(s3.PROBE)
    try:
        before = {m for m in markers if _exists(c, bucket, m)}
    except BotoCoreError:  # no credentials here (the nodes may have theirs): nothing to tidy from here either
        before = None
    try:
        yield
    finally:
        if before is not None:
            _remove_new_markers(c, bucket, markers, before)


def _remove_new_markers(c, bucket: str, markers: list[str], before: set[str]) -> None:
    try:
        for m in reversed(markers):  # deepest first: its parent is then empty
            if m not in before and _exists(c, bucket, m) and not _has_children(c, bucket, m):
                c.delete_object(Bucket=bucket, Key=m)
    except (ClientError, BotoCoreError):
        pass  # tidying only: an empty marker left behind is harmless


def _exists(c, bucket: str, key: str) -> bool:
    try:
        c.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError:
        return False


def _has_children(c, bucket: str, marker: str) -> bool:
    listed = c.list_objects_v2(Bucket=bucket, Prefix=marker, MaxKeys=2).get("Contents", [])
    return any(o["Key"] != marker for o in listed)


@contextlib.contextmanager
def no_new_folders(path: str) -> Iterator[None]:
    """Whatever happens inside, `path` and the folders above it that were not there before are removed after (the
    emptied ones only: another process may have started writing there meanwhile)."""
    existing = path
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        yield
    finally:
        if existing != path:
            shutil.rmtree(path, ignore_errors=True)
        parent = os.path.dirname(path)
        while existing != path and parent != existing and parent.startswith(existing):
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)


def _local_roundtrip(uri: str, scratch: str) -> Optional[str]:
    path = local_path(scratch)
    step = "writing"
    with no_new_folders(path):
        try:
            os.makedirs(path)
            payload = secrets.token_bytes(64)
            with open(os.path.join(path, "small"), "wb") as fh:
                fh.write(payload)
            step = "reading back"
            with open(os.path.join(path, "small"), "rb") as fh:
                if fh.read() != payload:
                    return f"reading back: {uri}: the file read is not the file written"
            step = "deleting"
            os.remove(os.path.join(path, "small"))
            return None
        except OSError as e:
            return f"{step}: {uri}: {e.strerror or type(e).__name__}"
