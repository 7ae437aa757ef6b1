"""Some tensors of a `torch.save` file, read without the rest of it.

A torch.save file is an uncompressed zip: one pickle (`<archive>/data.pkl`) that describes the object and names,
for each tensor storage, the record holding its bytes (`<archive>/data/<key>`). Unpickling with every storage on
the meta device gives the whole object tree, shapes, strides and offsets included, for the price of the pickle
alone; the records of the tensors one asks for are then the only bytes to read.

ftdist uses this for ZeRO-3 exports: a rank's `*_optim_states.pt` holds its fp32 master weights (4 bytes per
parameter) beside Adam's two moments (8 bytes per parameter) that an export never reads. At checkpoint time the
byte ranges of the pickle and of the master weights' records go into the manifest, hashed on their own; an export
fetches only those ranges (a sparse local file: the moments are holes) and loads the weights from them here.
"""

from __future__ import annotations

import io
import mmap
import pickle
import struct
import zipfile
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch.serialization import StorageType

Select = Callable[[Any], list]
"""From the unpickled object, the tensors wanted (on the meta device until loaded)."""

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header, before its name and extra field


class Span(NamedTuple):
    """Where a record's bytes are in the file (a plain tuple to the storage layer, which hashes and fetches it)."""

    name: str
    offset: int
    size: int


def record_spans(path: str) -> dict[str, Span]:
    """Every record of a torch.save file: {name: Span of its data}. Records are stored uncompressed, so a record's
    bytes start after its local header (whose extra field torch pads to align tensor data; it is not the central
    directory's copy, hence read here)."""
    spans = {}
    with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: record {info.filename} is compressed; not a torch.save file")
            fh.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
            if fields[0] != b"PK\x03\x04":
                raise ValueError(f"{path}: no local header for {info.filename}")
            name_len, extra_len = fields[9], fields[10]
            spans[info.filename] = Span(info.filename, info.header_offset + _LOCAL_HEADER.size + name_len + extra_len,
                                        info.file_size)
    return spans


def _pickle_name(names: Any) -> str:
    found = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(found) != 1:
        raise ValueError(f"not a torch.save file (pickle records: {found})")
    return found[0]


class _MetaUnpickler(pickle.Unpickler):
    """torch.load's unpickling with every storage on the meta device; remembers each storage's record key."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.keys: dict[int, str] = {}

    def find_class(self, module: str, name: str) -> Any:
        if "Storage" in name:  # as torch.load: legacy storage classes name a dtype
            try:
                return StorageType(name)
            except KeyError:
                pass
        return super().find_class({"torch.tensor": "torch._tensor"}.get(module, module), name)

    def persistent_load(self, saved_id: Any) -> Any:
        _, storage_type, key, _location, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        storage = torch.UntypedStorage(numel * torch._utils._element_size(dtype), device="meta")
        self.keys[storage._cdata] = str(key)
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)


class LazyTorchFile:
    """A torch.save file's object with every tensor on the meta device, and the record each tensor's bytes are
    in. `pickle_bytes`: the file's `<archive>/data.pkl` record."""

    def __init__(self, pickle_bytes: bytes, archive: str) -> None:
        self.archive = archive
        unpickler = _MetaUnpickler(pickle_bytes)
        self.obj = unpickler.load()
        self._keys = unpickler.keys

    def record_of(self, t: torch.Tensor) -> str:
        return f"{self.archive}/data/{self._keys[t.untyped_storage()._cdata]}"


def spans_of(path: str, select: Select) -> Optional[list[Span]]:
    """The spans a later `load_selected` of this file needs: its pickle and the records behind `select(obj)`.
    None when `select` finds nothing there (KeyError/IndexError/TypeError: not the kind of file it reads)."""
    spans = record_spans(path)
    pkl = spans[_pickle_name(spans)]
    with open(path, "rb") as fh:
        fh.seek(pkl.offset)
        lazy = LazyTorchFile(fh.read(pkl.size), pkl.name.split("/")[0])
    try:
        wanted = select(lazy.obj)
    except (KeyError, IndexError, TypeError):
        return None
    records = sorted({lazy.record_of(t) for t in wanted}, key=lambda n: spans[n].offset)
    return [pkl] + [spans[n] for n in records]


def load_selected(path: str, spans: list[Span], select: Select) -> list[torch.Tensor]:
    """The tensors `select` picks from a torch.save file of which only `spans` (from `spans_of`, pickle first) are
    present: the rest may be holes of a sparse file. The tensors are copy-on-write views of a private memory map of
    the file: nothing is read into memory until used, and nothing is written back."""
    pkl, by_name = spans[0], {s.name: s for s in spans}
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    lazy = LazyTorchFile(mapped[pkl.offset:pkl.offset + pkl.size], pkl.name.split("/")[0])
    out = []
    for t in select(lazy.obj):
        name = lazy.record_of(t)
        span = by_name.get(name)
        if span is None:
            raise ValueError(f"{path}: record {name} was not fetched")
        data = torch.frombuffer(mapped, dtype=torch.uint8, count=span.size, offset=span.offset).view(t.dtype)
        out.append(data.as_strided(t.shape, t.stride(), t.storage_offset()))
    return out
