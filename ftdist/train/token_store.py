"""Tokenised examples on disk: Arrow IPC files (one per prepared part), read through a memory map.

Why Arrow IPC, uncompressed: a part opens without reading it (the schema and the record-batch offsets only), and an
example is two slices of mapped integer arrays, so a rank's anonymous memory does not grow with the data set and the
ranks of a node share one copy in the page cache. Parquet would decode every column into memory at open; NumPy
token files would need a hand-made schema for the pair and classifier examples (Arrow keeps ragged lists, nullable
columns and scalars in one self-describing file). Measured in `ftdist bench --only data`.

Any example dataclass is stored by its fields: a list of ints becomes a list<int32> column, an int an int64 column,
a float a float64 column; a field that is None in every example of a part is left out (the dataclass default comes
back). Fields declared with `compare=False` (computed later, e.g. DPO's reference log-probabilities) are not stored;
`TokenTable.overlay` attaches them after.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa

BATCH_ROWS = 4096
"""Examples per record batch: bounds the Python lists a writer holds."""


def stored_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.compare]


class PartWriter:
    """Appends examples of one dataclass to an Arrow IPC file, a record batch at a time."""

    def __init__(self, path: str, cls: type) -> None:
        self.path, self.cls = path, cls
        self.names = [f.name for f in stored_fields(cls)]
        self.rows: list[Any] = []
        self.count = 0
        self._writer: Optional[pa.ipc.RecordBatchFileWriter] = None
        self._schema: Optional[pa.Schema] = None

    def add(self, example: Any) -> None:
        self.rows.append(example)
        if len(self.rows) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        columns = {}
        for name in self.names if self._schema is None else self._schema.names:
            values = [getattr(r, name) for r in self.rows]
            if self._schema is None and all(v is None for v in values):
                continue  # absent for this tokenizer (e.g. token_type_ids of a Llama tokenizer): the same in every row
            columns[name] = pa.array(values, type=_arrow_type(values) if self._schema is None
                                     else self._schema.field(name).type)
        batch = pa.RecordBatch.from_pydict(columns)
        if self._writer is None:
            self._schema = batch.schema
            self._writer = pa.ipc.new_file(self.path, self._schema)
        self._writer.write_batch(batch.select(self._schema.names))
        self.count += len(self.rows)
        self.rows = []

    def close(self) -> int:
        """Finish the file (an empty part is a valid file with no rows) and return its row count."""
        self._flush()
        if self._writer is None:
            self._writer = pa.ipc.new_file(self.path, pa.schema([]))
        self._writer.close()
        return self.count


def _arrow_type(values: list) -> pa.DataType:
    sample = next(v for v in values if v is not None)
    if isinstance(sample, list):
        return pa.list_(pa.int32())
    if isinstance(sample, bool) or isinstance(sample, int):
        return pa.int64()
    if isinstance(sample, float):
        return pa.float64()
    raise TypeError(f"cannot store a field of type {type(sample).__name__}")


class _Column:
    """One column of one record batch as NumPy views of the mapped buffers (no copy)."""

    def __init__(self, arr: pa.Array) -> None:
        self.ragged = pa.types.is_list(arr.type)
        self.valid = None if arr.null_count == 0 else np.asarray(arr.is_valid())
        if self.ragged:
            self.offsets = arr.offsets.to_numpy()  # [n + 1]
            self.values = arr.values.to_numpy()  # flat int32
        else:
            self.values = arr.to_numpy(zero_copy_only=False)

    def get(self, i: int) -> Any:
        if self.valid is not None and not self.valid[i]:
            return None
        if self.ragged:
            return self.values[self.offsets[i]:self.offsets[i + 1]].tolist()
        return self.values[i].item()

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class TokenTable(Sequence):
    """The examples of one or more part files, in order, decoded on access (a Sequence: len, [i], [a:b])."""

    def __init__(self, paths: Iterable[str], cls: type) -> None:
        self.cls = cls
        self.batches: list[dict[str, _Column]] = []
        self.starts: list[int] = []  # the global index of each record batch's first example
        self.overlay: dict[str, np.ndarray] = {}
        n = 0
        for path in paths:
            reader = pa.ipc.open_file(pa.memory_map(path, "r"))
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                if batch.num_rows == 0:
                    continue
                self.starts.append(n)
                self.batches.append({name: _Column(batch.column(name)) for name in batch.schema.names})
                n += batch.num_rows
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        b = bisect.bisect_right(self.starts, i) - 1
        local = i - self.starts[b]
        values = {name: col.get(local) for name, col in self.batches[b].items()}
        for name, arr in self.overlay.items():
            values[name] = tuple(arr[i].tolist())
        return self.cls(**values)

    def lengths(self, field: str) -> np.ndarray:
        """[N] the length of a list field in every example (vectorised, for statistics and packing)."""
        return np.concatenate([b[field].lengths() for b in self.batches]) if self.batches else np.zeros(0, int)
