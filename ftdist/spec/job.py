"""The job schema (pydantic v2, frozen, unknown keys rejected): model, data, method, ZeRO, optimiser, resources,
checkpoints, eval, logging, export; plus the sweep and kubernetes sections from their own modules.

Pure: imports neither torch, ray nor deepspeed, and does no I/O (`ftdist validate` must stay fast).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from ftdist.errors import did_you_mean
from ftdist.spec.base import FieldError, FrozenSpec
from ftdist.spec.config_keys import config_keys, model_types
from ftdist.spec.kubernetes import KubernetesSpec
from ftdist.spec.sweep import SweepSpec
from ftdist.spec.tracking import TrackingSpec
from ftdist.storage.uri import FILE_SCHEME, S3_SCHEME, is_remote, location_problem, resolve

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)(i?)B?\s*$", re.I)
MAX_SEED = 2**32 - 1
"""numpy's legacy seeding (and everything that seeds through it) takes 0 <= seed < 2**32; torch takes fewer still
at the negative end. One range for all of them."""


def parse_size(s: str) -> int:
    """Bytes of a size as Hugging Face writes them: 5GB = 5 * 10**9, 5GiB = 5 * 2**30 (also 500MB, 2TiB, 1024)."""
    m = _SIZE_RE.match(str(s))
    if not m:
        raise ValueError(f"not a size: {s!r} (e.g. 5GB, 500MB, 4GiB)")
    power = " KMGTP".index(m.group(2).upper() or " ")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** power)


def _location(value: Optional[str], schemes: tuple[str, ...] = (S3_SCHEME,)) -> Optional[str]:
    if value is not None and (problem := location_problem(value, schemes)):
        raise ValueError(problem)
    return value


class ModelSpec(FrozenSpec):
    """The base model: a hub id, a local directory, an `s3://` prefix, or (tests, quickstart) a config."""

    name_or_path: Optional[str] = None
    """Hub id (`meta-llama/Llama-3.1-8B`), local directory, or `s3://bucket/prefix` of a HF checkpoint."""
    from_config: Optional[dict[str, Any]] = None
    """Build a randomly initialised model from a transformers config (needs `model_type`). Tests/quickstart only."""
    tokenizer: Optional[str] = None
    """Tokenizer location; defaults to `name_or_path`. Required with `from_config`."""
    revision: Optional[str] = None
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    gradient_checkpointing: bool = False
    activation_offload: bool = False
    """With gradient_checkpointing: the layer inputs kept for the recompute go to pinned host memory instead of
    staying on the GPU (transformers' activation checkpointing with offload): layers x sequence x hidden bytes less
    per micro batch, for a copy each way. GPUs only (on a CPU they are in host memory already)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    trust_remote_code: bool = False
    compile: bool = False
    """torch.compile the model (DeepSpeed `engine.compile()`): slower start, faster steps on GPUs."""
    use_liger_kernel: bool = False
    """GPU only: swap in Liger's fused Triton kernels (RMSNorm, rotary, SwiGLU, and a fused linear + cross-entropy
    loss that never materialises the logits) for the model types Liger supports (Llama, Mistral, Qwen, Gemma, ...).
    Needs the `liger-kernel` package on the workers (`pip install 'ftdist[gpu]'`); the same switch as
    `TrainingArguments.use_liger_kernel` in the Hugging Face Trainer."""

    @field_validator("name_or_path", "tokenizer")
    @classmethod
    def _where(cls, v: Optional[str]) -> Optional[str]:
        return _location(v)

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.name_or_path is None) == (self.from_config is None):
            raise FieldError("name_or_path", "set exactly one of model.name_or_path or model.from_config")
        if self.from_config is not None:
            if "model_type" not in self.from_config:
                raise FieldError("from_config", "model.from_config needs a model_type (e.g. llama)")
            if self.tokenizer is None:
                raise FieldError("from_config", "model.tokenizer is required with model.from_config")
            _check_config_keys(self.from_config)
        return self

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.name_or_path  # type: ignore[return-value]


def _check_config_keys(cfg: dict) -> None:
    """A model type transformers does not know, or a key its config class does not define (read from transformers'
    source: see ftdist.spec.config_keys; silent where the source cannot say)."""
    model_type = str(cfg["model_type"])
    known_types = model_types()
    if known_types is not None and model_type not in known_types:
        raise FieldError("from_config.model_type", f"unknown transformers model type {model_type[:60]!r}"
                                                   f"{did_you_mean(model_type, known_types)}")
    keys = config_keys(model_type)
    for key in cfg if keys else ():
        if key != "model_type" and key not in keys:
            raise FieldError(f"from_config.{key}", f"not a setting of transformers' {model_type} config"
                                                   f"{did_you_mean(str(key), sorted(keys))}")


class LoraSpec(FrozenSpec):
    """LoRA adapters via peft."""

    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    merge_on_export: bool = False
    """Also export the base model with the adapter merged in (a plain HF model folder)."""
    use_dora: bool = False
    """DoRA (Liu et al., 2024; peft's use_dora): each adapted weight split into a trained magnitude per output and a
    direction that LoRA updates."""
    use_rslora: bool = False
    """rsLoRA (Kalajdzievski, 2023): adapters scaled by alpha / sqrt(rank) instead of alpha / rank."""
    quantize: Optional[Literal["nf4", "fp4"]] = None
    """QLoRA (Dettmers et al., 2023): the frozen base's linear layers loaded in 4-bit by bitsandbytes (NF4 or FP4),
    computing in model.dtype; the adapters, norms, embeddings and head stay in model.dtype. Under zero.stage 0-2
    the 4-bit base is replicated on every worker; under zero.stage 3 it is partitioned too (stored in model.dtype
    tensors so DeepSpeed can shard it; each worker loads it whole once, before the partitioning). Needs
    model.name_or_path (the weights are quantised as they load) and bitsandbytes (pip install 'ftdist[qlora]')."""
    double_quant: bool = True
    """QLoRA's double quantisation: the 4-bit blocks' scales quantised too (about 0.4 bits per parameter less)."""


class FreezeSpec(FrozenSpec):
    """Partial fine-tuning: embeddings and lower decoder layers frozen, top layers (and head) trained."""

    train_top_layers: int = Field(2, ge=0)
    train_head: bool = True
    train_final_norm: bool = True

    @model_validator(mode="after")
    def _something_trains(self) -> "FreezeSpec":
        if self.train_top_layers == 0 and not self.train_head:
            raise FieldError("train_top_layers", "freeze trains nothing: set freeze.train_top_layers > 0 or freeze.train_head")
        return self


class ParallelSpec(FrozenSpec):
    """How one sequence is split beyond ZeRO's data parallelism."""

    sequence: int = Field(1, ge=1)
    """Ulysses sequence parallelism (DeepSpeed's, for Hugging Face models): every sequence is split over this many
    consecutive workers, which read the same micro batch; attention all-to-alls heads for positions, so it sees the
    whole sequence while embeddings, MLPs and logits hold 1/N of it (activation memory / N). The data-parallel size
    is resources.num_workers / sequence; the global batch counts sequences. `objective: sft` only; the attention
    heads (and KV heads, or the reverse) must divide by it; `data.packing` needs flash attention (sdpa has no
    per-document mask once DeepSpeed drops the 4D mask). Evaluation and generation run without it, one whole
    sequence per worker (no activations kept)."""


class ZeroSpec(FrozenSpec):
    """DeepSpeed ZeRO settings."""

    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = Field(500_000_000, gt=0)
    allgather_bucket_size: int = Field(500_000_000, gt=0)
    stage3_prefetch_bucket_size: int = Field(50_000_000, gt=0)
    stage3_param_persistence_threshold: int = Field(100_000, ge=0)
    stage3_max_live_parameters: int = Field(1_000_000_000, gt=0)
    # ZeRO++ (Wang et al., 2023), ZeRO-3 only:
    hpz_partition_size: int = Field(1, ge=1)
    """hpZ: a secondary copy of the weights partitioned within groups of this many workers (the GPUs of a node), so
    the backward's all-gathers stay inside the node; 1: off. Costs the extra partition's memory."""
    quantized_weights: bool = False
    """qwZ: weights all-gathered in int8 (half the forward's gather traffic; GPUs only)."""
    quantized_gradients: bool = False
    """qgZ: gradients reduce-scattered in int4 with all-to-all (GPUs only)."""

    @model_validator(mode="after")
    def _combos(self) -> "ZeroSpec":
        for key in ("hpz_partition_size", "quantized_weights", "quantized_gradients"):
            if getattr(self, key) != ZeroSpec.model_fields[key].default and self.stage != 3:
                raise FieldError(key, f"zero.{key} is ZeRO++, which extends ZeRO-3: it needs zero.stage 3")
        if self.offload_params != "none" and self.stage != 3:
            raise FieldError("offload_params", "zero.offload_params needs zero.stage 3")
        if self.offload_optimizer != "none" and self.stage == 0:
            raise FieldError("offload_optimizer", "zero.offload_optimizer needs zero.stage 1, 2 or 3")
        return self


class OptimSpec(FrozenSpec):
    """Optimiser, schedule and batch sizes."""

    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    optimizer: Literal["torch_adamw", "deepspeed_adamw"] = "torch_adamw"
    """torch_adamw: torch.optim.AdamW (no C++ build); deepspeed_adamw: DeepSpeed FusedAdam/CPUAdam (GPU, offload)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)
    """Max global grad norm; 0 disables clipping."""
    micro_batch_size: int = Field(1, ge=1)
    global_batch_size: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)
    epochs: Optional[float] = Field(None, gt=0)
    seed: int = Field(42, ge=0, le=MAX_SEED)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("betas must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _steps(self) -> "OptimSpec":
        if (self.max_steps is None) == (self.epochs is None):
            raise FieldError("max_steps", "set exactly one of optim.max_steps or optim.epochs")
        return self


_SOURCE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$")
SOURCE_OPTIONS = ("format", "text_field", "prompt_field", "completion_field", "messages_field", "completion_only_loss",
                  "chat_template")
"""The data options a mixture's source may set for itself (the rest are the data section's, for every source)."""


class DataSource(FrozenSpec):
    """One source of a mixture (`data.train` as a list): its rows, its share of the samples, how its rows read."""

    path: str
    name: Optional[str] = None
    """Names its eval loss (eval_<name>_loss) and its share in the log; default: the file or folder name."""
    weight: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    """Relative share of the training samples (normalised over the sources)."""
    eval: Optional[str] = None
    """This source's held-out rows (else data.eval_fraction of its rows, if set)."""
    format: Optional[Literal["text", "prompt_completion", "chat"]] = None
    text_field: Optional[str] = None
    prompt_field: Optional[str] = None
    completion_field: Optional[str] = None
    messages_field: Optional[str] = None
    completion_only_loss: Optional[bool] = None
    chat_template: Optional[str] = None

    @field_validator("path", "eval")
    @classmethod
    def _where(cls, v: Optional[str]) -> Optional[str]:
        return _location(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _SOURCE_NAME_RE.match(v):
            raise ValueError(f"{v[:60]!r}: letters, digits, - and _ (up to 48), starting with a letter or digit")
        if v is not None and v.startswith("ref_"):
            raise ValueError(f"{v!r}: names starting with ref_ are the reference sets' (eval_ref_<name>_loss)")
        return v

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        stem = os.path.basename(self.path.rstrip("/")).split(".")[0]
        return re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:48] or "source"


class DataSpec(FrozenSpec):
    """Training data: JSONL, Parquet or a `datasets.save_to_disk` folder, local or `s3://`; or a weighted mixture
    of such sources."""

    train: Union[str, list[DataSource]]
    """A path or URI, or a list of sources ({path, name, weight, ...}) sampled by weight."""
    eval: Optional[str] = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    format: Literal["text", "prompt_completion", "chat"] = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    completion_only_loss: Optional[bool] = None
    """Loss only on completion/assistant tokens. Default: true for prompt_completion and chat."""
    max_length: int = Field(1024, ge=8)
    packing: bool = False
    shuffle: bool = True
    on_bad_row: Literal["fail", "skip"] = "fail"
    chat_template: Optional[str] = None
    """Jinja chat template overriding the tokenizer's (for tokenizers that have none)."""
    cache: Optional[str] = None
    """Where the tokenised data is kept (a local folder or s3:// prefix), one folder per key (a hash of the data,
    tokenizer and these options): tokenised once, then reused by every run, sweep trial and resume. Default:
    <checkpoint.storage>/_prepared. `off`: every worker tokenises the data itself at each start (nothing stored)."""

    @field_validator("train", "eval")
    @classmethod
    def _where(cls, v: Any) -> Any:
        return _location(v) if isinstance(v, str) or v is None else v

    @field_validator("cache")
    @classmethod
    def _cache_where(cls, v: Optional[str]) -> Optional[str]:
        return v if v == "off" else _location(v, (S3_SCHEME, FILE_SCHEME))

    @model_validator(mode="after")
    def _checks(self) -> "DataSpec":
        if self.eval is not None and self.eval_fraction > 0:
            raise FieldError("eval_fraction", "set data.eval or data.eval_fraction, not both")
        if isinstance(self.train, list):
            self._check_mixture(self.train)
        return self

    def _check_mixture(self, sources: list[DataSource]) -> None:
        if not sources:
            raise FieldError("train", "an empty list: give a path, or sources with a path each")
        seen: dict[str, int] = {}
        for i, src in enumerate(sources):
            if src.label in seen:
                j = seen[src.label]
                raise FieldError(f"train.{i}", f"sources {j} and {i} are both named {src.label!r}"
                                 + ("" if src.name else " (after their file names)") + "; give each a distinct name")
            seen[src.label] = i
            if src.eval is not None and self.eval_fraction > 0:
                raise FieldError(f"train.{i}.eval", "set the source's eval or data.eval_fraction, not both")
        if not any(src.weight > 0 for src in sources):
            raise FieldError("train", "every source has weight 0: give at least one a positive weight")
        if self.eval is not None:
            raise FieldError("eval", "a mixture's held-out rows are per source: set data.train.N.eval (or "
                                     "data.eval_fraction) instead of data.eval")

    @property
    def is_mixture(self) -> bool:
        return isinstance(self.train, list)

    @property
    def sources(self) -> list[DataSource]:
        """The training sources: the list as given, or the one path as a source named "train"."""
        if isinstance(self.train, list):
            return list(self.train)
        return [DataSource(path=self.train, name="train", eval=self.eval)]

    def source_metrics(self, has_eval: bool) -> tuple[str, ...]:
        """What a mixture adds to the reported metrics: each source's realised share of the samples so far, and its
        own eval loss."""
        if not self.is_mixture:
            return ()
        shares = tuple(f"data_share_{s.label}" for s in self.sources)
        evals = tuple(f"eval_{s.label}_loss" for s in self.sources if s.eval or self.eval_fraction > 0)
        return shares + (evals if has_eval else ())

    @property
    def train_paths(self) -> list[str]:
        return [s.path for s in self.sources]

    def inputs(self) -> list[tuple[str, Optional[str]]]:
        """(dotted key, path) of every data input, for the checks that name the key of a missing one."""
        if isinstance(self.train, list):
            return [(f"data.train.{i}.{k}", getattr(s, k)) for i, s in enumerate(self.train) for k in ("path", "eval")]
        return [("data.train", self.train), ("data.eval", self.eval)]

    def for_source(self, src: DataSource) -> "DataSpec":
        """This data section as one source reads it: its path and held-out rows, its own row options."""
        own = {k: getattr(src, k) for k in SOURCE_OPTIONS if getattr(src, k) is not None}
        return self.model_copy(update={"train": src.path, "eval": src.eval, **own})

    @property
    def loss_on_completion_only(self) -> bool:
        if self.completion_only_loss is None:
            return self.format != "text"
        return self.completion_only_loss


class ResourcesSpec(FrozenSpec):
    """Ray Train workers."""

    num_workers: int = Field(2, ge=1)
    """Workers (one per GPU); `{min: 2, max: 8}` makes the job elastic (stored as num_workers = max, min_workers =
    min): it starts once `min` workers fit, grows toward `max` as nodes join and shrinks when one is lost instead of
    stopping, each time resuming from the latest committed checkpoint at the new size (Ray Train's elastic
    ScalingConfig; the checkpoint converted as any resize). The global batch stays the job's at every size."""
    min_workers: Optional[int] = Field(None, ge=1)
    """The elastic lower bound (written as num_workers: {min, max}); None: a fixed size."""
    elastic_check_s: float = Field(60.0, gt=0)
    """How often a running elastic job looks for room to grow (Ray Train's elastic_resize_monitor_interval_s).
    Growing restarts the workers from the latest committed checkpoint: the steps since it run again."""
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    accelerator_type: Optional[str] = None
    """Ray accelerator type, e.g. H100, A100-80G (schedules workers onto such nodes)."""
    max_failures: int = Field(2, ge=-1)
    """Restarts of a crashed worker group from the latest checkpoint (-1: unlimited)."""

    @model_validator(mode="before")
    @classmethod
    def _range(cls, data: Any) -> Any:
        """`num_workers: {min: 2, max: 8}` -> num_workers 8, min_workers 2."""
        if isinstance(data, dict) and isinstance(data.get("num_workers"), dict):
            bounds = data["num_workers"]
            for key in bounds:
                if key not in ("min", "max"):
                    raise FieldError(f"num_workers.{key}", "resources.num_workers takes a number or {min: N, max: M}")
            for key in ("min", "max"):
                if not isinstance(bounds.get(key), int) or isinstance(bounds.get(key), bool) or bounds[key] < 1:
                    raise FieldError(f"num_workers.{key}", f"resources.num_workers.{key} must be a whole number >= 1")
            data = {**data, "num_workers": bounds["max"], "min_workers": bounds["min"]}
        return data

    @model_validator(mode="after")
    def _bounds(self) -> "ResourcesSpec":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise FieldError("num_workers.min", f"resources.num_workers.min {self.min_workers} is above max "
                                                f"{self.num_workers}")
        return self

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def cpus(self) -> float:
        """CPUs the worker group takes (Ray Train's controller and a trial's driver take none)."""
        return self.num_workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker


class UploadSpec(FrozenSpec):
    """How each rank streams its checkpoint files to storage (boto3 / s3transfer multipart)."""

    mode: Literal["async", "sync"] = "async"
    """async: training continues while a checkpoint uploads (a step waits only for the local save, and for the
    previous upload if it is still running). sync: the step waits for the upload, as Ray's default does."""
    part_size_mb: int = Field(16, ge=5, le=5120)
    """Multipart part size (S3 minimum 5 MiB). Files smaller than a part go up in one PUT."""
    concurrency: int = Field(8, ge=1, le=256)
    """Parallel part/file transfers per rank."""
    max_attempts: int = Field(10, ge=1, le=100)
    """Attempts per request on throttling, 5xx and timeouts (exponential backoff with full jitter)."""
    commit_timeout_s: float = Field(1800.0, gt=0)
    """How long rank 0 waits for every rank's files before giving up on a checkpoint."""


class EncryptionSpec(FrozenSpec):
    """Server-side encryption for everything ftdist writes to s3://. Key material never goes in the job file."""

    sse: Optional[Literal["AES256", "aws:kms"]] = None
    kms_key_id: Optional[str] = None
    """KMS key id/ARN/alias for sse: aws:kms (an identifier, not a secret); default: the bucket's AWS-managed key."""

    @model_validator(mode="after")
    def _kms(self) -> "EncryptionSpec":
        if self.kms_key_id and self.sse != "aws:kms":
            raise FieldError("kms_key_id", "kms_key_id needs sse: aws:kms")
        return self

    def extra_args(self) -> dict:
        out: dict = {}
        if self.sse:
            out["ServerSideEncryption"] = self.sse
        if self.kms_key_id:
            out["SSEKMSKeyId"] = self.kms_key_id
        return out


class CheckpointSpec(FrozenSpec):
    """Where checkpoints go and how many stay."""

    storage: str = "./runs"
    """A local directory (embedded default) or s3://bucket/prefix. Holds <name>/ per job."""
    every_n_steps: Optional[int] = Field(None, ge=1)
    """Checkpoint cadence; None: only at the end."""
    keep_last: Optional[int] = Field(2, ge=1)
    keep_best_by: Optional[str] = None
    """A reported metric (e.g. eval_loss): keep the `keep_last` best by it instead of the newest."""
    best_mode: Literal["min", "max"] = "min"
    upload: UploadSpec = UploadSpec()
    encryption: EncryptionSpec = EncryptionSpec()

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str) -> str:
        return _location(v, (S3_SCHEME, FILE_SCHEME))  # type: ignore[return-value]

    @model_validator(mode="after")
    def _encryption_needs_s3(self) -> "CheckpointSpec":
        if self.encryption.sse and not is_remote(self.storage):
            raise FieldError("encryption.sse", "checkpoint.encryption applies to s3:// storage only")
        return self

    def resolved_storage(self, base: Optional[Path] = None) -> str:
        """An absolute local path or the URI as given."""
        return resolve(self.storage, base)


_REF_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ReferenceSpec(FrozenSpec):
    """A held-out set from the upstream distribution (what the model knew before): its next-token loss, measured at
    step 0 and at every eval as `eval_ref_<name>_loss`, is the forgetting measure. A plain path is accepted for the
    mapping."""

    path: str
    """JSONL, Parquet, a folder of those or a datasets folder; local (relative to the job file) or s3://."""
    name: Optional[str] = None
    """Default: the file's name without its extension (heldout.jsonl -> heldout)."""
    text_field: str = "text"

    @model_validator(mode="before")
    @classmethod
    def _plain_path(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _location(v)  # type: ignore[return-value]

    @field_validator("name")
    @classmethod
    def _name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _REF_NAME_RE.match(v):
            raise ValueError("must be letters, digits, '_', '.' or '-' (max 64), starting with a letter or digit")
        return v

    @property
    def label(self) -> str:
        """The name in metric keys: eval_ref_<label>_loss."""
        base = self.name or os.path.basename(self.path.rstrip("/")).split(".")[0] or "reference"
        return re.sub(r"[^A-Za-z0-9_]", "_", base)

    @property
    def metric(self) -> str:
        return f"eval_ref_{self.label}_loss"


_FUNCTION_RE = re.compile(r"^(?:[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*|[^:\s][^:]*\.py):[A-Za-z_]\w*$")
BUILTIN_GEN_METRICS = ("exact_match", "contains")


class RegexMetric(FrozenSpec):
    """With a capture group: the group extracted from the prediction equals the one from the reference (answer
    extraction, as GSM8K-style evals do). Without: the prediction matches (a format check)."""

    regex: str
    name: str = "regex"

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a regular expression ({e})") from None
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[a-z][a-z0-9_]{0,40}$", v):
            raise ValueError("must be lowercase letters, digits and '_' (max 41), starting with a letter")
        return v


class GenerateSpec(FrozenSpec):
    """Task metrics from greedy generation on held-out prompts, reported as eval_gen_<metric> (a sweep metric too)."""

    data: Optional[str] = None
    """Rows in the job's format (prompt + completion, a chat whose last assistant turn is the reference, or DPO's
    prompt + chosen); default: data.eval."""
    max_prompts: int = Field(200, ge=1)
    """The first N rows (the same prompts at every evaluation)."""
    max_new_tokens: int = Field(64, ge=1, le=32768)
    metrics: list[Union[Literal["exact_match", "contains"], RegexMetric]] = ["exact_match"]
    """exact_match: prediction == reference (both stripped); contains: the reference occurs in the prediction;
    {regex: ..., name: ...}: see RegexMetric."""
    function: Optional[str] = None
    """A user metric `module:function` or `file.py:function` (next to the job file): f(prediction, reference) ->
    float, averaged over the prompts; reported as eval_gen_<function>."""
    every_n_steps: Optional[int] = Field(None, ge=1)
    """Default: at step 0 and at the end only (generation costs far more than a loss); else also at the evaluations
    (eval.every_n_steps) whose step is a multiple of it."""

    @field_validator("data")
    @classmethod
    def _path(cls, v: Optional[str]) -> Optional[str]:
        return _location(v)

    @field_validator("metrics", mode="before")
    @classmethod
    def _regex_items(cls, v: Any) -> Any:
        """A mapping item is a regex metric: validated as one, so its error names the regex, not the union."""
        if not isinstance(v, list):
            return v
        out = []
        for i, item in enumerate(v):
            if isinstance(item, dict):
                try:
                    item = RegexMetric.model_validate(item)
                except ValidationError as e:
                    err = e.errors()[0]
                    where = ".".join(str(p) for p in err["loc"])
                    raise ValueError(f"item {i}: {where}: {err['msg'].removeprefix('Value error, ')}") from None
            elif isinstance(item, str) and item not in BUILTIN_GEN_METRICS:
                raise ValueError(f"item {i}: {item!r} is not a metric{did_you_mean(item, BUILTIN_GEN_METRICS)}; "
                                 f"built in: {', '.join(BUILTIN_GEN_METRICS)}, or {{regex: ..., name: ...}}")
            out.append(item)
        return out

    @field_validator("function")
    @classmethod
    def _function(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _FUNCTION_RE.match(v):
            raise ValueError("must be module:function (e.g. mymetrics:score) or file.py:function")
        return v

    @property
    def metric_names(self) -> tuple[str, ...]:
        names = [m if isinstance(m, str) else m.name for m in self.metrics]
        if self.function:
            names.append(self.function.rsplit(":", 1)[1])
        return tuple(f"eval_gen_{n}" for n in names)

    @model_validator(mode="after")
    def _unique(self) -> "GenerateSpec":
        names = self.metric_names
        for i, n in enumerate(names):
            if n in names[:i]:
                raise FieldError("metrics", f"two generation metrics are named {n}; give the regex metrics names")
        return self


class EvalSpec(FrozenSpec):
    every_n_steps: Optional[int] = Field(None, ge=1)
    """Eval cadence; None: only at the end (when there is eval data or a reference set)."""
    max_batches: Optional[int] = Field(None, ge=1)
    """Per eval set (the task's and each reference set), per rank."""
    reference: list[ReferenceSpec] = []
    """Reference sets for the forgetting report (a single path is taken as a list of one)."""
    generate: Optional[GenerateSpec] = None

    @field_validator("reference", mode="before")
    @classmethod
    def _one(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, dict)) else v

    @model_validator(mode="after")
    def _unique(self) -> "EvalSpec":
        seen: dict[str, int] = {}
        for i, ref in enumerate(self.reference):
            if ref.label in seen:
                raise FieldError(f"reference.{i}", f"two reference sets are named {ref.label} (entries "
                                                   f"{seen[ref.label]} and {i}); give each a name")
            seen[ref.label] = i
        return self


class LoggingSpec(FrozenSpec):
    every_n_steps: int = Field(10, ge=1)


class ExportSpec(FrozenSpec):
    enabled: bool = True
    max_shard_size: str = "5GB"

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        if parse_size(v) <= 0:
            raise ValueError("export.max_shard_size must be above zero")
        return v



class DpoSpec(FrozenSpec):
    """Preference tuning (`objective: dpo`) on rows with `prompt`, `chosen` and `rejected`: strings, or message
    lists rendered with the chat template (TRL's preference layouts)."""

    loss_type: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    """sigmoid: DPO; ipo: IPO; simpo: SimPO (reference-free: no reference pass, no adapter switching)."""
    beta: float = Field(0.1, gt=0)
    """How far the policy may move from the reference (DPO's beta; IPO's tau; SimPO's reward scale, ~2)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """The assumed probability that a pair's preference is flipped (conservative DPO; sigmoid and simpo)."""
    simpo_gamma: float = Field(0.5, ge=0.0)
    """SimPO's target reward margin."""
    sft_weight: float = Field(0.0, ge=0.0)
    """Adds this weight x the chosen completions' next-token loss (RPO; TRL's loss_type [sigmoid, sft]): keeps DPO
    from lowering the likelihood of what SFT taught along with the rejected completions."""

    @property
    def uses_reference(self) -> bool:
        """SimPO is reference-free; DPO and IPO compare with the reference model's log-probabilities."""
        return self.loss_type != "simpo"


class RewardSpec(FrozenSpec):
    """A reward model (`objective: reward`): a scalar head on the backbone trained with the Bradley-Terry loss on
    preference rows (`chosen`, `rejected`, and an optional `prompt` put in front of both; an optional numeric
    `margin` column is subtracted from the reward difference, as in Llama 2 and TRL)."""

    center_rewards_coefficient: float = Field(0.0, ge=0.0)
    """Adds this weight x the mean squared summed reward of each pair (Eisenstein et al., 2023; TRL's option of the
    same name): keeps the rewards centred on zero, which the pairwise loss alone leaves free."""


class ClassificationSpec(FrozenSpec):
    """A classifier (`objective: classification`): a new head on the backbone, cross-entropy on rows with a text and
    a label (`data.text_field`, and `label_field`; an optional second text for pair tasks such as NLI)."""

    labels: Optional[list[str]] = None
    """The label set, in id order (saved as the export's id2label). Default: the sorted distinct labels of
    data.train (integer labels in numeric order)."""
    label_field: str = "label"
    text_pair_field: Optional[str] = None
    """A second text per row (sentence-pair tasks), encoded as the tokenizer pairs two texts."""

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError("classification.labels needs at least two labels")
        if len(set(v)) != len(v):
            dup = next(x for x in v if v.count(x) > 1)
            raise ValueError(f"classification.labels lists {dup!r} twice")
        return v


METHOD_SECTIONS = ("lora", "freeze")
"""Methods with a settings section of the same name."""
OBJECTIVE_SECTIONS = ("dpo", "reward", "classification")
"""Objectives with a settings section of the same name."""


DERIVED = {
    "train_batch_size": "optim.global_batch_size", "train_micro_batch_size_per_gpu": "optim.micro_batch_size",
    "gradient_accumulation_steps": "optim.global_batch_size", "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim", "scheduler": "optim.schedule", "bf16": "model.dtype", "fp16": "model.dtype",
    "checkpoint": "checkpoint", "zero_optimization.stage": "zero.stage", "sequence_parallel_size": "parallel.sequence",
    "zero_optimization.offload_optimizer": "zero.offload_optimizer", "zero_optimization.offload_param":
    "zero.offload_params", "zero_optimization.zero_hpz_partition_size": "zero.hpz_partition_size",
    "zero_optimization.zero_quantized_weights": "zero.quantized_weights",
    "zero_optimization.zero_quantized_gradients": "zero.quantized_gradients",
    "zero_optimization.reduce_scatter": "zero.stage",  # always on; parallel.sequence's ZeRO-3 loss scale assumes it
    **{f"zero_optimization.{k}": f"zero.{k}" for k in (
        "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size",
        "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters")},
}
"""DeepSpeed keys ftdist sets from the job: the job key that says it."""


def derived_by_ftdist(extra: dict) -> None:
    """A deepspeed_extra key that would override what ftdist derives: one line naming the job key to set."""
    for key, value in extra.items():
        for dotted in [key] + ([f"{key}.{sub}" for sub in value] if isinstance(value, dict) else []):
            if dotted in DERIVED:
                raise FieldError(f"deepspeed_extra.{dotted}", f"ftdist derives this DeepSpeed key from "
                                                              f"{DERIVED[dotted]}; set that instead")


class JobSpec(FrozenSpec):
    """One fine-tuning job."""

    name: str
    model: ModelSpec
    data: DataSpec
    objective: Literal["sft", "dpo", "reward", "classification"] = "sft"
    """What the model learns: sft (next-token loss on the labelled tokens), dpo (preference pairs), reward (a scalar
    head scoring preference pairs), classification (a label head on texts)."""
    dpo: Optional[DpoSpec] = None
    reward: Optional[RewardSpec] = None
    classification: Optional[ClassificationSpec] = None
    method: Literal["full", "freeze", "lora"] = "full"
    lora: Optional[LoraSpec] = None
    freeze: Optional[FreezeSpec] = None
    zero: ZeroSpec = ZeroSpec()
    parallel: ParallelSpec = ParallelSpec()
    optim: OptimSpec
    resources: ResourcesSpec = ResourcesSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    eval: EvalSpec = EvalSpec()
    logging: LoggingSpec = LoggingSpec()
    export: ExportSpec = ExportSpec()
    tracking: TrackingSpec = TrackingSpec()
    sweep: Optional[SweepSpec] = None
    """Only read by `ftdist tune`; `ftdist train` ignores it."""
    kubernetes: Optional[KubernetesSpec] = None
    """Only read by `ftdist k8s render`."""
    deepspeed_extra: dict[str, Any] = {}
    """Further DeepSpeed config keys, merged into the config ftdist derives (nested sections merge key by key);
    checked against DeepSpeed's own config model before anything runs. What ftdist derives from the job (batch
    sizes, ZeRO stage, dtype, optimizer, clipping, the settings `zero:` has) cannot be set here."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("name must be lowercase letters, digits, '.', '_' or '-' (max 63), starting alphanumeric")
        return v

    @model_validator(mode="before")
    @classmethod
    def _method_section(cls, data: Any) -> Any:
        """The chosen method's section is always there (`method: lora` alone means LoRA with default settings), so
        code reads `spec.lora` / `spec.freeze` under that method without a None check."""
        if isinstance(data, dict):
            for chosen in (data.get("method", "full"), data.get("objective", "sft")):
                if chosen in METHOD_SECTIONS + OBJECTIVE_SECTIONS and data.get(chosen) is None:
                    data = {**data, chosen: {}}
        return data

    @model_validator(mode="after")
    def _cross(self) -> "JobSpec":
        for method in METHOD_SECTIONS:
            if getattr(self, method) is not None and self.method != method:
                raise FieldError(method, f"{method} options are set but method is {self.method!r}")
        for objective in OBJECTIVE_SECTIONS:
            if getattr(self, objective) is not None and self.objective != objective:
                raise FieldError(objective, f"{objective} options are set but objective is {self.objective!r}")
        if self.objective != "sft" and self.data.packing:
            raise FieldError("data.packing", f"data.packing concatenates documents for next-token training; objective "
                                             f"{self.objective} scores whole rows: remove data.packing")
        if self.has_score_head and self.data.completion_only_loss:
            raise FieldError("data.completion_only_loss", f"data.completion_only_loss selects next-token targets; "
                                                          f"objective {self.objective} trains a head on whole rows: "
                                                          "remove it")
        if self.objective == "classification" and self.data.is_mixture and self.classification.labels is None:
            raise FieldError("classification.labels", "a mixture of sources needs its labels listed in "
                                                       "classification.labels (each source is prepared apart)")
        if self.objective == "classification" and self.data.format != "text":
            raise FieldError("data.format", "objective classification reads data.text_field and "
                                            "classification.label_field of each row; remove data.format")
        if self.has_score_head and self.method == "freeze" and not self.freeze.train_head:
            raise FieldError("freeze.train_head", f"objective {self.objective} starts a new head from random "
                                                  "weights: it must train (freeze.train_head: true)")
        if self.data.format == "text" and self.data.completion_only_loss:
            raise FieldError("data.completion_only_loss", "data.completion_only_loss needs format prompt_completion "
                                                          "or chat")
        if self.method == "lora" and self.lora.use_dora and self.zero.stage == 3:
            raise FieldError("lora.use_dora", "lora.use_dora runs under zero.stage 0, 1 or 2: peft's DoRA reads each "
                                              "base weight outside the layer's forward, where ZeRO-3 holds only this "
                                              "rank's partition of it")
        if self.method == "lora" and self.lora.quantize:
            if self.model.name_or_path is None:
                raise FieldError("lora.quantize", "lora.quantize loads the base's weights in 4-bit as they are read: "
                                                  "it needs model.name_or_path (a model built from_config has none)")
        if (self.zero.quantized_weights or self.zero.quantized_gradients) and not self.resources.use_gpu:
            key = "quantized_weights" if self.zero.quantized_weights else "quantized_gradients"
            raise FieldError(f"zero.{key}", f"zero.{key} needs GPUs (resources.gpus_per_worker > 0): DeepSpeed "
                                            "quantises with CUDA kernels")
        if self.resources.num_workers % self.zero.hpz_partition_size:
            raise FieldError("zero.hpz_partition_size",
                             f"zero.hpz_partition_size {self.zero.hpz_partition_size} must divide "
                             f"resources.num_workers {self.resources.num_workers} (it is usually the GPUs per node)")
        derived_by_ftdist(self.deepspeed_extra)
        self._check_sequence_parallel()
        if self.resources.elastic:
            self._check_elastic()
        elif problem := self.batch_problem(self.resources.num_workers, "resources.num_workers {n}"):
            raise FieldError("optim.global_batch_size", problem)
        if self.model.dtype == "fp16" and not self.resources.use_gpu:
            raise FieldError("model.dtype", "model.dtype fp16 needs GPUs (resources.gpus_per_worker > 0); use fp32 or "
                                            "bf16 on CPU")
        if self.model.activation_offload and not self.model.gradient_checkpointing:
            raise FieldError("model.activation_offload", "model.activation_offload moves what gradient checkpointing "
                                                         "keeps: set model.gradient_checkpointing: true")
        if self.model.activation_offload and not self.resources.use_gpu:
            raise FieldError("model.activation_offload", "model.activation_offload needs GPUs (resources."
                                                         "gpus_per_worker > 0): on a CPU activations are in host "
                                                         "memory already")
        if self.model.use_liger_kernel and not self.resources.use_gpu:
            raise FieldError("model.use_liger_kernel", "model.use_liger_kernel needs GPUs (resources.gpus_per_worker "
                                                       "> 0): Liger's kernels are Triton kernels for CUDA/ROCm devices")
        if self.model.use_liger_kernel and self.model.compile:
            # Seen on an H100 (torch 2.11, liger-kernel 0.8.5): an illegal memory access in Inductor's autotuning.
            raise FieldError("model.compile", "model.use_liger_kernel and model.compile together crash torch.compile's "
                                              "autotuning (illegal memory access); choose one (Liger was the faster "
                                              "on an H100)")
        if self.eval.every_n_steps is not None and not self.evaluates:
            raise FieldError("eval.every_n_steps", "eval.every_n_steps needs eval data: set data.eval, "
                                                   "data.eval_fraction or eval.reference")
        gen = self.eval.generate
        if gen is not None:
            if self.has_score_head or (self.objective == "sft" and self.data.format == "text"):
                raise FieldError("eval.generate", "eval.generate needs prompts and reference answers: data.format "
                                                  "prompt_completion or chat, or objective dpo")
            if gen.data is None and self.data.eval is None:
                raise FieldError("eval.generate", "eval.generate needs rows with prompts: set eval.generate.data or "
                                                  "data.eval (an eval_fraction split holds tokens, not prompts)")
        if self.eval.reference and self.has_score_head:
            raise FieldError("eval.reference", f"eval.reference measures next-token loss with the LM head; objective "
                                               f"{self.objective} replaces it with a new head: remove eval.reference")
        best_by = self.checkpoint.keep_best_by
        if best_by and not best_by.replace("_", "").isalnum():
            raise FieldError("checkpoint.keep_best_by", "checkpoint.keep_best_by must be a metric name like eval_loss")
        if best_by in ("eval_loss", "eval_perplexity") and not self.has_eval:
            raise FieldError("checkpoint.keep_best_by",
                             f"checkpoint.keep_best_by {best_by} needs data.eval or data.eval_fraction")
        return self

    def _check_elastic(self) -> None:
        """An elastic job runs at whatever size in [min, max] Ray Train finds room for: the global batch must split
        into micro batches, and every size must get at least one of them."""
        o, r = self.optim, self.resources
        if o.global_batch_size % o.micro_batch_size:
            raise FieldError("optim.global_batch_size", f"optim.global_batch_size {o.global_batch_size} is not a "
                                                        f"multiple of optim.micro_batch_size {o.micro_batch_size}")
        micro_batches = o.global_batch_size // o.micro_batch_size
        if r.num_workers > micro_batches:
            raise FieldError("resources.num_workers.max", f"resources.num_workers.max {r.num_workers} is more "
                                                          f"workers than the {micro_batches} micro batches of a "
                                                          "global batch")
        if self.parallel.sequence > 1:
            raise FieldError("parallel.sequence", "parallel.sequence needs a fixed resources.num_workers: Ray Train "
                                                  "may pick any size in the range, and a sequence group needs all N")
        if self.zero.hpz_partition_size > 1:
            raise FieldError("zero.hpz_partition_size", "zero.hpz_partition_size needs a fixed resources.num_workers "
                                                        "(it must divide the size)")

    def _check_sequence_parallel(self) -> None:
        sp = self.parallel.sequence
        if sp == 1:
            return
        if self.resources.num_workers % sp:
            raise FieldError("parallel.sequence", f"parallel.sequence {sp} must divide resources.num_workers "
                                                  f"{self.resources.num_workers} (each group of {sp} workers splits "
                                                  "one sequence)")
        if self.objective != "sft":
            raise FieldError("parallel.sequence", f"parallel.sequence splits one sequence for next-token loss "
                                                  f"(objective sft); objective {self.objective} scores whole rows")
        attn = self.model.attn_implementation
        if attn == "eager":
            raise FieldError("model.attn_implementation", "parallel.sequence needs sdpa or flash attention: eager "
                                                          "attention builds a full 4D mask, which DeepSpeed's Ulysses "
                                                          "drops")
        if self.data.packing and attn == "sdpa":
            raise FieldError("data.packing", "data.packing under parallel.sequence needs model.attn_implementation "
                                             "flash_attention_2 or 3: DeepSpeed's Ulysses drops the 4D mask that "
                                             "keeps packed documents apart under sdpa")
        cfg = self.model.from_config or {}
        heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
        if isinstance(heads, int) and heads % sp:
            raise FieldError("parallel.sequence", f"parallel.sequence {sp} must divide the model's "
                                                  f"{heads} attention heads")
        if isinstance(kv, int) and kv % sp and sp % kv:
            raise FieldError("parallel.sequence", f"parallel.sequence {sp} and the model's {kv} key/value heads "
                                                  "must divide one another")

    @property
    def run_dir(self) -> str:
        """<checkpoint.storage>/<name>: the run's (or sweep's) folder, local path or s3:// URI."""
        return f"{self.checkpoint.resolved_storage()}/{self.name}"

    @property
    def prepared_root(self) -> Optional[str]:
        """Where tokenised data is kept (data.cache; default <checkpoint.storage>/_prepared); None: data.cache off."""
        c = self.data.cache
        if c == "off":
            return None
        return resolve(c) if c else f"{self.checkpoint.resolved_storage()}/_prepared"

    @property
    def checkpoints_leave_frozen_out(self) -> bool:
        """LoRA and freeze checkpoints leave out the frozen parameters when the base is loadable again (a hub id, path
        or s3:// prefix): they are the base's own weights, unchanged. (A quickstart's from_config model has no base to
        reload its random frozen weights from, so its checkpoints keep them.) For an 8B LoRA job this is ~16 GB less
        per checkpoint, uploaded and downloaded by every rank again."""
        return self.method in ("lora", "freeze") and self.model.name_or_path is not None

    @property
    def has_score_head(self) -> bool:
        """The objective trains a new head on the backbone (AutoModelForSequenceClassification), not the LM head."""
        return self.objective in ("reward", "classification")

    @property
    def has_eval(self) -> bool:
        return self.data.eval is not None or self.data.eval_fraction > 0 or any(s.eval for s in self.data.sources)

    @property
    def evaluates(self) -> bool:
        """Evaluations run: on the task's held-out data, the reference sets, generation prompts."""
        return self.has_eval or bool(self.eval.reference) or self.eval.generate is not None

    @property
    def grad_accum(self) -> int:
        return self.grad_accum_at(self.resources.num_workers)

    def grad_accum_at(self, world: int) -> int:
        """Micro batches per rank and step on `world` workers: the global batch is the job's at any world size (a
        checkpoint resumed on another number of workers keeps it). A sequence-parallel group reads one micro batch,
        so the data-parallel size is world / parallel.sequence. Where the data-parallel size does not divide the
        global batch's micro batches (an elastic job at some sizes), the last round has ranks without one: they run
        a padding micro batch that counts for nothing (train/sampling.py)."""
        o = self.optim
        return -(-o.global_batch_size // (o.micro_batch_size * self.data_parallel_at(world)))

    def data_parallel_at(self, world: int) -> int:
        """Data-parallel ranks among `world` workers: a sequence-parallel group of parallel.sequence workers reads one
        micro batch."""
        return world // self.parallel.sequence

    def batch_problem(self, world: int, workers: str = "{n} workers") -> Optional[str]:
        """Why `world` workers (`workers`: how the message names them) cannot keep the global batch exactly, or
        None: the one rule the spec check, the DeepSpeed dict and the planner share (elastic jobs pad instead)."""
        o, sp, named = self.optim, self.parallel.sequence, workers.format(n=world)
        if world % sp:
            return f"parallel.sequence {sp} must divide {named}"
        if o.global_batch_size % (o.micro_batch_size * self.data_parallel_at(world)):
            return (f"optim.global_batch_size {o.global_batch_size} is not a multiple of optim.micro_batch_size "
                    f"{o.micro_batch_size} x {named}" + (f" / parallel.sequence {sp}" if sp > 1 else ""))
        return None
