"""The new head that the reward and classification objectives put on a pretrained backbone
(AutoModelForSequenceClassification): its size and labels, which modules it is (what `freeze` trains and LoRA saves
whole), and how the parameters the checkpoint lacks start.

New parameters start from a generator seeded by the job's seed and the parameter's name, not from the process's
random state: every rank, every ZeRO stage (the partitioned ZeRO-3 loader fills its slice of the same tensor) and
every re-run of the job begin from the same head. Linear weights are drawn as every Hugging Face architecture draws
them, N(0, initializer_range); biases start at zero, norm weights at one."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class ScoreHead:
    """A sequence-level head: one score (reward) or one logit per label (classification)."""

    labels: Optional[tuple[str, ...]]
    """Label names in id order; None for a reward head (one unnamed output)."""
    pad_token_id: int
    """The model finds each row's last token by it (decoder backbones pool the last non-padding token)."""

    def config_kwargs(self) -> dict[str, Any]:
        if self.labels is None:
            return {"num_labels": 1, "pad_token_id": self.pad_token_id}
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {name: i for i, name in enumerate(self.labels)}, "pad_token_id": self.pad_token_id}


def head_modules(model: Any) -> list[str]:
    """Names of the top-level modules outside the backbone that hold parameters: `score` (Llama, Qwen, GPT-2...),
    `classifier` (BERT, RoBERTa), `pre_classifier` + `classifier` (DistilBERT)."""
    backbone = getattr(model, "base_model_prefix", "model")
    return [name for name, module in model.named_children()
            if name != backbone and any(True for _ in module.parameters())]


def stored_name(name: str, stored: Any, backbone: Optional[str]) -> Optional[str]:
    """The checkpoint's name of a parameter: the same, or without the backbone's prefix (a bare `BertModel`
    checkpoint such as sentence-transformers' MiniLM stores `encoder.layer.0...` for `bert.encoder.layer.0...`);
    None if it has neither."""
    if name in stored:
        return name
    bare = name[len(backbone) + 1:] if backbone and name.startswith(backbone + ".") else None
    return bare if bare is not None and bare in stored else None


def new_value(name: str, shape: torch.Size, std: float, seed: int) -> torch.Tensor:
    """The starting value of a parameter the checkpoint lacks (fp32, whole)."""
    if len(shape) >= 2:
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.empty(shape).normal_(0.0, std, generator=g)
    return (torch.zeros if name.endswith("bias") else torch.ones)(shape)


def initializer_range(model: Any) -> float:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return float(getattr(config, "initializer_range", 0.02))


def init_new(model: Any, names: set[str], seed: int) -> None:
    """Set the named (whole, not partitioned) parameters to their seeded starting values."""
    std = initializer_range(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in names:
                p.copy_(new_value(name, p.shape, std, seed).to(p.dtype))


@dataclass(frozen=True)
class HeadLayout:
    """Where a saved model's backbone and new head are, read from its config alone (for the export)."""

    backbone: Optional[str] = None
    """The backbone's attribute name (`model`, `bert`): a base checkpoint may store its tensors without it."""
    head: tuple[str, ...] = ()
    """The head's top-level modules: a base model has no such tensors (WiSE-FT keeps the fine-tuned ones)."""
    tied: tuple[tuple[str, str], ...] = ()
    """(output embedding weight, input embedding weight) when the config ties them: a base checkpoint stores the
    pair once, under the input embedding's name."""

    @classmethod
    def of(cls, hf_dir: str, config: dict) -> "HeadLayout":
        """The layout of the model whose config.json (`config`, read) is in `hf_dir`, from the model built on the
        meta device (no memory, no weights): a sequence classifier's backbone and new head; a causal LM's tied
        embeddings."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        classifier = any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or ())
        cfg = AutoConfig.from_pretrained(hf_dir)
        with torch.device("meta"):
            model = (AutoModelForSequenceClassification if classifier else AutoModelForCausalLM).from_config(cfg)
        tied: tuple = ()
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if getattr(text_cfg, "tie_word_embeddings", False) and out_emb is not None and in_emb is not None:
            names = {id(m): n for n, m in model.named_modules()}
            tied = ((f"{names[id(out_emb)]}.weight", f"{names[id(in_emb)]}.weight"),)
        if not classifier:
            return cls(tied=tied)
        return cls(getattr(model, "base_model_prefix", "model"), tuple(head_modules(model)), tied)

    def in_head(self, name: str) -> bool:
        return name.split(".", 1)[0] in self.head
