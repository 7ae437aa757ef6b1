"""Per-GPU and per-node memory of a training job, broken down the way it is spent.

Model states follow the ZeRO paper (Rajbhandari et al., 2020, section 5): with mixed precision and Adam, every
trainable parameter costs 2 bytes of weights, 2 of gradients and K = 12 of optimizer states (fp32 master weights,
momentum, variance); stage 1 partitions the optimizer states over the N data-parallel ranks, stage 2 the gradients
too, stage 3 the weights too. DeepSpeed's ZeRO optimizers keep the fp32 master copy for fp32 weights too (K = 12,
measured by `ftdist bench --only memory`); only stage 0 in fp32 steps plain AdamW (K = 8). Frozen weights (LoRA's base, freeze's lower
layers) cost their 2 (or 4) bytes and nothing else. Offload moves the optimizer states (and with them the step) or
the partitioned weights to host memory.

Activations are counted per decoder layer from what PyTorch keeps for the backward of a Llama-style layer (listed
in `_layer_activation_elements`); gradient checkpointing keeps each layer's input and recomputes one layer at a
time. Logits and the loss are counted as Hugging Face computes them (bf16 logits, an fp32 copy for the loss and its
log-softmax), or not at all under Liger's fused linear + cross-entropy (it works in chunks). DeepSpeed's buffers
come from the job's own zero: settings (bucket sizes, capped by the gradients that exist).
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
    return {"parameters": total * d / (world if s.stage == 3 else 1),
            "gradients": trainable * d / (world if s.stage >= 2 else 1),
            "optimizer states": trainable * k / (world if s.stage >= 1 else 1)}


@dataclass(frozen=True)
class CheckpointSize:
    """What one DeepSpeed checkpoint of the job writes (ftdist stages it on each node's local disk, then uploads)."""

    module: int
    """The module's weights in the model dtype (`mp_rank_00_model_states.pt`), written by rank 0 under ZeRO 0-2
    (LoRA and freeze included: DeepSpeed saves the whole module); 0 under ZeRO-3, whose ranks save partitions."""
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
    module = 0 if s.stage == 3 else shape.params() * _weight_bytes(spec)
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
    plan = MemoryPlan(s, capacity=card.memory)
    plan.gpu.append(("parameters", 0 if s.offload_params else int(params)))
    plan.gpu.append(("gradients", 0 if s.offload_optimizer else int(states["gradients"])))
    plan.gpu.append(("optimizer states", 0 if s.offload_optimizer else int(optim)))
    seq, b = spec.data.max_length, s.micro_batch
    per_layer = _layer_activation_elements(shape, spec.model.attn_implementation, seq) * b * seq * d
    if s.gradient_checkpointing:  # each layer's input kept; one layer's activations alive during its recompute
        acts = shape.layers * b * seq * shape.hidden * d + per_layer
    else:
        acts = shape.layers * per_layer
    plan.gpu.append(("activations", int(acts)))
    logits = 0 if spec.model.use_liger_kernel else b * seq * shape.vocab * (d + 4 + 4)
    plan.gpu.append(("logits and loss", int(logits)))
    plan.gpu.append(("DeepSpeed buffers", int(_buffers(spec, shape, s, trainable, d))))
    if not s.offload_optimizer and d == 2:
        plan.gpu.append(("fp32 gradients at the step", int(fp32_grads)))
    plan.gpu.append(("CUDA context and workspaces", CUDA_CONTEXT))
    plan.gpu.append(("allocator headroom", int(ALLOCATOR_HEADROOM * sum(b for _, b in plan.gpu))))
    per_node = min(gpus_per_node, world)
    if s.offload_optimizer:
        plan.host.append(("offloaded optimizer states and fp32 gradients", int((optim + fp32_grads) * per_node)))
    if s.offload_params:
        plan.host.append(("offloaded parameters", int(params * per_node)))
    # Loading: under ZeRO-3 each rank materialises its partition (the per-rank parameters); otherwise every process
    # holds the whole model.
    plan.host.append(("loading the weights", int(params * per_node)))
    return plan


def trainable_params(spec: JobSpec, shape: ModelShape, method: str) -> int:
    """Parameters that train under `method` with the job's LoRA / freeze settings."""
    if method == "lora":
        lora = spec.lora
        rank = lora.rank if lora else 8
        targets = None if (lora is None or lora.target_modules == "all-linear") else list(lora.target_modules)
        return shape.trainable_params("lora", lora_rank=rank, lora_targets=targets)
    if method == "freeze" and spec.freeze is not None:
        f = spec.freeze
        return shape.trainable_params("freeze", top_layers=f.train_top_layers, train_head=f.train_head,
                                      train_final_norm=f.train_final_norm)
    return shape.trainable_params(method)


def _layer_activation_elements(shape: ModelShape, attn: str, seq: int) -> float:
    """Elements per token that one Llama-style decoder layer keeps for its backward:
    input and normed input of attention (2h), q, k, v after rotary (h_q + 2 kv), the attention output (h_q),
    input and normed input of the MLP (2h), gate, SiLU(gate), up and their product (4 i). SDPA/flash keep only a
    logsumexp per head and query (negligible); eager attention keeps the softmax in fp32 and its bf16 copy
    (3 x heads x seq per token, in units of 2 bytes)."""
    hq, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    elements = 4 * shape.hidden + 2 * hq + 2 * kv + 4 * shape.intermediate
    if attn == "eager":
        elements += 3 * shape.heads * seq
    return elements


def _buffers(spec: JobSpec, shape: ModelShape, s: Setting, trainable: int, d: int) -> float:
    """Gradient reduce buckets (doubled with overlap_comm), the all-gather bucket (stages 1-2), and under stage 3
    the prefetch bucket plus the largest gathered layer. Buckets are capped by the gradients/weights that exist."""
    z = spec.zero
    reduce = min(z.reduce_bucket_size, trainable) * d * (2 if z.overlap_comm else 1)
    if s.stage <= 2:
        return reduce + (min(z.allgather_bucket_size, trainable) * d if s.stage >= 1 else 0)
    gathered = max(shape.layer_params(), shape.embedding_params())
    return reduce + (min(z.stage3_prefetch_bucket_size, shape.params()) + gathered) * d


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
