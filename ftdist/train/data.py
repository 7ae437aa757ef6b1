"""Training data: read JSONL/Parquet/`datasets` folders (local or s3://), tokenize with prompt masking, pack,
split off eval, and hand every rank a disjoint shard with the same number of steps. Knows nothing of DeepSpeed.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from ftdist.errors import SpecError, did_you_mean
from ftdist.spec import DataSpec
from ftdist.storage.cache import download
from ftdist.storage.uri import is_remote
from ftdist.progress import progress
from ftdist.train.packing import best_fit_decreasing

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
"""The roles of OpenAI-style message lists that Hugging Face chat templates render."""


# ---------------------------------------------------------------------------------------------------------------
# Reading rows


@dataclass
class Row:
    where: str  # "file:line" (JSONL) or "file:row N" (Parquet / datasets)
    data: Any


def _local_copy(uri: str) -> str:
    """A local path for `uri`; `s3://` objects/prefixes are downloaded once into the node cache."""
    if is_remote(uri):
        return download(uri)
    return uri


def data_files(path: str, local: Optional[str] = None) -> tuple[str, list[tuple[str, str]]]:
    """("hf", [(folder, shown)]) for a `datasets.save_to_disk` folder, else ("files", [(local file, shown path)]) of a
    JSONL/Parquet file or a folder of those (sorted by name); s3:// data is downloaded into the node cache first
    (unless `local` is its copy already)."""
    local = local or _local_copy(path)
    if os.path.isdir(local):
        if os.path.exists(os.path.join(local, "dataset_info.json")) or os.path.exists(
            os.path.join(local, "dataset_dict.json")
        ):
            return "hf", [(local, path)]
        files = sorted(
            f for f in os.listdir(local) if f.endswith((".jsonl", ".json", ".parquet")) and not f.startswith(".")
        )
        if not files:
            raise SpecError(f"{path}: folder has no .jsonl/.parquet files and is not a datasets save_to_disk folder")
        return "files", [(os.path.join(local, f), f"{path.rstrip('/')}/{f}") for f in files]
    if not os.path.exists(local):
        raise SpecError(f"{path}: no such file or directory")
    return "files", [(local, path)]


def read_rows(path: str) -> list[Row]:
    """All rows of a JSONL file, Parquet file, folder of those, or `datasets.save_to_disk` folder."""
    kind, files = data_files(path)
    if kind == "hf":
        return list(hf_rows(*files[0]))
    rows: list[Row] = []
    for local, shown in files:
        rows.extend(parquet_rows(local, shown) if local.endswith(".parquet") else jsonl_rows(local, shown))
    return rows


def open_parquet(local: str, shown: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(local)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise SpecError(f"{shown}: not a readable Parquet file ({e.__class__.__name__})") from None


def parquet_rows(local: str, shown: str, groups: Optional[list[int]] = None, first_row: int = 0) -> Iterator[Row]:
    """The rows of a Parquet file (or of some of its row groups, the first being row `first_row` of the file)."""
    f = open_parquet(local, shown)
    try:
        table = f.read() if groups is None else f.read_row_groups(groups)
    except Exception as e:  # noqa: BLE001  (a truncated or corrupt column chunk)
        raise SpecError(f"{shown}: not a readable Parquet file ({e.__class__.__name__})") from None
    for i, r in enumerate(table.to_pylist(), first_row):
        yield Row(f"{shown}:row {i + 1}", r)


def jsonl_rows(local: str, shown: str, start: int = 0, stop: Optional[int] = None,
               first_line: int = 1) -> Iterator[Row]:
    """The rows of a JSONL file, or of its bytes [start, stop) that begin at line `first_line` (blank lines are
    not rows; a line that is not JSON is a row that fails to encode, named by its line)."""
    with open(local, "rb") as fh:
        fh.seek(start)
        pos, lineno = start, first_line - 1
        for raw in fh:
            if stop is not None and pos >= stop:
                break
            pos += len(raw)
            lineno += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SpecError(f"{shown}: not UTF-8 text (expected JSONL)") from None
            if not line.strip():
                continue
            try:
                yield Row(f"{shown}:{lineno}", json.loads(line))
            except json.JSONDecodeError as e:
                yield Row(f"{shown}:{lineno}", _BadJson(e.msg))


def hf_rows(local: str, shown: str, start: int = 0, stop: Optional[int] = None) -> Iterator[Row]:
    ds = load_hf_disk(local, shown)
    for i in range(start, len(ds) if stop is None else stop):
        yield Row(f"{shown}:row {i + 1}", ds[i])


def load_hf_disk(local: str, shown: str) -> Any:
    import datasets  # ~1 s to import, and only save_to_disk folders need it

    ds = datasets.load_from_disk(local)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise SpecError(f"{shown}: DatasetDict has no 'train' split (has {sorted(ds)})")
        ds = ds["train"]
    return ds


@dataclass
class _BadJson:
    msg: str


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing


class OneSequence:
    """An example that feeds the model one sequence, `input_ids` (SFT's, a classifier's)."""

    input_ids: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def longest(self) -> int:
        """The longest sequence the example feeds the model (max_length applies to it)."""
        return len(self.input_ids)


@dataclass
class Example(OneSequence):
    input_ids: list[int]
    labels: list[int]

    def truncated(self, max_length: int) -> "Example":
        return Example(self.input_ids[:max_length], self.labels[:max_length])

    @property
    def has_target(self) -> bool:
        return has_target(self.labels)


@dataclass
class DataStats:
    rows: int = 0
    skipped_bad: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    bad_examples: list[str] = field(default_factory=list)
    lengths: dict[str, int] = field(default_factory=dict)
    """Examples by token count: {"<=64": n, "<=128": n, ...} (powers of two)."""

    def count(self, n_tokens: int) -> None:
        self.tokens += n_tokens
        bucket = f"<={max(64, 1 << max(0, n_tokens - 1).bit_length())}"
        self.lengths[bucket] = self.lengths.get(bucket, 0) + 1

    def merge(self, other: "DataStats") -> None:
        """Add another part's counts (parts merged in data order: the first bad rows stay first)."""
        for name in ("rows", "skipped_bad", "truncated", "dropped_no_target", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.bad_examples = (self.bad_examples + other.bad_examples)[:3]
        for k, v in other.lengths.items():
            self.lengths[k] = self.lengths.get(k, 0) + v

    def histogram(self) -> str:
        """`<=64: 10, <=128: 250, ...` in length order."""
        keys = sorted(self.lengths, key=lambda k: int(k[2:]))
        return ", ".join(f"{k}: {self.lengths[k]}" for k in keys)

    def summary(self) -> str:
        s = f"{self.rows} rows, {self.tokens} tokens"
        if self.truncated:
            s += f", {self.truncated} truncated to max_length"
        if self.skipped_bad:
            s += f", {self.skipped_bad} bad rows skipped (first: {self.bad_examples[0]})"
        if self.dropped_no_target:
            s += f", {self.dropped_no_target} dropped (no trainable tokens left)"
        return s


class RowError(Exception):
    pass


def json_object(row: Any) -> dict:
    """A row as read (a JSONL line, a Parquet/datasets record) that must be an object to be encoded."""
    if isinstance(row, _BadJson):
        raise RowError(f"invalid JSON: {row.msg}")
    if not isinstance(row, dict):
        raise RowError("row is not a JSON object")
    return row


def has_target(labels: list[int]) -> bool:
    """Some token after the first carries loss (the first is never predicted)."""
    return any(x != IGNORE_INDEX for x in labels[1:])


def _field(row: dict, name: str, kind: type) -> Any:
    if name not in row:
        raise RowError(f"missing field {name!r}")
    v = row[name]
    if not isinstance(v, kind):
        raise RowError(f"field {name!r} must be {kind.__name__}, got {type(v).__name__}")
    return v


class Tokenize:
    """Turn one row into (input_ids, labels) per the data spec; labels are IGNORE_INDEX where no loss is taken."""

    def __init__(self, tokenizer: Any, spec: DataSpec):
        self.tok = tokenizer
        self.spec = spec
        self.bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if spec.format == "chat" and spec.chat_template:
            tokenizer.chat_template = spec.chat_template
        if spec.format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise SpecError("data.format chat: the tokenizer has no chat template; set data.chat_template")
        if spec.format == "chat":
            _check_template(tokenizer, "data.chat_template" if spec.chat_template else "the tokenizer's chat_template")
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._encoded: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._encoded.get(text)
        return list(ids) if ids is not None else self.tok(text, add_special_tokens=False)["input_ids"]

    def warm(self, rows: list) -> None:
        """Encode the string fields of the next rows in one batched call into the fast tokenizer's Rust core, for
        `encode` to find: the per-call wrapper of transformers cost 3/4 of a preparation's time (measured: 9.4k
        rows/s before, see `ftdist bench --only data`). Used only where the core gives what the wrapper gives
        (checked on the first text)."""
        texts = [v for r in rows if isinstance(r, dict) for v in r.values() if isinstance(v, str)]
        if self._backend is None or not texts:
            return
        encoded = [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        if encoded[0] != self.tok(texts[0], add_special_tokens=False)["input_ids"]:
            self._backend = None  # a tokenizer whose Python side changes the encoding: the slow path stays
            return
        self._encoded = dict(zip(texts, encoded))

    def __call__(self, row: Any) -> Example:
        row = json_object(row)
        s = self.spec
        if s.format == "text":
            ids = self.bos + self.encode(_field(row, s.text_field, str)) + self.eos
            return Example(ids, list(ids))
        if s.format == "prompt_completion":
            # Tokenize the two parts apart so the boundary is exact (no BPE merge across it).
            p = self.bos + self.encode(_field(row, s.prompt_field, str))
            c = self.encode(_field(row, s.completion_field, str))
            if not c:  # checked before EOS goes on: an empty completion would train on EOS alone
                raise RowError(f"field {s.completion_field!r} is empty")
            c += self.eos
            mask_p = [IGNORE_INDEX] * len(p) if s.loss_on_completion_only else list(p)
            return Example(p + c, mask_p + c)
        return self._chat(_field(row, s.messages_field, list))

    def render(self, messages: list, gen_prompt: bool) -> list[int]:
        try:
            out = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen_prompt)
        except Exception as e:  # noqa: BLE001  (templates raise jinja2 errors, ValueError, ...) a row's problem
            detail = " ".join(str(e).split())[:160]
            raise RowError(f"the chat template refused this conversation: {detail or type(e).__name__}") from None
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    def _chat(self, messages: list) -> Example:
        if not messages:
            raise RowError("conversation has no messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RowError(f"message {i} needs string 'role' and 'content'")
            if m["role"] not in CHAT_ROLES:
                raise RowError(f"message {i} has role {m['role'][:40]!r}{did_you_mean(m['role'], CHAT_ROLES)}; roles "
                               f"are {', '.join(CHAT_ROLES)}")
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError("conversation has no assistant message")
        ids: list[int] = []
        labels: list[int] = []
        # Render growing prefixes: the tokens each message adds are its span. Assistant spans (after the
        # generation prompt) carry loss; everything else is masked when completion_only_loss is on.
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                head = self.render(messages[:i], gen_prompt=True) if i else []
                if head[: len(ids)] != ids:
                    raise RowError("chat template is not prefix-stable; cannot locate assistant tokens")
                labels += [IGNORE_INDEX] * (len(head) - len(ids)) if self.spec.loss_on_completion_only else head[len(ids):]
                ids = head
            full = self.render(messages[: i + 1], gen_prompt=False)
            if full[: len(ids)] != ids:
                raise RowError("chat template is not prefix-stable; cannot locate assistant tokens")
            new = full[len(ids):]
            trainable = m["role"] == "assistant" or not self.spec.loss_on_completion_only
            labels += new if trainable else [IGNORE_INDEX] * len(new)
            ids = full
        return Example(ids, labels)


def _check_template(tokenizer: Any, key: str) -> None:
    """A template that does not compile is the job's mistake, not every row's: one line naming it."""
    from jinja2 import TemplateSyntaxError

    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
        tokenizer.apply_chat_template(probe, tokenize=False)
    except TemplateSyntaxError as e:
        raise SpecError(f"{key}: not a valid Jinja template (template line {e.lineno}: {e.message})") from None
    except Exception:  # noqa: BLE001  (a template may refuse the probe conversation itself: rows are checked later)
        pass


def _adds_bos(tok: Any) -> bool:
    if tok.bos_token_id is None:
        return False
    probe = tok("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tok.bos_token_id


WARM_ROWS = 512
"""Rows whose strings an encoder with `warm` tokenises in one batched call."""


def encoded_rows(rows: Iterable[Row], encode: Callable[[Any], Any]) -> Iterator[Row]:
    """The rows, with each next WARM_ROWS handed to the encoder's `warm` (batched tokenisation) before they are
    encoded one by one."""
    warm = getattr(encode, "warm", None)
    it = iter(rows)
    while batch := list(itertools.islice(it, WARM_ROWS)):
        if warm is not None:
            warm([r.data for r in batch])
        yield from batch


def encode_row(row: Row, encode: Callable[[Any], Any], spec: DataSpec, stats: DataStats) -> Optional[Any]:
    """A row's example, counted in `stats`, cut to max_length (packing places whole examples: the same cut); None
    when it is skipped (bad, under on_bad_row skip; or nothing left to train on). A bad row under on_bad_row fail
    is a SpecError naming its file:line."""
    try:
        ex = encode(row.data)
    except RowError as e:
        if spec.on_bad_row == "fail":
            raise SpecError(f"{row.where}: bad row: {e} (set data.on_bad_row: skip to skip and count)") from None
        stats.skipped_bad += 1
        if len(stats.bad_examples) < 3:
            stats.bad_examples.append(f"{row.where}: {e}")
        return None
    stats.rows += 1
    if ex.longest > spec.max_length:
        stats.truncated += 1
        ex = ex.truncated(spec.max_length)
    if not ex.has_target:
        stats.dropped_no_target += 1
        return None
    stats.count(ex.n_tokens)
    return ex


def tokenize_rows(rows: list[Row], tok: Callable[[Any], Example], spec: DataSpec, stats: DataStats,
                  show: bool = False, what: str = "tokenising") -> list[Example]:
    shown = progress(rows, len(rows), what, show=show, stream=sys.stdout)
    return [ex for r in encoded_rows(shown, tok) if (ex := encode_row(r, tok, spec, stats)) is not None]


@dataclass
class PackedExample(OneSequence):
    """Whole examples in one block, each with positions from 0 (packing.py says why)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    @property
    def has_target(self) -> bool:
        return has_target(self.labels)


def pack(examples: list[Example], max_length: int) -> list[PackedExample]:
    """Whole examples (each already cut to max_length) into blocks of at most max_length tokens, best fit
    decreasing; a document's first token carries no loss (it would be predicted from the previous document)."""
    out = []
    for group in best_fit_decreasing([len(e.input_ids) for e in examples], max_length):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in group:
            e = examples[i]
            ids += e.input_ids
            labels += [IGNORE_INDEX] + e.labels[1:]
            positions += range(len(e.input_ids))
        block = PackedExample(ids, labels, positions)
        if block.has_target:
            out.append(block)
    return out


@dataclass
class Splits:
    train: Sequence
    """Examples (a list, or a TokenTable of prepared data)."""
    eval: Sequence
    stats: DataStats
    eval_stats: Optional[DataStats]


def build_splits(spec: DataSpec, tokenizer: Any, seed: int,
                 encode: Optional[Callable[[Any], Example]] = None, show: bool = False) -> Splits:
    """Train and eval examples in memory (data.cache: off, tests, the benchmark's baseline; runs use prepared data,
    train/prepare.py); `encode` turns a row into an example (the objective's; default: SFT's Tokenize)."""
    tok = encode or Tokenize(tokenizer, spec)
    stats = DataStats()
    rows = read_rows(spec.train)
    eval_rows: list[Row] = []
    if spec.eval_fraction > 0:
        eval_idx = set(eval_draw(len(rows), spec.eval_fraction, seed).tolist())
        eval_rows = [r for i, r in enumerate(rows) if i in eval_idx]
        rows = [r for i, r in enumerate(rows) if i not in eval_idx]
    elif spec.eval:
        eval_rows = read_rows(spec.eval)
    train = tokenize_rows(rows, tok, spec, stats, show, f"tokenising {spec.train}")
    eval_stats = DataStats() if eval_rows else None
    ev = tokenize_rows(eval_rows, tok, spec, eval_stats, show, "tokenising the eval rows") if eval_rows else []
    if spec.packing:
        train = pack(train, spec.max_length)
        ev = pack(ev, spec.max_length) if ev else []
    if not train:
        raise SpecError(f"{spec.train}: no usable training examples ({stats.summary()})")
    return Splits(train, ev, stats, eval_stats)


def eval_draw(n_rows: int, fraction: float, seed: int) -> np.ndarray:
    """The rows (indices) that data.eval_fraction holds out: a seeded draw, at least one."""
    return np.random.default_rng(seed).permutation(n_rows)[:max(1, int(round(n_rows * fraction)))]


def right_padded(seqs: list[list[int]], fill: int, width: Optional[int] = None) -> torch.Tensor:
    """[N, width (default: the longest)] the sequences left-aligned, `fill` after each: every objective's batches
    are right-padded (a sequence head reads each row's last non-pad token)."""
    out = torch.full((len(seqs), width or max(len(s) for s in seqs)), fill, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def attention_mask(seqs: list[list[int]]) -> torch.Tensor:
    """[N, longest] 1 on each sequence's tokens, 0 on the padding after them."""
    lengths = torch.tensor([len(s) for s in seqs])
    return (torch.arange(int(lengths.max())) < lengths[:, None]).long()


def collate_packed(batch: list[PackedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Blocks right-padded to the longest; the padding is one more "document" (positions from 0, no loss) so it
    never joins a real one. No attention mask: the position ids carry the document boundaries."""
    ids = right_padded([e.input_ids for e in batch], pad_id)  # [B, T]
    width = ids.shape[1]
    positions = torch.stack([torch.tensor(e.position_ids + list(range(width - len(e.position_ids))))
                             for e in batch])  # [B, T]
    return {"input_ids": ids, "labels": right_padded([e.labels for e in batch], IGNORE_INDEX, width),
            "position_ids": positions, "token_count": torch.tensor(sum(len(e.input_ids) for e in batch))}


def collate(batch: list[Example], pad_id: int) -> dict:
    ids = [e.input_ids for e in batch]
    padded = right_padded(ids, pad_id)  # [B, T]
    return {"input_ids": padded, "labels": right_padded([e.labels for e in batch], IGNORE_INDEX, padded.shape[1]),
            "attention_mask": attention_mask(ids)}


def eval_batches(examples: list[Example], micro_batch: int, rank: int, world: int,
                 max_batches: Optional[int]) -> list[list[Example]]:
    """Every rank gets the same number of eval batches (the shard is padded by wrapping, weights fixed later)."""
    per_rank = math.ceil(len(examples) / world)
    shard = examples[rank * per_rank:(rank + 1) * per_rank]
    out = [shard[i:i + micro_batch] for i in range(0, len(shard), micro_batch)]
    n = math.ceil(per_rank / micro_batch)
    if max_batches:
        n = min(n, max_batches)
    out = out[:n]
    while len(out) < n:  # this rank ran short: empty batches keep the all_reduce count equal
        out.append([])
    return out
