"""Moving whole folders: s3:// objects or prefixes downloaded once per node into a local cache (models, data), and
finished local folders published to a local path or s3:// prefix (exports, reports)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path
import tempfile
from typing import Callable, Optional

from botocore.exceptions import BotoCoreError, ClientError

from ftdist.errors import SpecError
from ftdist.progress import Meter
from ftdist.storage import s3
from ftdist.storage.store import S3Store, TransferOptions, open_store, relative_files
from ftdist.storage.uri import is_remote, split_s3


def cache_root() -> Path:
    return Path(os.environ.get("FTDIST_CACHE", Path.home() / ".cache" / "ftdist"))


def download(uri: str, dest: Optional[str] = None) -> str:
    """Download an s3:// object or prefix into a node-local cache folder (once; reused after) and return it."""
    bucket, key = split_s3(uri)
    target = Path(dest) if dest else cache_root() / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:20]
    target.parent.mkdir(parents=True, exist_ok=True)
    # Every rank reads the data: the ranks of a node take turns on a file lock, so one downloads and the others
    # reuse its copy (without it a later rank replaced the folder while an earlier one was reading it).
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _download_locked(uri, bucket, key, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download_locked(uri: str, bucket: str, key: str, target: Path) -> str:
    done = target.with_name(target.name + ".complete")
    if done.exists():
        return str(target / Path(key).name) if done.read_text() == "object" else str(target)
    client = s3.client()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kind = "prefix"
    try:
        prefix = key.rstrip("/") + "/" if key else ""
        sizes = {
            o["Key"]: o["Size"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])
        }
        if not sizes and key:
            sizes = {key: client.head_object(Bucket=bucket, Key=key)["ContentLength"]}
            prefix, kind = key.rsplit("/", 1)[0] + "/" if "/" in key else "", "object"
        if not sizes:
            raise SpecError(f"{uri}: nothing stored under this prefix")
        meter = Meter(sum(sizes.values()), f"downloading {uri}")  # once per node: the other ranks wait on the lock
        try:
            for k in sizes:
                out = tmp / k[len(prefix):]
                out.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, k, str(out), Callback=meter)
        finally:
            meter.close()
    except (ClientError, BotoCoreError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SpecError(s3.describe_error(e, uri)) from None
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    done.write_text(kind)
    return str(target / Path(key).name) if kind == "object" else str(target)


def _readable(root: str) -> None:
    """mkdtemp/tempfile create 0700/0600 entries; a published folder follows the umask like any other output."""
    umask = os.umask(0)
    os.umask(umask)
    for d, _, files in os.walk(root):
        os.chmod(d, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~umask)


def publish_files(dest: str, texts: dict[str, str], plots: Optional[dict[str, Callable[[str], None]]] = None, *,
                  replace: bool = False, local: Optional[str] = None) -> dict[str, str]:
    """Generated report files (tables as text; plots drawn by a callable into a path) built in `local` (kept: the
    tracking server gets a copy) or a temporary folder, then published to `dest` (local or s3://): replacing the
    folder (`replace`), or beside what is there. Returns {name: uri}."""
    plots = plots or {}
    with tempfile.TemporaryDirectory(prefix="ftdist-files-") as tmp:
        folder = local or tmp
        os.makedirs(folder, exist_ok=True)
        for name, text in texts.items():
            with open(os.path.join(folder, name), "w") as fh:
                fh.write(text)
        for name, draw in plots.items():
            draw(os.path.join(folder, name))
        names = [*texts, *plots]
        if replace:
            publish_dir(folder, dest)
        else:
            open_store(dest).put_files([(os.path.join(folder, n), n) for n in names])
    return {n: f"{dest}/{n}" for n in names}


def publish_dir(local_dir: str, dest: str, opts=None) -> str:
    """Copy a finished local folder to `dest` (local path or s3:// prefix)."""
    if is_remote(dest):
        store = S3Store(dest, opts or TransferOptions())
        items = [(os.path.join(local_dir, rel), rel) for rel in relative_files(local_dir)]
        # Replace, don't merge: stale shards of an earlier export must not sit next to the new index.
        store.delete_prefix("")
        store.put_files(items, what=f"uploading {dest}")
        return dest
    if os.path.abspath(local_dir) != os.path.abspath(dest):
        tmp = dest.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(local_dir, tmp)
        _readable(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return dest
