"""The one export path: a Hugging Face model folder (sharded safetensors + index, config, tokenizer) from a
committed checkpoint, written one tensor at a time. `ftdist export`, the end of every `ftdist train` and a sweep's
best trial (both a 1-CPU Ray task, driver.run_export_task) all come here; no process ever gathers the whole model.

Memory stays bounded by one output shard plus one tensor: checkpoint files are memory-mapped (torch.load(mmap=True)),
ZeRO-3 parameters are stitched from the per-rank flat fp32 partitions one at a time, and shards are flushed as they
fill. The method policy (full/freeze weights; LoRA adapter and/or merged; WiSE-FT weight interpolation with the
base model) is a chain of stream transforms with one branch on the method.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from typing import Any, Callable, Iterator, Optional

import torch
from deepspeed.utils.zero_to_fp32 import GatheredTensor, zero3_partitioned_param_info
from safetensors import safe_open
from safetensors.torch import save_file

from ftdist.spec import parse_size
from ftdist.storage.cache import publish_dir
from ftdist.storage.checkpoints import STEP_DIR, CheckpointStore
from ftdist.storage.manifest import FileEntry, Manifest
from ftdist.train.contracts import FROZEN_FILE, STATE_FILE, TrainState
from ftdist.train.heads import HeadLayout, stored_name
from ftdist.train.locations import resolve_location
from ftdist.train.partial_load import Span, load_selected, spans_of

Tensors = Iterator[tuple[str, Any]]



class ShardWriter:
    """Collect tensors into safetensors shards of at most max_shard_size bytes; write the HF index at the end."""

    def __init__(self, out_dir: str, max_shard_size: str = "5GB", prefix: str = "model"):
        self.out_dir, self.limit, self.prefix = out_dir, parse_size(max_shard_size), prefix
        os.makedirs(out_dir, exist_ok=True)
        self.current: dict = {}
        self.current_bytes = 0
        self._views: set[tuple] = set()  # (storage address, offset, shape, stride) of this shard's tensors
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, t: Any) -> None:
        n = t.numel() * t.element_size()
        if self.current and self.current_bytes + n > self.limit:
            self._flush()
        # A checkpoint's module weights can share storage: tied weights (lm_head = embed_tokens) are one tensor,
        # and DeepSpeed's ZeRO 1-2 parameters are views into flat buffers. safetensors refuses both in one file.
        # The same view twice is a tied weight: written once, as save_pretrained does (loading re-ties it).
        # (Only tensors of this shard are compared: they are alive, so no address can have been reused.)
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if view in self._views:
            return
        shared = any(v[0] == view[0] for v in self._views)
        self._views.add(view)
        self.current[name] = t.clone() if shared else t.contiguous()
        self.current_bytes += n
        self.total += n

    def _flush(self) -> None:
        idx = len(self.shards)
        save_file(self.current, os.path.join(self.out_dir, f".shard-{idx:05d}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes, self._views = {}, 0, set()

    def close(self) -> list[str]:
        if self.current or not self.shards:
            self._flush()
        n = len(self.shards)
        names = ([f"{self.prefix}.safetensors"] if n == 1
                 else [f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        for i, fname in enumerate(names):
            os.replace(os.path.join(self.out_dir, f".shard-{i:05d}.safetensors"), os.path.join(self.out_dir, fname))
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: names[i] for i, keys in enumerate(self.shards) for k in keys}}
            with open(os.path.join(self.out_dir, f"{self.prefix}.safetensors.index.json"), "w") as fh:
                json.dump(index, fh, indent=2, sort_keys=True)
        return names


# --- reading a DeepSpeed checkpoint lazily --------------------------------------------------------------------------


_OPTIM_FILE = re.compile(r"optim_states\.pt$")
_RNG_FILE = re.compile(r"rng_state_rank\d+\.pt$")


def _torch_load(path: str) -> dict:
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def fp32_partitions(optim_state: Any) -> list:
    """Where a ZeRO-3 rank's optimizer file keeps its fp32 master weights (one flat partition per param group)."""
    return optim_state["optimizer_state_dict"]["fp32_flat_groups"]


def whole_file_partitions(path: str) -> list:
    """The fp32 master weights of a downloaded (whole) ZeRO-3 optimizer file, memory-mapped."""
    return fp32_partitions(_torch_load(path))


def export_records(path: str) -> Optional[list[Span]]:
    """At checkpoint time, the ranges of a ZeRO-3 optimizer file that an export reads (the pickle and the fp32
    master weights; not the Adam moments, two thirds of its bytes), for the manifest; None for other files."""
    if not _OPTIM_FILE.search(path):
        return None
    try:
        return spans_of(path, fp32_partitions)
    except (ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        # The ranges only spare an export the moments' download; without them it reads the whole file, as for a
        # checkpoint from before them. A layout this reader does not know must not fail the checkpoint.
        warnings.warn(f"{path}: no export ranges listed ({e}); an export downloads the whole file")
        return None


def iter_checkpoint_tensors(ckpt_dir: str, tag: str, zero_stage: int,
                            want: Callable[[str], bool] = lambda _: True,
                            partitions: Callable[[str], list] = whole_file_partitions) -> Tensors:
    """(name, tensor) of every parameter and buffer of the trained module whose name passes `want`, one at a time.
    ZeRO 0-2: the module weights saved by rank 0 (memory-mapped). ZeRO-3: fp32 master weights of trainable
    parameters stitched from each rank's flat partition (`partitions` reads them from a rank's optimizer file);
    frozen ones from each rank's fragments. `zero_stage` is the manifest's (what the checkpoint says it is, not a
    guess from its file names)."""
    tag_dir = os.path.join(ckpt_dir, tag)

    def by_rank(pattern: str) -> list[str]:
        return sorted(glob.glob(os.path.join(tag_dir, pattern)),
                      key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p).group(1)))

    if zero_stage < 3:
        sd = _torch_load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"))["module"]
        yield from ((k, v) for k, v in sd.items() if want(k))
        return
    z3_models = by_rank("zero_pp_rank_*_mp_rank_00_model_states.pt")

    models = [_torch_load(p) for p in z3_models]
    world = len(models)
    optim_files = by_rank("*zero_pp_rank_*_mp_rank_00_optim_states.pt")
    if len(optim_files) != world:
        raise RuntimeError(f"{tag_dir}: {len(optim_files)} optimizer shards for {world} ranks")
    flat = [partitions(p) for p in optim_files]
    m0 = models[0]
    buffers = set(m0.get("buffer_names", []))
    for k, v in m0["module"].items():
        if k in buffers and want(k):
            yield k, v
    for name, shape in (m0.get("frozen_param_shapes") or {}).items():
        if want(name):
            frags = [m["frozen_param_fragments"][name] for m in models]
            yield name, torch.cat(frags, 0).narrow(0, 0, shape.numel()).view(shape)
    shapes = {k: v for d in m0["param_shapes"] for k, v in d.items()}
    offsets = [0] + list(itertools.accumulate(t.numel() for t in flat[0]))
    where, offset = {}, 0
    for name, shape in shapes.items():
        part, _ = zero3_partitioned_param_info(shape.numel(), world)
        where[name] = (offset, part, shape)
        offset += part
    aliases = {src: alias for alias, src in m0.get("shared_params", {}).items()}
    for name, (off, part, shape) in where.items():
        for out in [name] + ([aliases[name]] if name in aliases else []):
            if want(out):
                yield out, GatheredTensor(flat, offsets, off, part, shape).contiguous()


# --- method policy: stream transforms -------------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


def lora_scale(adapter_cfg: dict) -> float:
    r = adapter_cfg["r"]
    return adapter_cfg["lora_alpha"] / (r ** 0.5 if adapter_cfg.get("use_rslora") else r)


def _is_lora(name: str) -> bool:
    return ".lora_" in name


SAVED_WHOLE = ".modules_to_save.default."
"""peft's trained copy of a module the adapter carries whole (a new score head); `.original_module.` is the frozen
original it replaced."""


def _in_adapter(name: str) -> bool:
    return _is_lora(name) or SAVED_WHOLE in name


def _plain(name: str) -> str:
    """A merged tensor's plain Hugging Face name."""
    name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    return name.replace(SAVED_WHOLE, ".").replace(".base_layer.", ".")


DORA_MAGNITUDE = "lora_magnitude_vector.default.weight"
"""DoRA's trained magnitude of a module's outputs, as the model names it; peft's adapter file says
`<module>.lora_magnitude_vector`."""


def merged_lora(read: Callable[..., Tensors], adapter_cfg: dict) -> Tensors:
    """Fold LoRA into the base weights, W' = W + scale * B @ A, under plain HF names. The adapter tensors (small)
    are read first; then base weights stream by one at a time."""
    scale = lora_scale(adapter_cfg)
    fan_in_fan_out = adapter_cfg.get("fan_in_fan_out", False)
    lora = dict(read(want=_is_lora))
    for name, t in read(want=lambda n: not _is_lora(n) and ".original_module." not in n):
        if name.endswith(".base_layer.weight"):
            mod = name[: -len(".base_layer.weight")]
            a, b = lora.get(f"{mod}.lora_A.default.weight"), lora.get(f"{mod}.lora_B.default.weight")
            if a is not None and b is not None:
                delta = (b.float() @ a.float()) * scale
                w = t.float() + (delta.T if fan_in_fan_out else delta)
                magnitude = lora.get(f"{mod}.{DORA_MAGNITUDE}")
                if magnitude is not None:  # DoRA: each output's row rescaled to its trained magnitude (peft's merge)
                    rows = w.T if fan_in_fan_out else w
                    rows = rows * (magnitude.float() / torch.linalg.norm(rows, dim=1)).view(-1, 1)
                    w = rows.T if fan_in_fan_out else rows
                t = w.to(t.dtype)
        yield _plain(name), t


def adapter_only(stream: Tensors, alpha: Optional[float] = None) -> Tensors:
    """peft's adapter_model.safetensors naming (no adapter name; a module saved whole under its own name); WiSE-FT
    on an adapter scales B by alpha (W + alpha * scale * B @ A is exactly the interpolation between base and
    merged weights; a new head, which the base does not have, stays as trained). (Under DoRA it is not: the
    magnitude renormalises the direction, so no adapter reproduces the interpolated weights: the export refuses.)"""
    for name, t in stream:
        if name.endswith(DORA_MAGNITUDE):
            name = name[: -len(".default.weight")]
        out = name.replace(SAVED_WHOLE, ".").replace(".default.", ".")
        if alpha is not None and ".lora_B." in name:
            t = (t.float() * alpha).to(t.dtype)
        yield out, t


def interpolated(stream: Tensors, base: "BaseWeights", alpha: float, layout: HeadLayout = HeadLayout()) -> Tensors:
    """WiSE-FT (Wortsman et al., 2022): theta = (1 - alpha) * theta_base + alpha * theta_finetuned. A head trained
    from scratch has no base to move toward and stays as trained (the backbone is interpolated); a tied output
    embedding moves toward the base's input embedding, which is the same matrix."""
    for name, t in stream:
        if not t.is_floating_point():
            yield name, t
            continue
        b = base.get(name, layout.backbone)
        if b is None and name in dict(layout.tied):  # a tied output embedding: the base stores the input one
            b = base.get(dict(layout.tied)[name], layout.backbone)
        if b is None and layout.in_head(name):
            yield name, t
            continue
        if b is None:
            raise KeyError(f"base model has no tensor {name}; is it the model this job fine-tuned?")
        yield name, ((1 - alpha) * b.float() + alpha * t.float()).to(t.dtype)


def cast(stream: Tensors, dtype: Any) -> Tensors:
    for name, t in stream:
        yield name, t.to(dtype) if t.is_floating_point() and dtype is not None else t


class BaseWeights:
    """Lazy access to a Hugging Face checkpoint's safetensors by tensor name (for interpolation)."""

    def __init__(self, model_dir: str):
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"{model_dir}: no *.safetensors weights to interpolate with")
        self.handles = [safe_open(f, framework="pt") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}

    def get(self, name: str, backbone: Optional[str] = None) -> Any:
        """The base's tensor of that name (stored with or without the backbone's prefix), or None."""
        key = stored_name(name, self.where, backbone)
        return None if key is None else self.where[key].get_tensor(key)


# --- the command ----------------------------------------------------------------------------------------------------


def _dtype_of(config: dict) -> Any:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def split_checkpoint_uri(uri: str) -> tuple[str, str]:
    uri = uri.rstrip("/")
    job, _, name = uri.rpartition("/")
    if not STEP_DIR.match(name):
        raise ValueError(f"{uri}: not a checkpoint URI (expected <storage>/<job>/step_NNNNNNNN; list them with "
                         "`ftdist checkpoints <storage>/<job>`)")
    return job, name


def needed_for_export(path: str, zero_stage: int) -> bool:
    """Files an export reads: the HF metadata, the trainer state and the weights. ZeRO 0-2 keep whole 16/32-bit
    weights in mp_rank_00_model_states.pt, so the optimizer shards (the bulk: 12 bytes per parameter) stay in
    storage; ZeRO-3 weights live only in those shards (fp32 flat partitions: only their records are fetched where
    the manifest lists them, see `export_records`). RNG states are never needed."""
    if _RNG_FILE.search(path):
        return False
    return zero_stage == 3 or not _OPTIM_FILE.search(path)


def export_reads(manifest: Manifest) -> tuple[list[FileEntry], list[FileEntry]]:
    """(files an export downloads whole, files it reads only the listed records of): ZeRO-3 optimizer files whose
    manifest lists the master weights' records are read by those ranges alone."""
    needed = [f for f in manifest.files if needed_for_export(f.path, manifest.zero_stage)]
    partial = [f for f in needed if manifest.zero_stage == 3 and f.records]
    return [f for f in needed if f not in partial], partial


class FetchedCheckpoint:
    """A committed checkpoint's export files downloaded into a scratch folder (each hash-verified): its manifest,
    Hugging Face metadata and trainer state, and its weights as a stream. A context manager: the scratch goes at
    the end."""

    def __init__(self, ckpt_uri: str) -> None:
        job_uri, name = split_checkpoint_uri(ckpt_uri)
        self.job_uri = job_uri
        self._frozen_base: Optional[BaseWeights] = None
        cs = CheckpointStore(job_uri)
        manifest = cs.read_manifest(name)
        if manifest is None:
            raise ValueError(f"{ckpt_uri}: not a committed checkpoint (no manifest)")
        self.manifest = manifest
        self.work = tempfile.mkdtemp(prefix="ftdist-export-")
        try:
            self.local = os.path.join(self.work, "ckpt")
            whole, partial = export_reads(manifest)
            self._partial = {os.path.join(self.local, f.path): [Span(r.name, r.offset, r.size) for r in f.records]
                             for f in partial}
            wanted = {f.path for f in whole}
            cs.fetch(name, self.local, lambda path: path in wanted, show=True)
            cs.fetch_records(name, self.local, partial, show=True)
            self.hf_dir = os.path.join(self.local, "hf")
            with open(os.path.join(self.hf_dir, "config.json")) as fh:
                self.config = json.load(fh)
            with open(os.path.join(self.local, STATE_FILE)) as fh:
                self.state = TrainState.model_validate_json(fh.read())
        except BaseException:
            self.close()
            raise
        self.dtype = _dtype_of(self.config)

    def __enter__(self) -> "FetchedCheckpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def read(self, want: Callable[[str], bool] = lambda _: True) -> Tensors:
        """The trained module's tensors whose names pass `want`; in a checkpoint that left its frozen parameters
        out, those come from the base model it was trained from (unchanged by training, by definition)."""
        yield from iter_checkpoint_tensors(self.local, self.state.tag, self.manifest.zero_stage, want,
                                           self._partitions)
        if not self.manifest.frozen_excluded:
            return
        with open(os.path.join(self.hf_dir, FROZEN_FILE)) as fh:
            frozen = [n for n in json.load(fh) if want(n)]
        if not frozen:
            return
        base, backbone = self.frozen_base(), HeadLayout.of(self.hf_dir, self.config).backbone
        for name in frozen:
            t = base.get(_plain(name), backbone)
            if t is None:
                raise ValueError(f"the base model {self.manifest.base_model} has no tensor {_plain(name)}, which "
                                 f"this checkpoint left out as frozen; is it the model the job fine-tuned?")
            yield name, t

    def _partitions(self, path: str) -> list:
        spans = self._partial.get(path)
        return whole_file_partitions(path) if spans is None else load_selected(path, spans, fp32_partitions)

    def frozen_base(self) -> BaseWeights:
        """The weights of the base the job trained from (its hub revision), fetched once."""
        if self._frozen_base is None:
            self._frozen_base = BaseWeights(resolve_location(self.manifest.base_model, self.manifest.base_revision))
        return self._frozen_base

    def base(self, base_model: Optional[str]) -> BaseWeights:
        """The base model's weights, for WiSE-FT (default: the model the job fine-tuned)."""
        if base_model is None and self.manifest.base_model:
            return self.frozen_base()
        src = base_model or self.manifest.base_model
        if not src:
            raise ValueError("--interpolate needs the base model's weights: this job built its model from a "
                             "config; pass --base <hub id | path | s3://...>")
        return BaseWeights(resolve_location(src, None))

    def model_weights(self, interpolate: Optional[float] = None, base: Optional[BaseWeights] = None) -> Tensors:
        """The whole model's weights (LoRA: merged into the base), WiSE-FT-interpolated when asked, in the
        checkpoint's dtype."""
        if self.manifest.method == "lora":
            stream = merged_lora(self.read, self.adapter_config())
        else:
            stream = self.read()
        if interpolate is not None:
            # The head trained from scratch has no base to move toward: WiSE-FT's only use of the layout.
            stream = interpolated(stream, base, interpolate, HeadLayout.of(self.hf_dir, self.config))
        return cast(stream, self.dtype)

    def adapter_config(self) -> dict:
        with open(os.path.join(self.hf_dir, "adapter_config.json")) as fh:
            return json.load(fh)

    def write(self, stream: Tensors, out: str, shard_size: str, prefix: str = "model", adapter: bool = False) -> None:
        """A Hugging Face folder: the tensors in shards, and the checkpoint's config and tokenizer files beside."""
        w = ShardWriter(out, shard_size, prefix=prefix)
        for k, t in stream:
            w.add(k, t)
        w.close()
        for f in os.listdir(self.hf_dir):
            if f == FROZEN_FILE or (f == "adapter_config.json" and not adapter):  # ftdist's own list stays inside
                continue
            if adapter and f in ("config.json", "generation_config.json"):
                continue
            shutil.copy(os.path.join(self.hf_dir, f), os.path.join(out, f))

    def drop_weights(self) -> None:
        """Free the downloaded weights' scratch (before an upload)."""
        shutil.rmtree(self.local, ignore_errors=True)


def export_checkpoint(ckpt_uri: str, dest: str, *, interpolate: Optional[float] = None,
                      base_model: Optional[str] = None, merged: Optional[bool] = None,
                      max_shard_size: Optional[str] = None) -> dict:
    """Download a committed checkpoint (the files an export needs, each verified), write a HF folder to `dest`
    (local or s3://). `max_shard_size` defaults to the job's export.max_shard_size. Returns
    {"model"|"adapter"|"merged": uri}."""
    with FetchedCheckpoint(ckpt_uri) as ck:
        shard_size = max_shard_size or ck.manifest.export_max_shard_size
        parse_size(shard_size)  # a bad --max-shard-size is an error before anything is written
        base = ck.base(base_model) if interpolate is not None else None
        staging = os.path.join(ck.work, "out")
        written: dict = {}
        if ck.manifest.method == "lora":
            if interpolate is not None and ck.adapter_config().get("use_dora"):
                raise ValueError("--interpolate: a DoRA adapter cannot carry the interpolation (its magnitudes "
                                "renormalise the direction); export the interpolated model with --merged instead")
            ck.write(adapter_only(ck.read(_in_adapter), interpolate), os.path.join(staging, "adapter"), shard_size,
                     "adapter_model", adapter=True)
            written["adapter"] = "adapter"
            if merged if merged is not None else ck.manifest.merge_on_export:
                ck.write(ck.model_weights(interpolate, base), os.path.join(staging, "merged"), shard_size)
                written["merged"] = "merged"
        else:
            ck.write(ck.model_weights(interpolate, base), staging, shard_size)
            written["model"] = ""
        ck.drop_weights()
        publish_dir(staging, dest.rstrip("/"))
        return {k: (f"{dest.rstrip('/')}/{v}" if v else dest.rstrip("/")) for k, v in written.items()}
