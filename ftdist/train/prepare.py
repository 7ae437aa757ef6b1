"""Prepared data: the job's rows tokenised once into memory-mappable parts (train/token_store.py) in storage, keyed
by a hash of everything that decides them, and reused by every later run, sweep trial and resume.

Layout under the prepared root (data.cache, default `<checkpoint.storage>/_prepared`, local or s3://):

    <key>/<attempt>/train-00000.arrow ...   the examples, one part per chunk of rows, in row order
    <key>/<attempt>/eval-00000.arrow ...    the held-out examples (data.eval, or the data.eval_fraction share)
    <key>/manifest.json                     the commit: parts with size, BLAKE3 and rows; statistics; written last
                                            with a conditional create (two preparers race: one wins, the other
                                            deletes its attempt and reads the winner's)

The key covers the data files' identities (local: size and modification time; s3://: size and ETag), the tokenizer's
content (its serialised vocabulary, merges, special tokens and chat template, not its path), the data options that
change the examples (format, fields, max_length, packing, completion-only loss, eval split and its seed), the
objective (and what its encoder depends on), and the store format. A change to any of them is a new key.

Rows are cut into chunks (JSONL: byte ranges found by one pass over the lines; Parquet: row groups; datasets folders:
row ranges); each chunk is tokenised by one task: in this process, in a local process pool, or as Ray tasks spread
over a cluster (`ftdist data prepare --address`). A bad row anywhere stops the preparation with its file:line, and
nothing stays behind.

Before a part is used it is verified against the manifest: downloaded once per node and hashed (s3://), or hashed
once per node and stamped with its size and modification time (local). A part that fails is never used: the entry
is removed and prepared again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict

from ftdist.errors import SpecError
from ftdist.spec import DataSpec, JobSpec
from ftdist.storage import s3
from ftdist.storage.cache import cache_root, download
from ftdist.storage.store import check_local_folder, file_digest, open_store
from ftdist.storage.uri import is_remote, split_s3
from ftdist.train.data import (DataStats, Row, Splits, build_splits, data_files, encode_row, encoded_rows, eval_draw,
                               hf_rows, jsonl_rows, load_hf_disk, open_parquet, parquet_rows, pack)
from ftdist.train.token_store import PartWriter, TokenTable

FORMAT = "ftdist-prepared/1"
MANIFEST = "manifest.json"
CHUNK_ROWS = 20_000
"""Rows per chunk (one task, one part): large enough that a task's start-up (tokenizer load) is a small share."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PreparedPart(_Record):
    path: str
    """Relative to the entry (`<attempt>/train-00000.arrow`)."""
    size: int
    blake3: str
    rows: int


class PreparedManifest(_Record):
    format: str = FORMAT
    key: str
    example_type: str
    inputs: dict
    """What the key was made of, for people (paths and hashes: no credentials)."""
    train: list[PreparedPart]
    eval: list[PreparedPart]
    stats: dict
    eval_stats: Optional[dict] = None
    meta: dict = {}
    """What the objective recorded (a classifier's labels)."""
    seconds: float
    ran_on: str
    """Where the chunks were tokenised: "this process", "2 processes", "Ray tasks on 16 CPUs"."""
    created_at: str

    @property
    def train_rows(self) -> int:
        return sum(p.rows for p in self.train)

    @property
    def eval_rows(self) -> int:
        return sum(p.rows for p in self.eval)

    def data_stats(self) -> DataStats:
        return DataStats(**self.stats)

    def eval_data_stats(self) -> Optional[DataStats]:
        return DataStats(**self.eval_stats) if self.eval_stats is not None else None


class CorruptPrepared(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------
# The key


def source_identity(path: str) -> list:
    """What identifies the data at `path` now: [name, size, mtime_ns] per local file, [key, size, ETag] per object."""
    if is_remote(path):
        bucket, key = split_s3(path)
        client = s3.client()
        try:
            out = [[o["Key"], o["Size"], o.get("ETag", "")]
                   for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                                Prefix=key.rstrip("/") + "/")
                   for o in page.get("Contents", [])]
            if not out:
                h = client.head_object(Bucket=bucket, Key=key)
                out = [[key, h["ContentLength"], h.get("ETag", "")]]
        except Exception as e:  # noqa: BLE001  (botocore's many types; one line naming the URI)
            raise SpecError(s3.describe_error(e, path)) from None
        return sorted(out)
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if not f.startswith("."))
    elif os.path.exists(path):
        files = [path]
    else:
        raise SpecError(f"{path}: no such file or directory")
    return [[os.path.relpath(f, path) if f != path else os.path.basename(f), os.path.getsize(f),
             os.stat(f).st_mtime_ns] for f in files]


def tokenizer_fingerprint(tok: Any) -> str:
    """A hash of what the tokenizer does, not where it came from: the fast tokenizer's serialised model (vocabulary,
    merges, normalisation, special tokens) or the slow one's vocabulary, plus the chat template and special ids."""
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps([getattr(tok, "chat_template", None), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                         tok.padding_side, tok.truncation_side], default=str).encode())
    return h.hexdigest()


def data_options(data: DataSpec) -> dict:
    """The data spec fields that change the examples (not shuffle: that is the loader's; not cache: the where)."""
    return data.model_dump(mode="json", exclude={"train", "eval", "shuffle", "cache"})


def prepared_key(spec: JobSpec, objective: Any, tok: Any) -> tuple[str, dict]:
    d = spec.data
    inputs = {
        "format": FORMAT,
        "objective": objective.name,
        "objective_options": objective.data_key(),
        "example_type": objective.example_type.__name__,
        "data": data_options(d),
        "seed": spec.optim.seed if d.eval_fraction > 0 else None,
        "train": {"path": d.train, "files": source_identity(d.train)},
        "eval": {"path": d.eval, "files": source_identity(d.eval)} if d.eval else None,
        "tokenizer": tokenizer_fingerprint(tok),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return key, inputs


# ---------------------------------------------------------------------------------------------------------------
# Chunks


@dataclass(frozen=True)
class Chunk:
    split: str
    """"train": rows of data.train (the eval_fraction share goes to eval); "eval": rows of data.eval."""
    kind: str  # jsonl | parquet | hf
    local: str
    shown: str
    start: int
    """JSONL: byte offset; Parquet: first row group; datasets: first row."""
    stop: int
    in_file: int
    """JSONL: the line number of its first line; Parquet and datasets: its first row's index in the file."""
    first_row: int
    """Index of the chunk's first row among all rows of its split's path (the eval_fraction draw is over these)."""
    rows: int

    def read(self) -> Iterator[Row]:
        if self.kind == "jsonl":
            return jsonl_rows(self.local, self.shown, self.start, self.stop, self.in_file)
        if self.kind == "parquet":
            return parquet_rows(self.local, self.shown, list(range(self.start, self.stop)), self.in_file)
        return hf_rows(self.local, self.shown, self.start, self.stop)


def _local_data(path: str) -> Optional[str]:
    """s3:// data downloaded into the node cache, in a folder of its current identity (a changed object is fetched
    again, never served stale)."""
    if not is_remote(path):
        return None
    ident = hashlib.sha256(json.dumps([path, source_identity(path)]).encode()).hexdigest()[:20]
    return download(path, str(cache_root() / "s3" / f"data-{ident}"))


def plan_chunks(path: str, split: str, chunk_rows: int = CHUNK_ROWS) -> list[Chunk]:
    """Cut the rows of `path` into chunks; Parquet schemas must agree across the files of a folder."""
    kind, files = data_files(path, _local_data(path))
    chunks: list[Chunk] = []
    row = 0
    if kind == "hf":
        local, shown = files[0]
        n = len(load_hf_disk(local, shown))
        for a in range(0, n, chunk_rows):
            b = min(n, a + chunk_rows)
            chunks.append(Chunk(split, "hf", local, shown, a, b, a, a, b - a))
        return chunks
    first_schema: Optional[tuple[str, Any]] = None
    for local, shown in files:
        if local.endswith(".parquet"):
            f = open_parquet(local, shown)
            schema = f.schema_arrow
            if first_schema is None:
                first_schema = (shown, schema)
            elif not schema.equals(first_schema[1]):
                raise SpecError(f"{shown}: its columns differ from {first_schema[0]}'s "
                                f"({_schema_difference(first_schema[1], schema)}); the files of one data set need one "
                                f"schema")
            group_rows = [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)]
            g, file_row = 0, 0
            while g < len(group_rows):
                a, n = g, 0
                while g < len(group_rows) and (n == 0 or n + group_rows[g] <= chunk_rows):
                    n += group_rows[g]
                    g += 1
                chunks.append(Chunk(split, "parquet", local, shown, a, g, file_row, row + file_row, n))
                file_row += n
            row += file_row
        else:
            for start, stop, line, n in _jsonl_ranges(local, chunk_rows):
                chunks.append(Chunk(split, "jsonl", local, shown, start, stop, line, row, n))
                row += n
    return chunks


def _schema_difference(a: Any, b: Any) -> str:
    only_a = [n for n in a.names if n not in b.names]
    only_b = [n for n in b.names if n not in a.names]
    typed = [f"{n}: {a.field(n).type} vs {b.field(n).type}" for n in a.names
             if n in b.names and a.field(n).type != b.field(n).type]
    parts = ([f"missing {', '.join(only_a)}"] if only_a else []) + ([f"extra {', '.join(only_b)}"] if only_b else [])
    return "; ".join(parts + typed) or "column order"


def _jsonl_ranges(local: str, chunk_rows: int) -> Iterator[tuple[int, int, int, int]]:
    """(byte start, byte stop, first line number, rows) of each run of `chunk_rows` non-blank lines."""
    start, line, rows, pos = 0, 1, 0, 0
    lineno = 0
    with open(local, "rb") as fh:
        for raw in fh:
            lineno += 1
            pos += len(raw)
            if raw.strip():
                rows += 1
            if rows == chunk_rows:
                yield start, pos, line, rows
                start, line, rows = pos, lineno + 1, 0
    if rows or start == 0:
        yield start, pos, line, rows


# ---------------------------------------------------------------------------------------------------------------
# Tokenising a chunk (the task: in this process, a pool process or a Ray task)


@dataclass
class ChunkResult:
    index: int
    parts: dict  # split -> PreparedPart fields (only splits with rows)
    stats: dict  # split -> DataStats fields
    error: Optional[str] = None
    """A bad row (data.on_bad_row: fail) or unreadable file: the one-line message."""


_TOKENIZERS: dict[str, Any] = {}
"""A task process's tokenizer, loaded once for all the chunks it tokenises."""


def _task_tokenizer(spec: JobSpec) -> Any:
    from ftdist.train.locations import load_tokenizer, resolve_location

    m = spec.model
    if m.tokenizer_path not in _TOKENIZERS:
        _TOKENIZERS[m.tokenizer_path] = load_tokenizer(resolve_location(m.tokenizer_path, m.revision),
                                                       m.trust_remote_code)
    return _TOKENIZERS[m.tokenizer_path]


def tokenize_chunk(job_json: str, index: int, chunk: Chunk, eval_rows: Optional[np.ndarray], entry_uri: str,
                   attempt: str, meta: dict, tokenizer: Any = None) -> ChunkResult:
    """Tokenise one chunk into `<attempt>/train-<index>.arrow` (and `eval-<index>.arrow`) under the entry.
    `eval_rows`: the chunk's rows (indices within it) that the eval_fraction draw sent to eval."""
    from ftdist.train.objectives import objective_for

    spec = JobSpec.model_validate_json(job_json)
    objective = objective_for(spec)
    objective.adopt(meta) if meta else None
    tok = tokenizer if tokenizer is not None else _task_tokenizer(spec)
    try:
        encode = objective.encoder(tok)
    except SpecError as e:
        return ChunkResult(index, {}, {}, error=str(e))
    d = spec.data
    to_eval = np.zeros(chunk.rows, dtype=bool)
    if eval_rows is not None:
        to_eval[eval_rows] = True
    splits = ("eval",) if chunk.split == "eval" else ("train", "eval")
    stats = {s: DataStats() for s in splits}
    kept: dict[str, list] = {s: [] for s in splits}  # packing places a chunk's examples together
    local = tempfile.mkdtemp(prefix="ftdist-prepare-") if is_remote(entry_uri) else os.path.join(entry_uri, attempt)
    os.makedirs(local, exist_ok=True)
    writers = {s: PartWriter(os.path.join(local, f"{s}-{index:05d}.arrow"), objective.example_type) for s in splits}
    try:
        for i, row in enumerate(encoded_rows(chunk.read(), encode)):
            split = "eval" if chunk.split == "eval" or to_eval[i] else "train"
            ex = encode_row(row, encode, d, stats[split])
            if ex is None:
                continue
            if d.packing:
                kept[split].append(ex)
            else:
                writers[split].add(ex)
        for split in splits:
            for block in pack(kept[split], d.max_length) if d.packing else ():
                writers[split].add(block)
    except SpecError as e:  # an unreadable file
        return ChunkResult(index, {}, {}, error=str(e))
    finally:
        counts = {s: w.close() for s, w in writers.items()}
    parts = {}
    for split, w in writers.items():
        rel = f"{attempt}/{os.path.basename(w.path)}"
        if counts[split]:
            parts[split] = {"path": rel, "size": os.path.getsize(w.path), "blake3": file_digest(w.path),
                            "rows": counts[split]}
    if is_remote(entry_uri):
        open_store(entry_uri).put_files([(os.path.join(local, os.path.basename(p["path"])), p["path"])
                                         for p in parts.values()])
        shutil.rmtree(local, ignore_errors=True)
    else:
        for split in splits:
            if not counts[split]:
                os.unlink(writers[split].path)
    return ChunkResult(index, parts, {s: asdict(st) for s, st in stats.items()})



# ---------------------------------------------------------------------------------------------------------------
# Preparing (the driver) and opening (every worker)


def check_prepared_root(spec: JobSpec) -> None:
    """The prepared root takes writes (one line naming data.cache, or checkpoint.storage when it is the default)."""
    key, root = ("data.cache", spec.prepared_root) if spec.data.cache else ("checkpoint.storage",
                                                                            spec.checkpoint.resolved_storage())
    if is_remote(root):
        s3.check_access(root)
    else:
        check_local_folder(root, key)


def plan_processes(spec: JobSpec, chunk_rows: int = CHUNK_ROWS) -> int:
    """Local processes for a preparation on this machine: one per core, no more than there are chunks (a rough
    count from the data's size: a process costs seconds of imports, worth it from the second chunk on)."""
    size = sum(f[1] for _, p in spec.data.inputs() if p and not is_remote(p) for f in source_identity(p))
    rough_chunks = 1 + size // (chunk_rows * 200)  # ~200 bytes a row is short for chat data: errs towards more
    return int(max(1, min(os.cpu_count() or 1, rough_chunks)))


def prepared_entry(spec: JobSpec, key: str) -> str:
    return f"{spec.prepared_root}/{key}"


def read_manifest(entry: str) -> Optional[PreparedManifest]:
    """The entry's manifest; None: not prepared. Raises CorruptPrepared for one that does not read (damaged, or
    another format): such an entry is prepared again."""
    raw = open_store(entry).get_bytes(MANIFEST)
    if raw is None:
        return None
    try:
        m = PreparedManifest.model_validate_json(raw)
    except ValueError:
        raise CorruptPrepared(f"{entry}/{MANIFEST}: unreadable") from None
    if m.format != FORMAT:
        raise CorruptPrepared(f"{entry}/{MANIFEST}: format {m.format}, not {FORMAT}")
    return m


def _eval_draw(spec: JobSpec, chunks: list[Chunk]) -> dict[int, np.ndarray]:
    """The eval_fraction share of data.train: a seeded draw over all its rows, as each chunk's row indices."""
    d = spec.data
    train = [c for c in chunks if c.split == "train"]
    n = sum(c.rows for c in train)
    if d.eval_fraction <= 0 or n == 0:
        return {}
    chosen = np.sort(eval_draw(n, d.eval_fraction, spec.optim.seed))
    out = {}
    for i, c in enumerate(chunks):
        if c.split == "train":
            lo, hi = np.searchsorted(chosen, [c.first_row, c.first_row + c.rows])
            out[i] = chosen[lo:hi] - c.first_row
    return out


class Runner:
    """Where chunk tasks run: here, a local process pool, or Ray tasks (one CPU each) on the connected cluster."""

    def __init__(self, processes: int = 1, use_ray: bool = False) -> None:
        self.processes, self.use_ray = max(1, processes), use_ray

    def map(self, calls: list[tuple], tokenizer: Any) -> list[ChunkResult]:
        if self.use_ray:
            import ray

            task = ray.remote(num_cpus=1, max_retries=2)(tokenize_chunk)
            return ray.get([task.remote(*c) for c in calls])
        if self.processes == 1 or len(calls) == 1:
            return [tokenize_chunk(*c, tokenizer=tokenizer) for c in calls]
        spawn = multiprocessing.get_context("spawn")  # not fork: this process may hold threads (tracking, Ray)
        with ProcessPoolExecutor(min(self.processes, len(calls)), mp_context=spawn) as pool:
            return list(pool.map(tokenize_chunk, *zip(*calls)))

    def describe(self, n_chunks: int) -> str:
        if self.use_ray:
            import ray

            return f"Ray tasks on {int(ray.cluster_resources().get('CPU', 0))} CPUs"
        n = min(self.processes, n_chunks)
        return "this process" if n == 1 else f"{n} processes"


def prepare(spec: JobSpec, tok: Any, objective: Any, runner: Optional[Runner] = None, show: bool = False,
            chunk_rows: int = CHUNK_ROWS, accept: Callable[[PreparedManifest], None] = lambda m: None,
            ) -> tuple[PreparedManifest, bool]:
    """The job's prepared data: the committed entry of its key, or a new one built now (committed only if `accept`
    does not raise: e.g. enough examples for one global batch). Returns (manifest, built)."""
    key, inputs = prepared_key(spec, objective, tok)
    entry = prepared_entry(spec, key)
    try:
        found = read_manifest(entry)
    except CorruptPrepared as e:
        print(f"[ftdist] prepared data {e}: preparing it again", file=sys.stderr, flush=True)
        discard(spec, key)
        found = None
    if found is not None:
        accept(found)
        return found, False
    runner = runner or Runner()
    t0 = time.perf_counter()
    d = spec.data
    chunks = plan_chunks(d.train, "train", chunk_rows) + (plan_chunks(d.eval, "eval", chunk_rows) if d.eval else [])
    draw = _eval_draw(spec, chunks)
    meta = objective.prepare_meta()
    attempt = uuid.uuid4().hex[:12]
    job_json = spec.model_dump_json()
    calls = [(job_json, i, c, draw.get(i), entry, attempt, meta) for i, c in enumerate(chunks)]
    if show and sum(c.rows for c in chunks) > chunk_rows:  # a long one: say what is happening
        print(f"[ftdist] preparing {d.train}: {sum(c.rows for c in chunks)} rows in {len(chunks)} "
              f"chunk{'s' * (len(chunks) > 1)} on {runner.describe(len(chunks))} -> {entry}", file=sys.stderr, flush=True)
    store = open_store(entry)
    new_folders = _missing_folders(entry)
    try:
        results = runner.map(calls, tok)
        failed = next((r.error for r in results if r.error), None)
        if failed:
            raise SpecError(failed)
        manifest = _manifest(key, inputs, objective, results, meta, time.perf_counter() - t0,
                             runner.describe(len(calls)))
        if not manifest.train:
            raise SpecError(f"{d.train}: no usable training examples ({manifest.data_stats().summary()})")
        accept(manifest)
        if store.put_bytes(MANIFEST, manifest.model_dump_json(indent=1).encode(), if_absent=True):
            return manifest, True
    except BaseException:
        store.delete_prefix(attempt)  # nothing half-written stays
        for folder in new_folders:
            _rmdir_if_empty(folder)
        raise
    store.delete_prefix(attempt)  # another preparer committed first: use its parts
    winner = read_manifest(entry)
    assert winner is not None  # the conditional create failed: one is there
    return winner, False


def _missing_folders(entry: str) -> list[str]:
    """The local folders a preparation will create (deepest first): a failed one removes them again."""
    out = []
    folder = entry
    while not is_remote(entry) and not os.path.exists(folder) and os.path.dirname(folder) != folder:
        out.append(folder)
        folder = os.path.dirname(folder)
    return out


def _rmdir_if_empty(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:
        pass  # not empty (another preparer's entry), or gone


def _manifest(key: str, inputs: dict, objective: Any, results: list[ChunkResult], meta: dict, seconds: float,
              ran_on: str) -> PreparedManifest:
    stats = {"train": DataStats(), "eval": DataStats()}
    has_eval = False
    parts: dict[str, list[PreparedPart]] = {"train": [], "eval": []}
    for r in sorted(results, key=lambda r: r.index):
        for split, st in r.stats.items():
            stats[split].merge(DataStats(**st))
            has_eval |= split == "eval" and DataStats(**st).rows + DataStats(**st).skipped_bad > 0
        for split, p in r.parts.items():
            parts[split].append(PreparedPart(**p))
    return PreparedManifest(key=key, example_type=objective.example_type.__name__, inputs=inputs,
                            train=parts["train"], eval=parts["eval"], stats=asdict(stats["train"]),
                            eval_stats=asdict(stats["eval"]) if has_eval else None, meta=meta,
                            seconds=round(seconds, 3), ran_on=ran_on,
                            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _node_lock(key: str) -> Any:
    path = cache_root() / "prepared" / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a")
    fcntl.flock(fh, fcntl.LOCK_EX)
    return fh


def local_parts(spec: JobSpec, manifest: PreparedManifest) -> list[str]:
    """This node's verified copy of every part: s3:// parts downloaded and hashed once per node; local parts hashed
    once per node and stamped with size and modification time (a changed file is hashed again). The node's ranks take
    turns on a file lock. Raises CorruptPrepared naming the first part that does not match."""
    entry = prepared_entry(spec, manifest.key)
    parts = manifest.train + manifest.eval
    node_dir = cache_root() / "prepared" / manifest.key
    lock = _node_lock(manifest.key)
    try:
        node_dir.mkdir(parents=True, exist_ok=True)
        stamps_path = node_dir / "verified.json"
        stamps = json.loads(stamps_path.read_text()) if stamps_path.exists() else {}
        out = []
        for p in parts:
            if is_remote(entry):
                local = str(node_dir / p.path)
                if stamps.get(p.path) is None or not os.path.exists(local):
                    open_store(entry).get_files([(p.path, local)])
            else:
                local = os.path.join(entry, *p.path.split("/"))
            try:
                st = os.stat(local)
            except FileNotFoundError:
                raise CorruptPrepared(f"{entry}/{p.path}: missing") from None
            stamp = [st.st_size, st.st_mtime_ns, p.blake3]
            if stamps.get(p.path) != stamp:
                if st.st_size != p.size or file_digest(local) != p.blake3:
                    raise CorruptPrepared(f"{entry}/{p.path}: size or BLAKE3 differs from its manifest")
                stamps[p.path] = stamp
            out.append(local)
        stamps_path.write_text(json.dumps(stamps))
        return out
    finally:
        lock.close()


def discard(spec: JobSpec, key: str) -> None:
    """Remove an entry (its manifest first, so no reader takes it meanwhile) and this node's copy."""
    entry = prepared_entry(spec, key)
    open_store(entry).delete_prefix("", first=[MANIFEST])
    shutil.rmtree(cache_root() / "prepared" / key, ignore_errors=True)


def ensure_prepared(spec: JobSpec, tok: Any, objective: Any, runner: Optional[Runner] = None,
                    show: bool = False, accept: Callable[[PreparedManifest], None] = lambda m: None,
                    chunk_rows: int = CHUNK_ROWS) -> tuple[PreparedManifest, bool]:
    """prepare(), and this node's parts verified: a corrupt entry is discarded and built again, never used."""
    manifest, built = prepare(spec, tok, objective, runner, show, chunk_rows, accept)
    try:
        local_parts(spec, manifest)
    except CorruptPrepared as e:
        print(f"[ftdist] prepared data {e}: preparing it again", file=sys.stderr, flush=True)
        discard(spec, manifest.key)
        manifest, built = prepare(spec, tok, objective, runner, show, chunk_rows, accept)
        local_parts(spec, manifest)
    return manifest, built


def open_splits(spec: JobSpec, manifest: PreparedManifest, paths: list[str], objective: Any) -> Splits:
    objective.adopt(manifest.meta) if manifest.meta else None
    n_train = len(manifest.train)
    cls = objective.example_type
    return Splits(TokenTable(paths[:n_train], cls), TokenTable(paths[n_train:], cls), manifest.data_stats(),
                  manifest.eval_data_stats())


@dataclass
class SourceData:
    """One training source's examples as the loop reads them (a job without a mixture has one, named "train")."""

    name: str
    weight: float
    splits: Splits


def source_specs(spec: JobSpec) -> list[tuple[Any, JobSpec]]:
    """(source, the job as that source alone): each source is prepared, keyed and verified by itself, so a mixture's
    weights can change without tokenising anything again."""
    return [(src, spec.model_copy(update={"data": spec.data.for_source(src)})) for src in spec.data.sources]


def _source_objective(spec: JobSpec, objective: Any, alone: JobSpec) -> Any:
    """The job's objective, or (a mixture) one that reads this source's rows with the source's own options."""
    from ftdist.train.objectives import objective_for

    return objective_for(alone) if spec.data.is_mixture else objective


def worker_data(spec: JobSpec, tok: Any, objective: Any, rank: int, agree: Callable[[bool], bool],
                barrier: Callable[[], None], show: bool) -> list[SourceData]:
    """Every source's prepared examples for a training worker (see worker_splits)."""
    return [SourceData(src.label, src.weight,
                       worker_splits(alone, tok, _source_objective(spec, objective, alone), rank, agree, barrier,
                                     show))
            for src, alone in source_specs(spec)]


def prepare_sources(spec: JobSpec, tok: Any, objective: Any, runner: Optional[Runner] = None, show: bool = False,
                    chunk_rows: int = CHUNK_ROWS, accept: Callable[[int], None] = lambda n: None,
                    ) -> list[tuple[str, PreparedManifest, bool]]:
    """ensure_prepared() for every source. `accept(training examples of the sources with weight)` may refuse the
    whole before anything is verified on this node; then the entries this call built are removed again, with the
    folders it created: nothing stays of a refused job."""
    sources = source_specs(spec)
    objectives = [_source_objective(spec, objective, alone) for _, alone in sources]
    if len(sources) == 1:
        (src, alone), = sources
        m, built = ensure_prepared(alone, tok, objectives[0], runner, show, chunk_rows=chunk_rows,
                                   accept=lambda m: accept(m.train_rows))
        return [(src.label, m, built)]
    new_folders = _missing_folders(spec.prepared_root)
    built_here = []
    for (src, alone), obj in zip(sources, objectives):
        m, built = prepare(alone, tok, obj, runner, show, chunk_rows)
        built_here.append((alone, m.key, built, m.train_rows if src.weight > 0 else 0))
    try:
        accept(sum(n for *_, n in built_here))
    except BaseException:
        for alone, key, built, _ in built_here:
            if built:
                discard(alone, key)
        for folder in new_folders:
            _rmdir_if_empty(folder)
        raise
    return [(src.label, ensure_prepared(alone, tok, obj, runner, show, chunk_rows=chunk_rows)[0], built)
            for (src, alone), obj, (_, _, built, _) in zip(sources, objectives, built_here)]


def worker_splits(spec: JobSpec, tok: Any, objective: Any, rank: int, agree: Callable[[bool], bool],
                  barrier: Callable[[], None], show: bool) -> Splits:
    """A training worker's data: the prepared entry (normally built by the driver before Ray started), opened from
    this node's verified copy. Missing (a sweep trial with its own data options, a tokenizer only the workers
    reach) or corrupt on any rank: rank 0 prepares it here while the others wait, then every rank opens it."""
    if spec.prepared_root is None:
        return build_splits(spec.data, tok, spec.optim.seed, objective.encoder(tok), show)
    key, _ = prepared_key(spec, objective, tok)
    paths: list[str] = []
    try:
        manifest = read_manifest(prepared_entry(spec, key))
        if manifest is not None:
            paths = local_parts(spec, manifest)
    except CorruptPrepared as e:
        print(f"[ftdist] rank {rank}: prepared data {e}", file=sys.stderr, flush=True)
        manifest = None
    ok = manifest is not None
    if not agree(ok):
        if rank == 0:
            discard(spec, key)  # whatever is there failed on some rank
            ensure_prepared(spec, tok, objective, show=show)
        barrier()
        manifest = read_manifest(prepared_entry(spec, key))
        if manifest is None:
            raise RuntimeError(f"prepared data {prepared_entry(spec, key)}: no manifest after rank 0 prepared it")
        paths = local_parts(spec, manifest)
    return open_splits(spec, manifest, paths, objective)



# ---------------------------------------------------------------------------------------------------------------
# `ftdist data prepare`


def run_prepare(spec: JobSpec, *, address: Optional[str], processes: int, chunk_rows: Optional[int],
                force: bool) -> tuple[PreparedManifest, bool]:
    """Prepare the job's data ahead of training: Ray tasks over the cluster at `address` (or RAY_ADDRESS), else
    `processes` local processes. `force`: discard a committed entry of the same key and build it again."""
    from ftdist.train.locations import preflight_tokenizer
    from ftdist.train.objectives import objective_for
    from ftdist.train.ray_runtime import connect_ray, disconnect_ray

    if spec.prepared_root is None:
        raise SpecError("data.cache: off: nothing is prepared for this job (remove data.cache, or give a location)")
    check_prepared_root(spec)
    tok = preflight_tokenizer(spec.model)
    if tok is None:
        raise SpecError(f"model: {spec.model.tokenizer_path}: the tokenizer is not reachable from here; prepare on a "
                        f"machine that reaches it (or on the cluster: --address)")
    objective = objective_for(spec)
    if force:
        discard(spec, prepared_key(spec, objective, tok)[0])
    cluster = address or os.environ.get("RAY_ADDRESS")
    started = connect_ray(cluster, 1) if cluster else False
    try:
        return ensure_prepared(spec, tok, objective, Runner(processes, use_ray=bool(cluster)), show=True,
                               chunk_rows=chunk_rows or CHUNK_ROWS)
    finally:
        if cluster:
            disconnect_ray(started)


def describe(spec: JobSpec, manifest: PreparedManifest, built: bool) -> list[str]:
    """What `ftdist data prepare` prints: where, how fast, and the statistics users check before training."""
    st = manifest.data_stats()
    entry = prepared_entry(spec, manifest.key)
    if built:
        rate = st.tokens / manifest.seconds if manifest.seconds else 0.0
        head = (f"prepared {entry} in {manifest.seconds:.1f} s ({len(manifest.train) + len(manifest.eval)} parts "
                f"on {manifest.ran_on}; {rate:,.0f} tokens/s)")
    else:
        head = f"already prepared: {entry} (built {manifest.created_at}; reused as is)"
    lines = [head, f"train: {st.summary()}; {manifest.train_rows} examples"]
    ev = manifest.eval_data_stats()
    if ev is not None:
        lines.append(f"eval: {ev.summary()}; {manifest.eval_rows} examples")
    lines.append(f"lengths (tokens per example): {st.histogram()}")
    return lines
