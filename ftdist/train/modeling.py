"""Build the model (from a local folder or a config; ZeRO-3 aware) and apply the method (full / freeze / LoRA). The
method is a model transform here plus an export policy in export.py."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import struct
from typing import Any, Iterator, Optional

import deepspeed
import torch
import torch.distributed as dist

# peft imports bitsandbytes where it is installed; on a CPU with AVX512-BF16 bitsandbytes then tries to fetch a faster
# 4-bit kernel from the Hugging Face hub and, offline or without the `kernels` package, warns on every import (on
# every rank) before using its own kernel. The fallback is what runs; the line says nothing a user must act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers import initialization as hf_init
from transformers.integrations import HfDeepSpeedConfig
from transformers.modeling_utils import prevent_arange_dtype_change

from ftdist.errors import SpecError
from ftdist.spec import JobSpec, LoraSpec, ModelSpec
from ftdist.train.checkpointing import full_shape
from ftdist.train.heads import ScoreHead, head_modules, init_new, initializer_range, new_value, stored_name

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def load_model(spec: ModelSpec, local_path: Optional[str], ds_config: Optional[dict],
               head: Optional[ScoreHead] = None, seed: int = 0, lora: Optional[LoraSpec] = None) -> Any:
    """Build the model: a causal LM, or with `head` the backbone under a new sequence-level head
    (AutoModelForSequenceClassification; the parameters the checkpoint lacks start as heads.py says, from `seed`).
    Under ZeRO-3 an HfDeepSpeedConfig is alive during construction so transformers wraps it in deepspeed.zero.Init:
    each rank materialises only its partition, never the whole model. `lora`: the job's LoRA section; with
    `lora.quantize` the base linears load in 4-bit (QLoRA): under ZeRO-3 every rank loads the 4-bit model whole
    (transformers quantises as it reads, outside zero.Init) and deepspeed.initialize then partitions it."""
    dtype = getattr(torch, TORCH_DTYPES[spec.dtype])
    common: dict[str, Any] = dict(dtype=dtype, attn_implementation=spec.attn_implementation)
    zero3 = bool(ds_config) and ds_config["zero_optimization"]["stage"] == 3
    quantized = lora is not None and lora.quantize is not None
    if quantized:
        common["quantization_config"] = four_bit_config(lora, dtype, zero3)
    auto = AutoModelForSequenceClassification if head else AutoModelForCausalLM
    head_kwargs = head.config_kwargs() if head else {}
    if zero3 and not quantized and spec.from_config is None and _safetensors_index(local_path):
        # wraps construction in zero.Init
        model = _load_zero3_partitioned(spec, local_path, common, ds_config, auto, head_kwargs, seed)
        return _finish(model, spec)
    keep_alive = None
    if zero3:
        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (weakref'd by transformers while loading)
    if spec.from_config is not None:
        cfg_kwargs = dict(spec.from_config)
        model_type = cfg_kwargs.pop("model_type")
        try:
            config = AutoConfig.for_model(model_type, **cfg_kwargs, **head_kwargs)
        except (ValueError, TypeError) as e:
            raise SpecError(f"model.from_config: {e}") from None
        torch.manual_seed(0)  # same initial weights on every rank and every run
        model = auto.from_config(config, **common)
    else:
        # A checkpoint whose head has other labels (a classifier fine-tuned before) gets a new head, as one without.
        # transformers' load report would list the head (and a causal LM's unused lm_head) on every rank: the
        # worker's model line says it once.
        with _quiet("transformers.modeling_utils", enabled=bool(head)):
            model, info = auto.from_pretrained(local_path, trust_remote_code=spec.trust_remote_code,
                                               output_loading_info=True, ignore_mismatched_sizes=bool(head),
                                               **common, **head_kwargs)
        if head:
            _start_new(model, set(info["missing_keys"]) | {_key(k) for k in info["mismatched_keys"]}, seed)
    del keep_alive
    return _finish(model, spec)


def four_bit_config(lora: LoraSpec, compute_dtype: torch.dtype, zero3: bool = False) -> Any:
    """bitsandbytes' 4-bit settings for QLoRA (the head stays in the model dtype: transformers skips the output
    layer). Under ZeRO-3 the packed 4-bit values are stored in the compute dtype's tensors (two nibbles per byte,
    viewed as bf16/fp32 elements), which DeepSpeed partitions and gathers like any other parameter; uint8 storage it
    cannot flatten beside them. A worker without bitsandbytes gets a one-line error."""
    try:  # transformers checks for it too, with a longer message
        importlib.import_module("bitsandbytes")
    except ImportError as e:
        raise SpecError(f"lora.quantize: bitsandbytes is not importable on this worker ({e}); install it "
                        "(pip install 'ftdist[qlora]') or remove lora.quantize") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=lora.quantize,
                              bnb_4bit_use_double_quant=lora.double_quant, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_storage=compute_dtype if zero3 else torch.uint8)


@contextlib.contextmanager
def _quiet(logger: str, enabled: bool) -> Iterator[None]:
    log = logging.getLogger(logger)
    level = log.level
    if enabled:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _key(mismatch: Any) -> str:
    """A mismatched key as transformers reports it: the name, or (name, checkpoint shape, model shape)."""
    return mismatch if isinstance(mismatch, str) else mismatch[0]


def _start_new(model: Any, names: set[str], seed: int) -> None:
    """Seeded starting values for the parameters the checkpoint lacked (gathered first if ZeRO-3 partitioned
    them, then re-partitioned from rank 0's values)."""
    params = [p for n, p in model.named_parameters() if n in names]
    if params and hasattr(params[0], "ds_id"):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            init_new(model, names, seed)
    else:
        init_new(model, names, seed)


def _finish(model: Any, spec: ModelSpec) -> Any:
    """Settings applied to a freshly built model, whatever path built it."""
    # What the export's config.json says the model is (a causal LM checkpoint under a new head is no longer one).
    model.config.architectures = [type(model).__name__]
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                            offload=spec.activation_offload)
        model.config.use_cache = False
    return model


def _safetensors_index(path: Optional[str]) -> dict[str, str]:
    """{tensor name: file} for a safetensors checkpoint folder (single file or sharded with an index)."""
    if not path:
        return {}
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as fh:
            return {k: os.path.join(path, v) for k, v in json.load(fh)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    return {}


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _st_header(file: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data section starts."""
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n)), 8 + n


def _load_zero3_partitioned(spec: ModelSpec, path: str, common: dict, ds_config: dict, auto: Any,
                            head_kwargs: dict, seed: int) -> Any:
    """ZeRO-3 load in which each rank reads only its own slice of every tensor from the safetensors files.

    The model is built inside zero.Init without weight init (each rank allocates only its 1/N flat partition),
    then each rank preads the contiguous byte range of its partition [rank * part, (rank + 1) * part) of every
    parameter (a row-major tensor's flat range is one contiguous run of bytes in the file). No rank reads or
    holds a whole tensor, let alone the whole model; peak memory is the partition plus one slice. transformers'
    own ZeRO-3 path initialises every module by gathering it and then reads full tensors on every rank.
    Under a new head (`head_kwargs`), the parameters the checkpoint lacks (or holds in another shape) take their
    slice of the seeded starting value heads.py gives every rank alike."""
    index = _safetensors_index(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code, **head_kwargs)
    with hf_init.no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = auto.from_config(config, trust_remote_code=spec.trust_remote_code, **common)
    params = dict(model.named_parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    headers = {f: _st_header(f) for f in set(index.values())}
    backbone = getattr(model, "base_model_prefix", "model")
    where = {n: stored_name(n, index, backbone) for n in params}
    new = {n for n, key in where.items()
           if key is None or headers[index[key]][0][key]["shape"] != list(params[n].ds_shape)}
    if new and not head_kwargs:
        first = sorted(new)[0]
        raise SpecError(f"model: {path}: checkpoint has no tensor {first!r} of its shape ({len(new)} missing); "
                        "is model.name_or_path the right architecture?")
    std = initializer_range(model)
    handles = {f: os.open(f, os.O_RDONLY) for f in headers}
    try:
        for name, p in params.items():
            part = p.ds_tensor  # [ceil(numel / world)] this rank's flat partition
            size = part.numel()
            start, end = rank * size, min((rank + 1) * size, p.ds_numel)
            if start >= end:
                continue
            if name in new:
                chunk = new_value(name, p.ds_shape, std, seed).reshape(-1)[start:end]
            else:
                key = where[name]
                header, data_start = headers[index[key]]
                meta = header[key]
                src_dtype = getattr(torch, _ST_DTYPES[meta["dtype"]])
                es = torch.empty((), dtype=src_dtype).element_size()
                offset = data_start + meta["data_offsets"][0] + start * es
                buf = bytearray((end - start) * es)
                if os.preadv(handles[index[key]], [buf], offset) != len(buf):
                    raise SpecError(f"model: {index[key]}: truncated safetensors file (tensor {key})")
                chunk = torch.frombuffer(buf, dtype=src_dtype)  # [end - start]
            with torch.no_grad():
                part.data[: end - start].copy_(chunk)
    finally:
        for fd in handles.values():
            os.close(fd)
    return model


def decoder_layers(model: Any) -> Any:
    """The decoder's ModuleList of transformer blocks (model.model.layers for Llama/Mistral/Qwen, h for GPT-2...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            best = mod
            break
    if best is None:
        raise SpecError(f"method freeze: cannot find the decoder layers of {type(model).__name__}")
    return best


def _final_norm(model: Any) -> Any:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        if base is not None and hasattr(base, name):
            return getattr(base, name)
    return None


def apply_kernels(model: Any, spec: JobSpec) -> Any:
    """`model.use_liger_kernel`: Liger's Triton kernels in place of the model's RMSNorm, rotary embedding and SwiGLU
    MLP, and its fused linear + cross-entropy loss, which computes the loss in chunks without materialising the
    logits. Applied to the built model before the method (peft wraps the patched modules). Under ZeRO-3 the fused
    loss would read the LM head's weight outside the head's forward, where ZeRO-3 has not gathered it, so there
    Liger's plain cross-entropy kernel is used instead."""
    if not spec.model.use_liger_kernel:
        return model
    try:  # optional (the `gpu` extra): only GPU workers that ask for it have it
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise SpecError(f"model.use_liger_kernel: liger-kernel is not importable on this worker ({e}); install it "
                        "there with pip install 'ftdist[gpu]'") from None
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise SpecError(f"model.use_liger_kernel: Liger has no kernels for model type {model_type!r}; it supports "
                        + ", ".join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)))
    zero3 = spec.zero.stage == 3
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=zero3, fused_linear_cross_entropy=not zero3)
    return model


def apply_method(model: Any, spec: JobSpec) -> Any:
    """full: everything trains. freeze: embeddings and lower layers frozen, top N layers (+ head, final norm)
    train. lora: peft adapters on the target modules, base frozen (a new score head trains whole)."""
    if spec.method == "full":
        model.requires_grad_(True)
        return model
    if spec.method == "freeze":
        f = spec.freeze
        layers = decoder_layers(model)
        if f.train_top_layers > len(layers):
            raise SpecError(f"freeze.train_top_layers {f.train_top_layers} > the model's {len(layers)} layers")
        model.requires_grad_(False)
        for layer in list(layers)[len(layers) - f.train_top_layers:]:
            layer.requires_grad_(True)
        if f.train_final_norm and (norm := _final_norm(model)) is not None:
            norm.requires_grad_(True)
        if f.train_head and spec.has_score_head:  # the new head: train_top_layers 0 makes a linear probe
            for name in head_modules(model):
                model.get_submodule(name).requires_grad_(True)
        elif f.train_head and model.get_output_embeddings() is not None:
            # With tied embeddings this also trains the input embedding matrix (they are one tensor).
            model.get_output_embeddings().requires_grad_(True)
        return model
    lo = spec.lora
    cfg = LoraConfig(
        r=lo.rank,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=lo.target_modules,
        task_type="SEQ_CLS" if spec.has_score_head else "CAUSAL_LM",
        # A new head has nothing to adapt: it trains whole, and the adapter carries it (peft's modules_to_save).
        modules_to_save=head_modules(model) if spec.has_score_head else None,
        bias="none",
        use_dora=lo.use_dora,
        use_rslora=lo.use_rslora,
    )
    if lo.quantize:
        # peft's preparation of a 4-bit base: the layers that stay unquantised (norms, embeddings, head) in fp32 for
        # a stable backward, and the input embeddings' output requiring grad so checkpointed layers get gradients.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.model.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        keep_4bit_layout(model)
    # peft draws the adapters' starting values (lora_A) from torch's global generator, whose state depends on what
    # ran before in this process: seeded, they are the same on every rank and in every run of the job (a run and its
    # re-run from scratch, or a resumed run and its uninterrupted twin, then compare).
    torch.manual_seed(spec.optim.seed)
    try:
        model = get_peft_model(model, cfg)
    except ValueError as e:
        raise SpecError(f"lora.target_modules: {str(e).splitlines()[0]}") from None
    if spec.model.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def keep_4bit_layout(model: Any) -> None:
    """bitsandbytes speeds up 4-bit inference on CPUs with AVX512-BF16 by repacking a layer's weight in place, the
    first time it runs in eval mode without gradients, and marking its quantisation state as repacked. A model
    that trains between evaluations must keep the layout it trains with: measured here (bitsandbytes 0.50), a
    repacked layer computes the training forward with a kernel autograd does not see through (the adapters below it
    get wrong gradients; with 2 DeepSpeed workers and an eval after each step, ZeRO-2's next step failed), and
    ZeRO-3, which re-gathers the original layout into a layer marked repacked, stopped learning without an error. So
    training models never repack (GPUs never do)."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def count_params(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitioned and 4-bit params count by their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = full_shape(p).numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
