"""The job file schema (pydantic v2, frozen, unknown keys rejected), YAML loading with line numbers, `--set`.

Imports neither torch, ray nor deepspeed: `ftdist validate` must stay fast.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ftdist.errors import SpecError

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


class ModelSpec(_Spec):
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
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    trust_remote_code: bool = False
    compile: bool = False
    """torch.compile the model (DeepSpeed `engine.compile()`): slower start, faster steps on GPUs."""
    use_liger_kernel: bool = False
    """GPU only: swap in Liger's fused Triton kernels (RMSNorm, rotary, SwiGLU, and a fused linear + cross-entropy
    loss that never materialises the logits) for the model types Liger supports (Llama, Mistral, Qwen, Gemma, ...).
    Needs the `liger-kernel` package on the workers (`pip install 'ftdist[gpu]'`); the same switch as
    `TrainingArguments.use_liger_kernel` in the Hugging Face Trainer."""

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.name_or_path is None) == (self.from_config is None):
            raise ValueError("set exactly one of model.name_or_path or model.from_config")
        if self.from_config is not None:
            if "model_type" not in self.from_config:
                raise ValueError("model.from_config needs a model_type (e.g. llama)")
            if self.tokenizer is None:
                raise ValueError("model.tokenizer is required with model.from_config")
        return self

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.name_or_path  # type: ignore[return-value]


class LoraSpec(_Spec):
    """LoRA adapters via peft."""

    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    merge_on_export: bool = False
    """Also export the base model with the adapter merged in (a plain HF model folder)."""


class FreezeSpec(_Spec):
    """Partial fine-tuning: embeddings and lower decoder layers frozen, top layers (and head) trained."""

    train_top_layers: int = Field(2, ge=0)
    train_head: bool = True
    train_final_norm: bool = True

    @model_validator(mode="after")
    def _something_trains(self) -> "FreezeSpec":
        if self.train_top_layers == 0 and not self.train_head:
            raise ValueError("freeze trains nothing: set freeze.train_top_layers > 0 or freeze.train_head")
        return self


class ZeroSpec(_Spec):
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

    @model_validator(mode="after")
    def _combos(self) -> "ZeroSpec":
        if self.offload_params != "none" and self.stage != 3:
            raise ValueError("zero.offload_params needs zero.stage 3")
        if self.offload_optimizer != "none" and self.stage == 0:
            raise ValueError("zero.offload_optimizer needs zero.stage 1, 2 or 3")
        return self


class OptimSpec(_Spec):
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
    seed: int = 42

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("betas must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _steps(self) -> "OptimSpec":
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of optim.max_steps or optim.epochs")
        return self


class DataSpec(_Spec):
    """Training data: JSONL, Parquet or a `datasets.save_to_disk` folder, local or `s3://`."""

    train: str
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

    @model_validator(mode="after")
    def _checks(self) -> "DataSpec":
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError("set data.eval or data.eval_fraction, not both")
        if self.format == "text" and self.completion_only_loss:
            raise ValueError("data.completion_only_loss needs format prompt_completion or chat")
        return self

    @property
    def loss_on_completion_only(self) -> bool:
        if self.completion_only_loss is None:
            return self.format != "text"
        return self.completion_only_loss


class ResourcesSpec(_Spec):
    """Ray Train workers."""

    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    accelerator_type: Optional[str] = None
    """Ray accelerator type, e.g. H100, A100-80G (schedules workers onto such nodes)."""
    max_failures: int = Field(2, ge=-1)
    """Restarts of a crashed worker group from the latest checkpoint (-1: unlimited)."""

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


class UploadSpec(_Spec):
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


class EncryptionSpec(_Spec):
    """Server-side encryption for everything ftdist writes to s3://. Key material never goes in the job file."""

    sse: Optional[Literal["AES256", "aws:kms"]] = None
    kms_key_id: Optional[str] = None
    """KMS key id/ARN/alias for sse: aws:kms (an identifier, not a secret); default: the bucket's AWS-managed key."""

    @model_validator(mode="after")
    def _kms(self) -> "EncryptionSpec":
        if self.kms_key_id and self.sse != "aws:kms":
            raise ValueError("kms_key_id needs sse: aws:kms")
        return self

    def extra_args(self) -> dict:
        out: dict = {}
        if self.sse:
            out["ServerSideEncryption"] = self.sse
        if self.kms_key_id:
            out["SSEKMSKeyId"] = self.kms_key_id
        return out


class CheckpointSpec(_Spec):
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
        if "://" in v and not v.startswith(("s3://", "file://")):
            raise ValueError(f"unsupported storage URI scheme in {v!r} (use a local path or s3://)")
        if v.startswith("s3://"):
            bucket = v[len("s3://"):].split("/", 1)[0]
            if "@" in bucket or ":" in bucket:
                # Never echo the value: it may hold a key.
                raise ValueError("credentials do not belong in the storage URI; use the AWS environment "
                                 "or credential chain (AWS_PROFILE, instance/pod identity)")
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                raise ValueError(f"{bucket!r} is not a valid S3 bucket name")
        return v

    @model_validator(mode="after")
    def _encryption_needs_s3(self) -> "CheckpointSpec":
        if self.encryption.sse and not _is_remote(self.storage):
            raise ValueError("checkpoint.encryption applies to s3:// storage only")
        return self

    def resolved_storage(self, base: Optional[Path] = None) -> str:
        """An absolute local path or the URI as given."""
        if _is_remote(self.storage):
            return self.storage.rstrip("/")
        path = os.path.expanduser(self.storage[len("file://"):] if self.storage.startswith("file://") else self.storage)
        if os.path.isabs(path):  # no cwd needed (inside a Ray job the driver's cwd can vanish under it)
            return os.path.normpath(path)
        return str((base or Path.cwd()).joinpath(path).resolve())


class EvalSpec(_Spec):
    every_n_steps: Optional[int] = Field(None, ge=1)
    """Eval cadence; None: only at the end (when there is eval data)."""
    max_batches: Optional[int] = Field(None, ge=1)


class LoggingSpec(_Spec):
    every_n_steps: int = Field(10, ge=1)


class ExportSpec(_Spec):
    enabled: bool = True
    max_shard_size: str = "5GB"


class SearchDim(_Spec):
    """One dimension of a sweep's search space: exactly one of these. A bare list in `space` means `choice`."""

    choice: Optional[list[Any]] = None
    grid: Optional[list[Any]] = None
    """Every value, one trial each (the grid is the product of all grid dimensions)."""
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    randint: Optional[tuple[int, int]] = None
    """Integers in [low, high)."""

    @model_validator(mode="after")
    def _one(self) -> "SearchDim":
        set_ = [k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError("give exactly one of choice, grid, uniform, loguniform, randint")
        kind = set_[0]
        val = getattr(self, kind)
        if kind in ("choice", "grid") and not val:
            raise ValueError(f"{kind}: empty list")
        if kind in ("uniform", "loguniform", "randint") and not val[0] < val[1]:
            raise ValueError(f"{kind}: low must be below high")
        if kind == "loguniform" and val[0] <= 0:
            raise ValueError("loguniform: bounds must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    @property
    def values(self) -> Optional[list[Any]]:
        """The finite set of values (choice/grid), else None."""
        return self.choice if self.choice is not None else self.grid

    def corners(self) -> list[Any]:
        """Values that span the dimension, for validating the space before any trial starts."""
        if self.values is not None:
            return list(self.values)
        lo, hi = getattr(self, self.kind)
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]


class SchedulerSpec(_Spec):
    type: Literal["fifo", "asha"] = "asha"
    """fifo: every trial runs to the end; asha: asynchronous successive halving (stops weak trials early)."""
    grace_period: int = Field(1, ge=1)
    """asha: optimizer steps a trial runs before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1)
    """asha: 1/reduction_factor of the trials go on at each rung."""


class SweepSpec(_Spec):
    """`ftdist tune`: Ray Tune over any dotted job key; each trial is the `ftdist train` run with overrides."""

    space: dict[str, SearchDim]
    search: Literal["random", "grid", "optuna"] = "random"
    num_samples: int = Field(1, ge=1)
    """random/optuna: number of trials; grid: how many times the grid is repeated."""
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerSpec = SchedulerSpec()
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    """Cap on trials at once; the default fits as many as the cluster's CPUs/GPUs hold (never more)."""
    max_trials: Optional[int] = Field(None, ge=1)
    max_total_steps: Optional[int] = Field(None, ge=1)
    """Stop the sweep once all trials together ran this many optimizer steps."""
    time_budget_s: Optional[float] = Field(None, gt=0)
    alpha_per_rank: Optional[float] = Field(None, gt=0)
    """LoRA: set lora.alpha = alpha_per_rank x lora.rank in every trial (e.g. 2.0 keeps alpha/rank fixed)."""
    keep_best_trials: int = Field(1, ge=0)
    """Checkpoints of this many best trials are kept; the other trials' checkpoints are deleted after the sweep."""
    export_best: bool = True
    seed: Optional[int] = None
    """Seed of the random / Optuna search (the trials' own seed is optim.seed)."""

    @field_validator("space", mode="before")
    @classmethod
    def _bare_lists(cls, v: Any) -> Any:
        if isinstance(v, dict):  # `optim.lr: [1e-4, 3e-4]` is short for `optim.lr: {choice: [1e-4, 3e-4]}`
            return {k: {"choice": d} if isinstance(d, list) else d for k, d in v.items()}
        return v

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict) -> dict:
        if not v:
            raise ValueError("empty search space: give at least one dotted key, e.g. optim.lr: {loguniform: [1e-5, 1e-3]}")
        for key in v:
            if not re.match(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$", key):
                raise ValueError(f"{key!r} is not a dotted job key like optim.lr")
            if key.startswith("sweep.") or key == "name":
                raise ValueError(f"{key}: the sweep cannot search over {key.split('.')[0]}")
        return v


_QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
SECRET_ENV_RE = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE|_KEY$|^KEY$|SESSION)", re.I)
"""Environment variable names that hold secrets: never given as values in job files or submissions."""


def _quantity(v: Optional[str]) -> Optional[str]:
    if v is not None and not _QUANTITY_RE.match(str(v)):
        raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. 64Gi, 512Mi)")
    return v


class SecretEnvSpec(_Spec):
    """An environment variable taken from a Kubernetes Secret on the cluster (the value never leaves it)."""

    name: str
    """the environment variable, e.g. AWS_SECRET_ACCESS_KEY"""
    secret: str
    """the Secret's name"""
    key: str
    """the key inside the Secret"""

    @field_validator("name")
    @classmethod
    def _env(cls, v: str) -> str:
        if not ENV_NAME_RE.match(v):
            raise ValueError(f"{v!r} is not an environment variable name")
        return v

    @field_validator("secret")
    @classmethod
    def _secret(cls, v: str) -> str:
        if not _DNS_LABEL_RE.match(v.replace(".", "-")):
            raise ValueError(f"{v!r} is not a Kubernetes object name")
        return v


class KubernetesSpec(_Spec):
    """How `ftdist k8s render` runs this job on a KubeRay cluster (ignored by train/tune)."""

    namespace: str = "ftdist"
    image: Optional[str] = None
    """the runtime image (cluster/Dockerfile), e.g. registry.example.com/ml/ftdist:0.1.0"""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = []
    service_account: Optional[str] = "ftdist-job"
    """pods run as this service account: bind it to a cloud role (IRSA / GKE Workload Identity) for S3 access"""
    ray_cluster: Optional[str] = None
    """existing RayCluster (for `--cluster existing`), e.g. ftdist-gpu from k8s/base"""
    ray_version: str = "2.60.0"
    workers_per_pod: Optional[int] = Field(None, ge=1)
    """Ray Train workers per worker pod (default: all of a node's GPUs, up to 8 // gpus_per_worker; 1 on CPU)"""
    memory_per_worker: str = "32Gi"
    head_cpu: float = Field(2, gt=0)
    head_memory: str = "8Gi"
    shm_size: Optional[str] = None
    """memory-backed /dev/shm per pod (NCCL and Ray's object store; K8s gives 64Mi by default, which breaks NCCL);
    default: a third of the pod's memory"""
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    priority_class: Optional[str] = None
    secret_env: list[SecretEnvSpec] = []
    secret_env_from: list[str] = []
    """Secrets whose every key becomes an environment variable (envFrom)"""
    env: dict[str, str] = {}
    """non-secret environment, e.g. AWS_ENDPOINT_URL, AWS_REGION"""
    ray_auth: bool = True
    """Ray token auth on the ephemeral cluster (KubeRay authOptions: the operator makes the token Secret)"""
    run_as_user: int = Field(1000, ge=1)
    active_deadline_seconds: int = Field(7 * 24 * 3600, gt=0)
    ttl_seconds_after_finished: int = Field(3600, ge=0)
    backoff_limit: int = Field(2, ge=0)
    """RayJob retries (each on a fresh cluster); every retry resumes from the latest committed checkpoint"""
    labels: dict[str, str] = {}

    @field_validator("memory_per_worker", "head_memory", "shm_size")
    @classmethod
    def _q(cls, v: Optional[str]) -> Optional[str]:
        return _quantity(v)

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        if not _DNS_LABEL_RE.match(v):
            raise ValueError(f"{v!r} is not a valid namespace name")
        return v

    @field_validator("env")
    @classmethod
    def _plain_env(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not ENV_NAME_RE.match(k):
                raise ValueError(f"{k!r} is not an environment variable name")
            if SECRET_ENV_RE.search(k):
                raise ValueError(f"{k} looks like a secret: reference it with kubernetes.secret_env (a Kubernetes "
                                 f"Secret), never as a value in the job file")
        return v


class JobSpec(_Spec):
    """One fine-tuning job."""

    name: str
    model: ModelSpec
    data: DataSpec
    method: Literal["full", "freeze", "lora"] = "full"
    lora: Optional[LoraSpec] = None
    freeze: Optional[FreezeSpec] = None
    zero: ZeroSpec = ZeroSpec()
    optim: OptimSpec
    resources: ResourcesSpec = ResourcesSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    eval: EvalSpec = EvalSpec()
    logging: LoggingSpec = LoggingSpec()
    export: ExportSpec = ExportSpec()
    sweep: Optional[SweepSpec] = None
    """Only read by `ftdist tune`; `ftdist train` ignores it."""
    kubernetes: Optional[KubernetesSpec] = None
    """Only read by `ftdist k8s render`."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("name must be lowercase letters, digits, '.', '_' or '-' (max 63), starting alphanumeric")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "JobSpec":
        if self.lora is not None and self.method != "lora":
            raise ValueError(f"lora options are set but method is {self.method!r}")
        if self.freeze is not None and self.method != "freeze":
            raise ValueError(f"freeze options are set but method is {self.method!r}")
        o, n = self.optim, self.resources.num_workers
        if o.global_batch_size % (o.micro_batch_size * n):
            raise ValueError(
                f"optim.global_batch_size {o.global_batch_size} is not a multiple of "
                f"optim.micro_batch_size {o.micro_batch_size} x resources.num_workers {n}"
            )
        if self.model.dtype == "fp16" and not self.resources.use_gpu:
            raise ValueError("model.dtype fp16 needs GPUs (resources.gpus_per_worker > 0); use fp32 or bf16 on CPU")
        if self.model.use_liger_kernel and not self.resources.use_gpu:
            raise ValueError("model.use_liger_kernel needs GPUs (resources.gpus_per_worker > 0): Liger's kernels are "
                             "Triton kernels for CUDA/ROCm devices")
        if self.model.use_liger_kernel and self.model.compile:
            # Seen on an H100 (torch 2.11, liger-kernel 0.8.5): an illegal memory access in Inductor's autotuning.
            raise ValueError("model.use_liger_kernel and model.compile together crash torch.compile's autotuning "
                             "(illegal memory access); choose one (Liger was the faster on an H100)")
        if self.checkpoint.keep_best_by and not self.checkpoint.keep_best_by.replace("_", "").isalnum():
            raise ValueError("checkpoint.keep_best_by must be a metric name like eval_loss")
        if self.checkpoint.keep_best_by in ("eval_loss", "eval_perplexity") and not self.has_eval:
            raise ValueError(f"checkpoint.keep_best_by {self.checkpoint.keep_best_by} needs data.eval or data.eval_fraction")
        return self

    @property
    def has_eval(self) -> bool:
        return self.data.eval is not None or self.data.eval_fraction > 0

    @property
    def lora_spec(self) -> LoraSpec:
        return self.lora or LoraSpec()

    @property
    def freeze_spec(self) -> FreezeSpec:
        return self.freeze or FreezeSpec()

    @property
    def grad_accum(self) -> int:
        o = self.optim
        return o.global_batch_size // (o.micro_batch_size * self.resources.num_workers)


# ---------------------------------------------------------------------------------------------------------------
# Loading: YAML with line numbers, relative paths, --set overrides.


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records the line of every mapping key path."""


def _compose_lines(node: yaml.Node, prefix: tuple, out: dict) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = prefix + (k.value,)
            out[key] = k.start_mark.line + 1
            _compose_lines(v, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[prefix + (i,)] = v.start_mark.line + 1
            _compose_lines(v, prefix + (i,), out)


def _parse_yaml(text: str, source: str) -> tuple[Any, dict]:
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{where}: malformed YAML: {problem}") from None
    lines: dict = {}
    if node is not None:
        _compose_lines(node, (), lines)
    return data, lines


def _format_errors(err: ValidationError, source: str, lines: dict) -> str:
    e = err.errors()[0]
    loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
    # Find the deepest located prefix for a line number.
    line = None
    for i in range(len(loc), 0, -1):
        if loc[:i] in lines:
            line = lines[loc[:i]]
            break
    key = ".".join(str(x) for x in loc) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required key is missing"
    where = f"{source}:{line}" if line else source
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {key}: {msg}{more}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], YAML-parsed value)."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected key.path=value")
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise SpecError(f"--set {item!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Return a copy of the raw job dict with dotted keys set. Unknown keys are caught by validation."""
    import copy

    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        cur = out
        for p in parts[:-1]:
            nxt = cur.get(p)
            if nxt is None:
                nxt = cur[p] = {}
            elif not isinstance(nxt, dict):
                raise SpecError(f"override {dotted}: {p} is not a section")
            cur = nxt
        cur[parts[-1]] = value
    return out


LOCAL_PATH_KEYS = (("data", "train"), ("data", "eval"), ("model", "name_or_path"), ("model", "tokenizer"))
"""Job keys that may name files on this machine (resolved relative to the job file)."""


def _resolve_paths(data: dict, base: Path) -> dict:
    """Data and model paths are relative to the job file's folder; checkpoint.storage to the cwd."""

    def fix(v: Optional[str], must_look_local: bool = True) -> Optional[str]:
        if v is None or "://" in v or os.path.isabs(v) or v.startswith("~"):
            return v
        cand = base / v
        # Hub ids look like relative paths ("org/model"); only rewrite those that exist next to the file.
        if must_look_local or cand.exists() or v.startswith("."):
            return str(cand.resolve())
        return v

    out = dict(data)
    if isinstance(out.get("data"), dict):
        d = dict(out["data"])
        for k in ("train", "eval"):
            if isinstance(d.get(k), str):
                d[k] = fix(d[k])
        out["data"] = d
    if isinstance(out.get("model"), dict):
        m = dict(out["model"])
        for k in ("name_or_path", "tokenizer"):
            if isinstance(m.get(k), str):
                m[k] = fix(m[k], must_look_local=False)
        out["model"] = m
    return out


def spec_from_dict(data: Any, source: str = "<job>", lines: Optional[dict] = None) -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the job file must be a YAML mapping of sections (name, model, data, ...)")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_errors(err, source, lines or {})) from None


def load_spec(path: Union[str, Path], overrides: Optional[list[str]] = None) -> JobSpec:
    """Read, override and validate a job file. Raises SpecError with file:line: key: message."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{path}: job file not found")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read job file ({e.__class__.__name__})") from None
    data, lines = _parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the job file must be a YAML mapping of sections (name, model, data, ...)")
    ov = {".".join(keys): value for keys, value in map(parse_override, overrides or [])}
    data = apply_overrides(data, ov)
    data = _resolve_paths(data, p.parent.resolve())
    return spec_from_dict(data, str(path), lines)


def spec_from_json(text: str, overrides: Optional[list[str]] = None) -> JobSpec:
    """A job given as JSON on the command line (the RayJob entrypoint that `ftdist k8s render` writes)."""
    import json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"--job-json: not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(data, dict):
        raise SpecError("--job-json: the job must be a JSON object of sections (name, model, data, ...)")
    ov = {".".join(keys): value for keys, value in map(parse_override, overrides or [])}
    return spec_from_dict(apply_overrides(data, ov), "--job-json")


def raw_job(path: Union[str, Path], overrides: Optional[list[str]] = None) -> dict:
    """The job file as written plus --set overrides, before path resolution: tells relative paths from absolute."""
    data, _ = _parse_yaml(Path(path).read_text(), str(path))
    if not isinstance(data, dict):
        return {}
    return apply_overrides(data, {".".join(keys): value for keys, value in map(parse_override, overrides or [])})


def local_paths(path: Union[str, Path], spec: JobSpec, overrides: Optional[list[str]] = None):
    """(dotted key, value as written in the file or --set, value after resolution) for each LOCAL_PATH_KEYS entry
    that is set: tells paths relative to the job file (this machine only) from absolute paths and hub ids."""
    raw = raw_job(path, overrides)
    for section, key in LOCAL_PATH_KEYS:
        sec = raw.get(section) if isinstance(raw.get(section), dict) else {}
        written, val = sec.get(key), getattr(getattr(spec, section), key, None)
        if val:
            yield f"{section}.{key}", (written if isinstance(written, str) else None), val


def with_overrides(spec: JobSpec, overrides: dict[str, Any]) -> JobSpec:
    """A new validated spec with dotted keys replaced (used by --set and by Tune trials)."""
    data = spec.model_dump(mode="json", exclude_unset=False)
    return spec_from_dict(apply_overrides(data, overrides), f"overrides {sorted(overrides)}")


def check_local_inputs(spec: JobSpec) -> None:
    """Fail early (before Ray starts) on local files that do not exist."""
    for key, val in (("data.train", spec.data.train), ("data.eval", spec.data.eval)):
        if val and not _is_remote(val) and not os.path.exists(val):
            raise SpecError(f"{key}: {val}: no such file or directory")
    m = spec.model
    for key, val in (("model.name_or_path", m.name_or_path), ("model.tokenizer", m.tokenizer)):
        if not val or _is_remote(val):
            continue
        looks_local = os.path.isabs(val) or val.startswith((".", "~"))
        if looks_local and not os.path.isdir(os.path.expanduser(val)):
            raise SpecError(f"{key}: {val}: no such directory")
