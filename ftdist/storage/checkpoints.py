"""Committed, verifiable checkpoints in a job folder (local or s3://), one sub-folder per checkpoint:

    <job>/step_00000040/                      DeepSpeed shards, RNG states, ftdist_state.json, hf/ (config, tokenizer)
    <job>/step_00000040/.ftdist/rank-00001.json   what rank 1 uploaded (path, size, blake3)
    <job>/step_00000040/ftdist_manifest.json      the commit marker, written last with a conditional write

Every rank uploads its own files and its file list; rank 0 waits for all lists, merges them into the manifest
(files with size + BLAKE3 hash, step, world size, ZeRO stage, method, job-spec hash, metrics) and writes it with
If-None-Match: * (create-if-absent). A folder without a manifest is not a checkpoint: it is never resumed from and
is removed at the next start. Nothing secret is in a manifest: the job spec is hashed, not copied, and holds no
credentials anyway.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

from pydantic import ValidationError

from ftdist.storage.manifest import DIGEST, DIGEST_NAMES, FORMAT, CheckpointMeta, FileEntry, Manifest, RecordEntry
from ftdist.storage.store import Store, TransferOptions, file_digest, open_store, relative_files

MANIFEST = "ftdist_manifest.json"
PARTS = ".ftdist"
STEP_DIR = re.compile(r"^step_(\d{8})$")
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_state_rank)(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt, or cannot be committed."""


class FencedError(CheckpointError):
    """This attempt lost the run lease: it may not commit or delete checkpoints any more."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_of(path: str) -> Optional[int]:
    """The rank whose own file this is (its optimizer/parameter shard, its RNG state); None for a shared file."""
    m = _RANK_FILE.search(os.path.basename(path))
    return None if m is None else int(m.group(1))


def is_shared(path: str) -> bool:
    """A file every rank reads to resume (trainer state, the replicated model states under ZeRO 0-2, config):
    downloaded once per node."""
    return not (path.startswith(PARTS + "/") or path == MANIFEST) and rank_of(path) is None


def needed_by(path: str, rank: int) -> bool:
    """Files a rank must download to resume: its own optimizer/parameter shard and RNG state, plus the shared
    files. Other ranks' shards are skipped."""
    return is_shared(path) or rank_of(path) == rank


@dataclass
class CheckpointInfo:
    name: str
    uri: str
    step: int
    manifest: Optional[Manifest]

    @property
    def committed(self) -> bool:
        return self.manifest is not None

    @property
    def size(self) -> int:
        return self.manifest.total_bytes if self.manifest else 0


Records = Callable[[str], Optional[list[tuple[str, int, int]]]]
"""For a local file, the (name, offset, size) ranges of it that a reader may fetch on its own; None: none."""


def _hash_files(local_dir: str, rels: list[str], rank: int, records: Optional[Records] = None) -> list[FileEntry]:
    paths = [os.path.join(local_dir, r) for r in rels]

    def entry(rel: str, path: str) -> FileEntry:
        ranges = records(path) if records is not None else None
        return FileEntry(path=rel, size=os.path.getsize(path), rank=rank, **{DIGEST: file_digest(path)},
                         records=None if ranges is None else [
                             RecordEntry(name=n, offset=o, size=s, **{DIGEST: file_digest(path, DIGEST, o, s)})
                             for n, o, s in ranges])

    with ThreadPoolExecutor(max_workers=4) as ex:  # the hashes release the GIL on large buffers
        return list(ex.map(entry, rels, paths))


def verify_file(local: str, entry: FileEntry) -> bool:
    algo, want = entry.digest()
    return os.path.getsize(local) == entry.size and file_digest(local, algo) == want


class CheckpointStore:
    """Checkpoints of one job (`job_uri` = <checkpoint.storage>/<name>)."""

    def __init__(self, job_uri: str, opts: TransferOptions = TransferOptions(), store: Optional[Store] = None):
        self.job_uri = job_uri.rstrip("/")
        self.opts = opts
        self.store = store or open_store(self.job_uri, opts)

    def inside(self, name: str) -> "CheckpointStore":
        """The store rooted in checkpoint `name`'s folder: a form derived from it (its universal conversion) is a
        checkpoint there, committed and verified the same way, and deleted with it."""
        return CheckpointStore(self.store.child(name), self.opts)

    # --- writing ------------------------------------------------------------------------------------------------

    def upload_rank(self, local_dir: str, name: str, rank: int, records: Optional[Records] = None) -> list[FileEntry]:
        """Upload one rank's files of checkpoint `name`, then its file list (the rank's part of the commit). Rank 0
        reports progress on a long upload. `records`: ranges of files listed and hashed on their own."""
        rels = relative_files(local_dir)
        # Hash while the bytes stream out (hashlib and the HTTP transfers both release the GIL); the file list is
        # written only after both finished.
        with ThreadPoolExecutor(max_workers=1) as ex:
            hashed = ex.submit(_hash_files, local_dir, rels, rank, records)
            self.store.put_files([(os.path.join(local_dir, r), f"{name}/{r}") for r in rels],
                                 what=f"uploading {name}" if rank == 0 else None)
            files = hashed.result()
        listing = [f.model_dump(exclude_none=True) for f in files]
        self.store.put_bytes(f"{name}/{PARTS}/rank-{rank:05d}.json", json.dumps(listing).encode())
        return files

    def commit(self, name: str, world_size: int, meta: CheckpointMeta, timeout_s: float = 1800.0,
               fence: Optional[Callable[[], bool]] = None) -> Manifest:
        """Rank 0: wait until every rank's file list is there, then write the manifest (create-if-absent).
        `fence`: asked right before the write; False (a newer attempt holds the run lease) refuses the commit."""
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while True:
            parts = [k for k in self.store.list(f"{name}/{PARTS}") if k.endswith(".json")]
            if len(parts) >= world_size:
                break
            if time.monotonic() > deadline:
                raise CheckpointError(f"{self.store.child(name)}: only {len(parts)} of {world_size} ranks finished "
                                      f"uploading within {timeout_s:.0f}s; not committed")
            time.sleep(delay)
            delay = min(2.0, delay * 1.5)
        files: dict[str, FileEntry] = {}
        for r in range(world_size):
            raw = self.store.get_bytes(f"{name}/{PARTS}/rank-{r:05d}.json")
            if raw is None:
                raise CheckpointError(f"{self.store.child(name)}: file list of rank {r} missing")
            for f in map(FileEntry.model_validate, json.loads(raw)):
                prev = files.get(f.path)
                if prev is not None and prev.digest() != f.digest():
                    raise CheckpointError(f"{self.store.child(name)}: ranks {prev.rank} and {f.rank} wrote "
                                          f"different {f.path}")
                files.setdefault(f.path, f)
        manifest = Manifest(
            **meta.model_dump(), name=name, world_size=world_size,
            files=sorted(files.values(), key=lambda f: f.path),
            total_bytes=sum(f.size for f in files.values()),
            committed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        body = json.dumps(manifest.model_dump(exclude_none=True), indent=1).encode()
        if fence is not None and not fence():
            raise FencedError(f"{self.store.child(name)}: not committed: a newer attempt of this job holds the run "
                              "lease (this one stalled past it and was taken over)")
        if not self.store.put_bytes(f"{name}/{MANIFEST}", body, if_absent=True):
            existing = self.read_manifest(name)
            if existing and existing.files == manifest.files:
                return existing
            raise CheckpointError(f"{self.store.child(name)} is already committed by another writer (is a second run "
                                  "with the same job name using this storage?)")
        return manifest

    # --- reading ------------------------------------------------------------------------------------------------

    def read_manifest(self, name: str) -> Optional[Manifest]:
        """The checkpoint's manifest, or None where there is none or it is not a readable ftdist manifest (then the
        folder is not a committed checkpoint)."""
        raw = self.store.get_bytes(f"{name}/{MANIFEST}")
        if raw is None:
            return None
        try:
            m = Manifest.model_validate_json(raw)
        except ValidationError:
            return None
        return m if m.format == FORMAT else None

    def checkpoints(self, committed_only: bool = True) -> list[CheckpointInfo]:
        out = []
        for d in self.store.list_dirs():
            mt = STEP_DIR.match(d)
            if not mt:
                continue
            m = self.read_manifest(d)
            if m is None and (committed_only or not self.store.list(d)):
                continue  # (some stores, e.g. SeaweedFS, keep listing a folder after its last object is deleted)
            out.append(CheckpointInfo(d, self.store.child(d), int(mt.group(1)), m))
        return sorted(out, key=lambda c: c.step)

    def problems(self, name: str, deep: bool = False, scratch: Optional[str] = None) -> list[str]:
        """What is wrong with a checkpoint ([] = verified). Shallow: every listed file exists with its size.
        Deep: also download each file and compare its hash."""
        m = self.read_manifest(name)
        if m is None:
            return [f"{self.store.child(name)}: no committed manifest"]
        have = self.store.list(name)
        bad = []
        for f in m.files:
            size = have.get(f"{name}/{f.path}")
            if size is None:
                bad.append(f"{f.path}: missing")
            elif size != f.size:
                bad.append(f"{f.path}: size {size}, manifest says {f.size}")
        if deep and not bad:
            with tempfile.TemporaryDirectory(dir=scratch) as tmp:
                for f in m.files:
                    local = os.path.join(tmp, "f")
                    self.store.get_files([(f"{name}/{f.path}", local)])
                    if not verify_file(local, f):
                        bad.append(f"{f.path}: {DIGEST_NAMES[f.digest()[0]]} mismatch")
                    os.unlink(local)
        return bad

    def latest_valid(self) -> Optional[CheckpointInfo]:
        """The newest committed checkpoint whose files are all there (shallow check)."""
        for c in reversed(self.checkpoints()):
            if not self.problems(c.name):
                return c
        return None

    def fetch(self, name: str, dest: str, want: Callable[[str], bool] = lambda _: True,
              show: bool = False) -> Manifest:
        """Download the files of a committed checkpoint whose path passes `want` into dest/ and verify each hash.
        Returns the manifest. `show`: progress lines for a long download."""
        m = self.read_manifest(name)
        if m is None:
            raise CheckpointError(f"{self.store.child(name)}: not a committed checkpoint (no {MANIFEST})")
        chosen = [f for f in m.files if want(f.path)]
        self.store.get_files([(f"{name}/{f.path}", os.path.join(dest, f.path)) for f in chosen],
                             what=f"downloading {name}" if show else None, total=sum(f.size for f in chosen))
        for f in chosen:
            if not verify_file(os.path.join(dest, f.path), f):
                raise CheckpointError(f"{self.store.child(name)}/{f.path}: checksum mismatch after download "
                                      "(corrupt or overwritten checkpoint); refusing to use it")
        return m

    def fetch_records(self, name: str, dest: str, files: list[FileEntry], show: bool = False) -> None:
        """Only the listed records of `files` (entries of checkpoint `name`'s manifest that have them), each into
        dest/<path> at its offset (a sparse file of the whole file's size), each hash verified."""
        for f in files:
            local = os.path.join(dest, f.path)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "wb") as fh:
                fh.truncate(f.size)
        self.store.get_ranges([(f"{name}/{f.path}", r.offset, r.size, os.path.join(dest, f.path))
                               for f in files for r in f.records or ()],
                              what=f"downloading {name} (selected records)" if show else None)
        for f in files:
            for r in f.records or ():
                if file_digest(os.path.join(dest, f.path), DIGEST, r.offset, r.size) != r.blake3:
                    raise CheckpointError(f"{self.store.child(name)}/{f.path}: checksum mismatch in record {r.name} "
                                          "after download (corrupt or overwritten checkpoint); refusing to use it")

    def fetch_all(self, name: str, dest: str) -> Manifest:
        """Every file of the checkpoint."""
        return self.fetch(name, dest)

    def fetch_for_rank(self, name: str, rank: int, dest: str) -> Manifest:
        """Only the files `rank` needs to resume (its own shards and the shared files); rank 0 shows progress."""
        return self.fetch(name, dest, lambda path: needed_by(path, rank), show=rank == 0)

    # --- housekeeping -------------------------------------------------------------------------------------------

    def remove_if_uncommitted(self, name: str) -> None:
        """Delete folder `name` unless it is committed (a crashed upload's leftovers, before a new upload)."""
        if self.read_manifest(name) is None:
            self.store.delete_prefix(name)

    def remove_uncommitted(self) -> list[str]:
        """Delete checkpoint folders without a manifest (a crash mid-upload) and abort their multipart uploads.
        Only call when no upload of this job is in flight (at start)."""
        removed = []
        for c in self.checkpoints(committed_only=False):
            if not c.committed:
                self.store.delete_prefix(c.name)
                removed.append(c.name)
        self.store.abort_uploads("")
        return removed

    def apply_retention(self, keep: int, best_by: Optional[str] = None, mode: str = "min",
                        fence: Optional[Callable[[], bool]] = None) -> list[str]:
        """Keep the newest committed checkpoint plus the `keep` newest (or, with best_by, the `keep` best by that
        metric); delete the rest, manifest first. The same policy as Ray's CheckpointConfig, applied to storage
        so it also covers a checkpoint committed just before a crash that Ray never registered. `fence`: asked
        before each delete; False stops (a newer attempt owns the folder now)."""
        done = self.checkpoints()
        if len(done) <= keep:
            return []
        if best_by:
            def score(c: CheckpointInfo) -> float:
                v = c.manifest.metrics.get(best_by)
                worst = float("inf") if mode == "min" else float("-inf")
                return worst if v is None else v
            ranked = sorted(done, key=score, reverse=(mode == "max"))
        else:
            ranked = sorted(done, key=lambda c: c.step, reverse=True)
        keep_names = {c.name for c in ranked[:keep]} | {done[-1].name}
        gone = []
        for name in [c.name for c in done if c.name not in keep_names]:
            if fence is not None and not fence():
                raise FencedError(f"{self.job_uri}: retention stopped: a newer attempt of this job holds the run "
                                  "lease")
            self.delete(name)
            gone.append(name)
        return gone

    def delete(self, name: str) -> None:
        """Uncommit first (manifest), then remove the data: a half-deleted checkpoint never looks committed."""
        self.store.delete_prefix(name, first=[f"{name}/{MANIFEST}"])
