"""A decoder-only transformer's shape from its Hugging Face `config.json`: parameter counts (all, trainable under a
method), and training FLOPs per token. Pure arithmetic on the config dict: no torch, no weights.

Covers the Llama family's layout (Llama, Mistral, Qwen2/3, Gemma, ...): attention with grouped KV heads (q, k, v, o),
a gated MLP (gate, up, down), two norms per layer, a final norm, embeddings and an LM head (tied or not). Optional
biases (`attention_bias`, Qwen2's q/k/v biases, `mlp_bias`) are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "mpnet",
            "modernbert")
"""Encoder families the Llama-layout arithmetic would get wrong; the planner refuses them in one line."""
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of one decoder layer (peft's "all-linear" targets these; the LM head is excluded)."""


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    attn_bias: str = ""
    """Which attention linears carry a bias: "" none, "qkv" (Qwen2), "qkvo" (Llama's attention_bias)."""
    mlp_bias: bool = False
    qk_norm: bool = False
    """Qwen3's per-head RMSNorm on queries and keys (head_dim weights each)."""
    score_outputs: int = 0
    """A sequence-level head in place of the LM head (reward: 1 output, classification: one per label); 0: an LM."""

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ModelShape":
        """From a config dict; KeyError names a missing setting. Text sub-configs (`text_config`) are followed."""
        cfg = cfg.get("text_config") or cfg
        model_type = cfg.get("model_type")
        if model_type in ENCODERS:  # parses as a Llama shape, but is not one (two-matrix MLP, biases, LayerNorms)
            raise ValueError(f"model_type {model_type} (an encoder)")
        h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        attn_bias = "qkv" if model_type in ("qwen2", "qwen2_moe") else ("qkvo" if cfg.get("attention_bias") else "")
        return cls(hidden=h, layers=int(cfg["num_hidden_layers"]), heads=heads,
                   kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or h // heads), intermediate=int(cfg["intermediate_size"]),
                   vocab=int(cfg["vocab_size"]), tied=bool(cfg.get("tie_word_embeddings", False)),
                   attn_bias=attn_bias, mlp_bias=bool(cfg.get("mlp_bias")),
                   qk_norm=model_type in ("qwen3", "qwen3_moe"))

    # -- parameters -----------------------------------------------------------------------------------------------

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear in one layer."""
        h, q, kv, ff = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, ff), "up_proj": (h, ff), "down_proj": (ff, h)}

    def layer_matmul_params(self) -> int:
        """Weights of one decoder layer's matmuls."""
        return sum(i * o for i, o in self.linear_shapes().values())

    def layer_params(self) -> int:
        """One decoder layer: matmul weights, biases, norms."""
        shapes = self.linear_shapes()
        biased = [f"{c}_proj" for c in self.attn_bias] + (["gate_proj", "up_proj", "down_proj"] if self.mlp_bias else [])
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return self.layer_matmul_params() + sum(shapes[n][1] for n in biased) + norms

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def outputs(self) -> int:
        """Width of the head every position goes through: the vocabulary, or the score head's outputs."""
        return self.score_outputs or self.vocab

    def head_params(self) -> int:
        """The head's own weights (an LM head tied to the embeddings has none)."""
        if self.score_outputs:
            return self.score_outputs * self.hidden
        return 0 if self.tied else self.vocab * self.hidden

    def params(self) -> int:
        """Every parameter (what `sum(p.numel() for p in model.parameters())` counts)."""
        return self.layers * self.layer_params() + self.embedding_params() + self.head_params() + self.hidden

    def lora_params(self, rank: int, targets: Optional[list[str]] = None, dora: bool = False) -> int:
        """LoRA adapter weights: rank x (in + out) per targeted linear per layer ("all-linear": every layer linear);
        DoRA adds a magnitude per output."""
        shapes = self.linear_shapes()
        names = LINEARS if targets is None else [t for t in targets if t in shapes]
        return self.layers * sum(rank * (shapes[n][0] + shapes[n][1]) + (shapes[n][1] if dora else 0) for n in names)

    def trainable_params(self, method: str, *, lora_rank: int = 8, lora_targets: Optional[list[str]] = None,
                         dora: bool = False, top_layers: int = 2, train_head: bool = True,
                         train_final_norm: bool = True) -> int:
        if method == "lora":  # a new score head trains whole beside the adapters (peft's modules_to_save)
            return self.lora_params(lora_rank, lora_targets, dora) + (self.head_params() if self.score_outputs else 0)
        if method == "freeze":
            n = min(top_layers, self.layers) * self.layer_params()
            n += (self.head_params() or self.embedding_params()) if train_head else 0  # a tied head trains the table
            return n + (self.hidden if train_final_norm else 0)
        return self.params()

    # -- compute --------------------------------------------------------------------------------------------------

    def flops_per_token(self, seq: int) -> float:
        """Training FLOPs per token, PaLM appendix B convention: 6N for the matmuls of the N non-embedding parameters
        (the LM head counts, tied or not; the embedding lookup and norm weights do not) + 12·L·h·s for attention
        scores and values (h: the attention width, heads x head_dim)."""
        n = self.layers * self.layer_matmul_params() + self.hidden * self.outputs
        return 6 * n + 12 * self.layers * self.heads * self.head_dim * seq
