"""Per-GPU and per-node memory of a training job, broken down the way it is spent.

Model states follow the ZeRO paper (Rajbhandari et al., 2020, section 5): with mixed precision and Adam, every
trainable parameter costs 2 bytes of weights, 2 of gradients and K = 12 of optimizer states (fp32 master weights,
momentum, variance); stage 1 partitions the optimizer states over the N data-parallel ranks, stage 2 the gradients
too, stage 3 the weights too. DeepSpeed's ZeRO optimizers keep the fp32 master copy for fp32 weights too (K = 12,
measured by `ftdist bench --only memory`); only stage 0 in fp32 steps plain AdamW (K = 8). Frozen weights (LoRA's base, freeze's lower
layers) cost their 2 (or 4) bytes and nothing else. Offload moves the optimizer states (and with them the step) or
the partitioned weights to host memory.

Activations are counted per decoder layer from what PyTorch keeps for the backward of a Llama-style layer (listed
in `layer_activation_bytes`); gradient checkpointing keeps each layer's input and recomputes one layer at a
time. Logits and the loss are counted as Hugging Face computes them (bf16 logits, an fp32 copy for the loss and its
log-softmax), or not at all under Liger's fused linear + cross-entropy (it works in chunks). DeepSpeed's buffers
come from the job's own zero: settings as DeepSpeed 0.19 allocates them (the reduce buckets whole, whatever the
number of trainable parameters: a LoRA job's buckets are as large as a full fine-tune's).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from ftdist.plan.gpus import GiB, Gpu
from ftdist.plan.shape import ModelShape
from ftdist.spec import JobSpec

CUDA_CONTEXT = int(0.8 * GiB)
"""CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers of one process (typical on H100/A100; not per model)."""
ALLOCATOR_HEADROOM = 0.10
"""Fraction of the total kept for the caching allocator's fragmentation."""


@dataclass(frozen=True)
class Setting:
    """The knobs the planner varies when a job does not fit (the rest comes from the job)."""

    stage: int
    offload_optimizer: bool
    offload_params: bool
    micro_batch: int
    gradient_checkpointing: bool
    method: str

    @classmethod
    def of(cls, spec: JobSpec) -> "Setting":
        return cls(spec.zero.stage, spec.zero.offload_optimizer != "none", spec.zero.offload_params != "none",
                   spec.optim.micro_batch_size, spec.model.gradient_checkpointing, spec.method)


@dataclass
class MemoryPlan:
    setting: Setting
    gpu: list[tuple[str, int]] = field(default_factory=list)
    """(what, bytes) per GPU, in the order they add up"""
    host: list[tuple[str, int]] = field(default_factory=list)
    """(what, bytes) per node"""
    capacity: int = 0
    bucket_pages_written: int = 0
    """Of the reduce buckets, the bytes gradients are written to (min(bucket, trainable) of one buffer): all that a
    CPU process holds resident of them, since untouched pages of `torch.empty` are never backed by memory."""

    @property
    def model_states(self) -> int:
        return sum(b for what, b in self.gpu if what in MODEL_STATES)

    @property
    def peak(self) -> int:
        return sum(b for _, b in self.gpu)

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity


MODEL_STATES = ("parameters", "gradients", "optimizer states")
BUCKETS = "DeepSpeed reduce buckets"
GATHERED = "ZeRO-3 prefetch and gathered layer"
DEVICE_ONLY = ("CUDA context and workspaces", "allocator headroom")
OFFLOADED = ("offloaded optimizer states and fp32 gradients", "offloaded parameters", "offloaded activations")


def cpu_process_bytes(plan: MemoryPlan) -> int:
    """Peak training memory of one process when the device is the CPU (a CPU run, where "GPU" and host memory are the
    same RAM): the per-GPU lines without CUDA's context and the caching allocator's headroom, plus what offload put
    in host memory, and of DeepSpeed's reduce buckets only the pages gradients are written to (a GPU's caching
    allocator holds a bucket whole from its `torch.empty`; a CPU process's resident memory holds the pages written).
    Under ZeRO-3, gloo's all-gather stages its output in a temporary of the same size (NCCL gathers in place;
    measured on gloo: a 12 MiB all_gather_into_tensor peaks 24 MiB above where it started), and the prefetch gathers
    up to its bucket in one call: the gathered line counts twice.
    Plan with gpus_per_node=1 so that host lines are per process. This is the number that
    tests/integration/test_plan_measured.py holds against a process's peak RSS."""
    device = sum(b for what, b in plan.gpu if what not in DEVICE_ONLY and what != BUCKETS)
    gloo_staging = sum(b for what, b in plan.gpu if what == GATHERED)
    return device + gloo_staging + plan.bucket_pages_written + sum(b for what, b in plan.host if what in OFFLOADED)


def four_bit_bytes(double_quant: bool) -> float:
    """Bytes per parameter of a bitsandbytes 4-bit weight: half a byte, plus one scale per block of 64 (fp32; with
    double quantisation 8-bit, with an fp32 scale per 256 of those). The weights that stay unquantised are fp32
    after peft's k-bit preparation."""
    return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)


def qlora_base_bytes(spec: JobSpec, shape: ModelShape) -> float:
    """The whole QLoRA model's weights: the layers' matmuls in 4-bit, the rest in fp32 (peft's k-bit preparation).
    Under ZeRO-3 each rank holds this much while it loads, before DeepSpeed partitions it."""
    quantized = shape.layers * shape.layer_matmul_params()
    return quantized * four_bit_bytes(spec.lora.double_quant) + (shape.params() - quantized) * 4


def model_state_bytes(spec: JobSpec, shape: ModelShape, world: int, setting: Optional[Setting] = None) -> dict:
    """Per-rank bytes of parameters, gradients and optimizer states wherever they live (device or host): the ZeRO
    paper's formulas with the job's dtype, method and stage. `ftdist bench --only memory` and
    tests/integration/test_plan_measured.py compare them with what DeepSpeed holds."""
    s = setting or Setting.of(spec)
    d = _weight_bytes(spec)
    # Adam's two moments, plus the fp32 master copy that DeepSpeed's ZeRO optimizers keep even for fp32 weights
    # (measured: `ftdist bench --only memory`); without ZeRO an fp32 model steps with plain torch AdamW.
    k = 12 if (d == 2 or s.stage >= 1) else 8
    total, trainable = shape.params(), trainable_params(spec, shape, s.method)
    grads = trainable * d / (world if s.stage >= 2 else 1)
    if s.offload_optimizer and s.stage in (1, 2):  # the host's fp32 gradient partition the CPU step reads
        grads += trainable * 4 / world  # (measured: `ftdist bench --only peak`; ZeRO-3 keeps no second copy)
    # ZeRO++'s hpZ keeps a second copy of the weights partitioned within groups of hpz_partition_size workers.
    hpz = spec.zero.hpz_partition_size if s.stage == 3 and spec.zero.hpz_partition_size > 1 else 0
    params = total * d / (world if s.stage == 3 else 1) + (total * d / hpz if hpz else 0)
    if s.method == "lora" and spec.lora and spec.lora.quantize:  # QLoRA: layer matmuls in 4-bit
        params = qlora_base_bytes(spec, shape) / (world if s.stage == 3 else 1)
    return {"parameters": params,
            "gradients": grads,
            "optimizer states": trainable * k / (world if s.stage >= 1 else 1)}


@dataclass(frozen=True)
class CheckpointSize:
    """What one DeepSpeed checkpoint of the job writes (ftdist stages it on each node's local disk, then uploads)."""

    module: int
    """The module's weights in the model dtype (`mp_rank_00_model_states.pt`), written by rank 0 under ZeRO 0-2
    (for LoRA and freeze on a reloadable base only what trains; otherwise the whole module); 0 under ZeRO-3, whose
    ranks save partitions."""
    per_rank: int
    """One rank's optimizer partition (`zero_pp_rank_N_..._optim_states.pt`: fp32 master weights and Adam's two
    moments of its share of the trainable parameters; without ZeRO rank 0 alone writes the whole optimizer)."""

    def node_bytes(self, ranks: int, with_rank0: bool = True) -> int:
        """Staged on a node that hosts `ranks` of the job's workers."""
        return (self.module if with_rank0 else 0) + ranks * self.per_rank

    def total(self, world: int) -> int:
        return self.module + world * self.per_rank


def checkpoint_size(spec: JobSpec, shape: ModelShape, world: int, setting: Optional[Setting] = None) -> CheckpointSize:
    s = setting or Setting.of(spec)
    states = model_state_bytes(spec, shape, world, s)
    # Rank 0's module file under ZeRO 0-2: the whole module, or only what trains where the frozen base is left out.
    kept = trainable_params(spec, shape, s.method) if spec.checkpoints_leave_frozen_out else shape.params()
    module = 0 if s.stage == 3 else kept * _weight_bytes(spec)
    if s.stage == 0:  # no partitions: rank 0 writes the optimizer beside the module
        return CheckpointSize(int(module + states["optimizer states"]), 0)
    return CheckpointSize(int(module), int(states["optimizer states"]))


def _weight_bytes(spec: JobSpec) -> int:
    return 2 if spec.model.dtype in ("bf16", "fp16") else 4


def plan_memory(spec: JobSpec, shape: ModelShape, card: Gpu, world: int, gpus_per_node: int,
                setting: Optional[Setting] = None) -> MemoryPlan:
    s = setting or Setting.of(spec)
    d = _weight_bytes(spec)
    trainable = trainable_params(spec, shape, s.method)
    states = model_state_bytes(spec, shape, world, s)
    params, optim = states["parameters"], states["optimizer states"]
    # The step's fp32 gradient partition (DeepSpeed upcasts the reduced gradients for the master weights).
    fp32_grads = trainable * 4 / (world if s.stage >= 1 else 1)
    plan = MemoryPlan(s, capacity=card.memory, bucket_pages_written=int(_reduce_buckets(spec, s, trainable, d, True)))
    plan.gpu.append(("parameters", 0 if s.offload_params else int(params)))
    plan.gpu.append(("gradients", 0 if s.offload_optimizer else int(states["gradients"])))
    plan.gpu.append(("optimizer states", 0 if s.offload_optimizer else int(optim)))
    seq, b = rank_sequence(spec), s.micro_batch * sequences_per_row(spec)
    activations = activation_bytes(spec, shape, s)
    offloaded = checkpointed_inputs(spec, shape, s) if s.gradient_checkpointing and spec.model.activation_offload else 0
    plan.gpu.append(("activations", int(activations - offloaded)))
    logits = 0 if spec.model.use_liger_kernel else b * seq * shape.outputs * (d + 4 + 4)
    plan.gpu.append(("logits and loss", int(logits)))
    plan.gpu.append((BUCKETS, int(_reduce_buckets(spec, s, trainable, d))))
    if s.stage == 3:
        plan.gpu.append((GATHERED, int(_zero3_gathered(spec, shape, d))))
    if not s.offload_optimizer and d == 2:
        plan.gpu.append(("fp32 gradients at the step", int(fp32_grads)))
    plan.gpu.append((DEVICE_ONLY[0], CUDA_CONTEXT))
    plan.gpu.append((DEVICE_ONLY[1], int(ALLOCATOR_HEADROOM * sum(b for _, b in plan.gpu))))
    per_node = min(gpus_per_node, world)
    if s.offload_optimizer:
        plan.host.append((OFFLOADED[0], int((optim + fp32_grads) * per_node)))
    if s.offload_params:
        plan.host.append((OFFLOADED[1], int(params * per_node)))
    if offloaded:
        plan.host.append((OFFLOADED[2], int(offloaded * per_node)))
    # Loading: under ZeRO-3 each rank materialises its partition (the per-rank parameters); otherwise every process
    # holds the whole model.
    plan.host.append(("loading the weights", int(params * per_node)))
    return plan


def rank_sequence(spec: JobSpec) -> int:
    """Positions of each sequence one rank holds: data.max_length, or under parallel.sequence (Ulysses) 1/N of it,
    padded up. Every activation is per position: attention's gathered q, k, v and output hold the whole sequence for
    1/N of the heads, the same bytes."""
    return -(-spec.data.max_length // spec.parallel.sequence)


def sequences_per_row(spec: JobSpec) -> int:
    """Sequences one row puts through the model: a DPO or reward pair is a chosen and a rejected sequence in one
    forward."""
    return 2 if spec.objective in ("dpo", "reward") else 1


def job_shape(spec: JobSpec, config: dict) -> ModelShape:
    """The model's shape as the job trains it: under a reward or classification objective the LM head is replaced by
    a score head (one output, or one per label; 2 labels assumed where they come from the data)."""
    shape = ModelShape.from_config(config)
    if not spec.has_score_head:
        return shape
    if spec.objective == "reward":
        return replace(shape, score_outputs=1)
    labels = spec.classification.labels
    return replace(shape, score_outputs=len(labels) if labels else 2)


def trainable_params(spec: JobSpec, shape: ModelShape, method: str) -> int:
    """Parameters that train under `method` with the job's LoRA / freeze settings."""
    if method == "lora":
        lora = spec.lora
        rank = lora.rank if lora else 8
        targets = None if (lora is None or lora.target_modules == "all-linear") else list(lora.target_modules)
        return shape.trainable_params("lora", lora_rank=rank, lora_targets=targets, dora=bool(lora and lora.use_dora))
    if method == "freeze" and spec.freeze is not None:
        f = spec.freeze
        return shape.trainable_params("freeze", top_layers=f.train_top_layers, train_head=f.train_head,
                                      train_final_norm=f.train_final_norm)
    return shape.trainable_params(method)


def layer_activation_bytes(shape: ModelShape, attn: str, seq: int, d: int,
                           lora: Optional[tuple[int, bool]] = None, zero3: bool = False) -> float:
    """Bytes per token that one Llama-style decoder layer keeps for its backward, as autograd saves them in
    transformers 5 (counted with torch.autograd.graph.saved_tensors_hooks on real models, parameters excluded, fitted
    exactly over hidden, heads, KV heads, head and MLP sizes in fp32 and bf16: tests/unit/test_plan.py), in units
    of the weight size `d`:
    - each RMSNorm (2 per layer): its input, the normalised input and the output in fp32 (3h); in 16-bit it keeps an
      fp32 copy of the input and of the normalised input plus the 16-bit normalised input and output (4h);
    - MLP: gate, SiLU(gate), up and their product (4i);
    - SDPA / flash attention: the rotated q and k, v and the output (2 h_q + 2 kv) and an fp32 logsumexp per head;
    - eager attention: q, k and v repeated to all heads, the output and its contiguous copy (4 h_q), and the softmax
      per head and key (fp32; in 16-bit the fp32 softmax and its 16-bit copy).
    `lora` (rank, dropout > 0): peft's LoRA on every linear layer (frozen norms keep less; each adapter keeps its
    input, in fp32 when the base is 16-bit since peft keeps adapters in fp32, and with dropout its own dropped-out
    copy and mask); these are fitted coefficients, for all-linear targets (fewer targets keep less: an upper bound).
    `zero3`: DeepSpeed's ZeRO-3 replaces F.linear with its memory-efficient linear, which saves every linear's input
    even where the weight is frozen; under LoRA the frozen bases then keep their inputs (q/k/v's, gate/up's, down's:
    2h + i) unless the adapter already keeps the same tensor (fp32 without dropout)."""
    h, hq, kv, i = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    norms_and_mlp = 2 * _norm_units(d) * h * d + 4 * i * d
    sdpa = (2 * hq + 2 * kv) * d + shape.heads * 4
    eager = (4 * hq + shape.heads * seq * (1 if d == 4 else 3)) * d
    full = norms_and_mlp + (eager if attn == "eager" else sdpa)
    if lora is None:
        return full
    rank, dropout = lora
    coef = _LORA_BYTES[(d, dropout)]  # bytes per token: (h, h_q, kv, i) with SDPA; the adapters' rank term: 28 r
    lora_sdpa = coef[0] * h + coef[1] * hq + coef[2] * kv + coef[3] * i + shape.heads * 4 + 28 * rank
    base_inputs = (2 * h + i) * d if zero3 and (dropout or d == 2) else 0
    return full + lora_sdpa + base_inputs - (norms_and_mlp + sdpa)  # LoRA's difference, measured with SDPA


def _norm_units(d: int) -> int:
    """Units of `d` bytes per hidden element that one RMSNorm keeps (fp32: 3; 16-bit: 4, its fp32 copies)."""
    return 3 if d == 4 else 4


# Measured with saved_tensors_hooks on transformers 5 + peft 0.21 (all-linear targets, SDPA), bytes per token and
# layer for (hidden, h_q, kv, intermediate), by (weight bytes, dropout > 0).
_LORA_BYTES = {(4, False): (16, 8, 8, 16), (4, True): (48, 16, 8, 20),
               (2, False): (28, 8, 4, 10), (2, True): (48, 12, 4, 14)}


def activation_bytes(spec: JobSpec, shape: ModelShape, s: "Setting") -> float:
    """What autograd keeps for the backward of one micro batch: every layer that trains or lies above one that
    trains (freeze: the frozen lower layers keep nothing, their input needs no gradient), each layer's input only
    under gradient checkpointing (plus one layer recomputed at a time), and the final norm."""
    d, seq, b = _weight_bytes(spec), rank_sequence(spec), s.micro_batch * sequences_per_row(spec)
    lora = (spec.lora.rank if spec.lora else 8, (spec.lora.dropout if spec.lora else 0.05) > 0) \
        if s.method == "lora" else None
    per_layer = layer_activation_bytes(shape, spec.model.attn_implementation, seq, d, lora, s.stage == 3) * b * seq
    layers = _backward_layers(spec, shape, s)
    final_norm = _norm_units(d) * shape.hidden * b * seq * d
    if s.gradient_checkpointing:  # each layer's input kept; one layer's activations alive during its recompute
        return checkpointed_inputs(spec, shape, s) + (per_layer if layers else 0) + final_norm
    return layers * per_layer + final_norm


def checkpointed_inputs(spec: JobSpec, shape: ModelShape, s: "Setting") -> float:
    """What gradient checkpointing keeps between forward and backward: each trained layer's input (what
    model.activation_offload moves to host memory)."""
    tokens = s.micro_batch * sequences_per_row(spec) * rank_sequence(spec)
    return _backward_layers(spec, shape, s) * tokens * shape.hidden * _weight_bytes(spec)


def _backward_layers(spec: JobSpec, shape: ModelShape, s: "Setting") -> int:
    """Decoder layers the backward runs through: all, or under freeze the top ones that train (the frozen lower
    layers keep nothing, their input needs no gradient)."""
    if s.method == "freeze" and spec.freeze is not None:
        return min(shape.layers, spec.freeze.train_top_layers)
    return shape.layers


def _reduce_buckets(spec: JobSpec, s: Setting, trainable: int, d: int, written: bool = False) -> float:
    """The gradient reduce buckets as DeepSpeed 0.19 allocates them (`torch.empty(reduce_bucket_size)`, whatever the
    number of trainable parameters; with contiguous_gradients only): ZeRO-1/2 set up a bucket at each backward, two
    with overlap_comm, in fp32 under ZeRO-1 when gradients accumulate in fp32 (ftdist's bf16 setting) and in the
    model dtype otherwise; ZeRO-3 keeps one from initialisation. `written`: only the elements gradients are written
    to, min(bucket, trainable) of one bucket (the second is used only when the first fills)."""
    z = spec.zero
    if s.stage == 0 or not z.contiguous_gradients:
        return 0
    dtype = 4 if (s.stage == 1 and spec.model.dtype == "bf16") else d
    if written:
        return min(z.reduce_bucket_size, trainable) * dtype
    return z.reduce_bucket_size * dtype * (2 if z.overlap_comm and s.stage <= 2 else 1)


def _zero3_gathered(spec: JobSpec, shape: ModelShape, d: int) -> float:
    """ZeRO-3's prefetch bucket of gathered weights plus the largest module gathered at once."""
    gathered = max(shape.layer_params(), shape.embedding_params())
    return (min(spec.zero.stage3_prefetch_bucket_size, shape.params()) + gathered) * d


# ---------------------------------------------------------------------------------------------------------------
# What to change when it does not fit


def fixes(spec: JobSpec, shape: ModelShape, card: Gpu, world: int, gpus_per_node: int) -> list[tuple[str, MemoryPlan]]:
    """The smallest change that makes the job fit, in the order a user would try them (cheapest in speed first):
    gradient checkpointing, a higher ZeRO stage, a smaller micro batch (more accumulation), optimizer offload,
    parameter offload, LoRA. Single changes first; else the cumulative combination that fits."""
    base = Setting.of(spec)
    steps = []
    if not base.gradient_checkpointing:
        steps.append(("model.gradient_checkpointing: true", lambda s: replace(s, gradient_checkpointing=True)))
    for stage in range(base.stage + 1, 4):
        steps.append((f"zero.stage: {stage}", lambda s, st=stage: replace(s, stage=max(s.stage, st))))
    mb = base.micro_batch // 2
    while mb >= 1:
        steps.append((f"optim.micro_batch_size: {mb} (more gradient accumulation, same global batch)",
                      lambda s, m=mb: replace(s, micro_batch=min(s.micro_batch, m))))
        mb //= 2
    if not base.offload_optimizer:
        steps.append(("zero.offload_optimizer: cpu", lambda s: replace(s, offload_optimizer=True,
                                                                       stage=max(s.stage, 1))))
    if not base.offload_params:
        steps.append(("zero.stage: 3 with zero.offload_params: cpu",
                      lambda s: replace(s, offload_params=True, stage=3)))
    if base.method != "lora":
        steps.append(("method: lora", lambda s: replace(s, method="lora")))
    for what, change in steps:
        p = plan_memory(spec, shape, card, world, gpus_per_node, change(base))
        if p.fits:
            return [(what, p)]
    chosen, s = [], base
    for what, change in steps:
        s = change(s)
        chosen.append(what)
        p = plan_memory(spec, shape, card, world, gpus_per_node, s)
        if p.fits:
            return [(" + ".join(chosen), p)]
    return []
