"""`objective: sft`: next-token cross-entropy on the labelled tokens (all of them, or the completion only)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ftdist.train.data import IGNORE_INDEX, Example, PackedExample, Tokenize, collate, collate_packed
from ftdist.train.objectives.base import Objective


def next_token_sums(engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over the batch's target tokens, [loss sum, target tokens]): SFT's loss, and the reference sets'
    loss under any objective that keeps the LM head. No KV cache: training never reads it, and packed batches need
    its absence (packing.py)."""
    inputs = {k: v for k, v in batch.items() if k != "token_count"}
    loss = engine(**inputs, use_cache=False).loss  # the mean over the target tokens (transformers shifts the labels)
    n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    return loss, torch.stack([loss.detach().double() * n, n.double()])


class SFT(Objective):
    name = "sft"

    def encoder(self, tokenizer: Any) -> Callable[[Any], Any]:
        return Tokenize(tokenizer, self.spec.data)

    @property
    def example_type(self) -> type:
        return PackedExample if self.spec.data.packing else Example

    def collate(self, batch: list, pad_id: int) -> dict[str, torch.Tensor]:
        return collate_packed(batch, pad_id) if self.spec.data.packing else collate(batch, pad_id)

    def tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["token_count"] if "token_count" in batch else super().tokens(batch)

    def forward(self, engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return next_token_sums(engine, batch)

    def eval_metrics_from(self, sums: list[float]) -> dict[str, float]:
        loss = sums[0] / max(sums[1], 1.0)  # token-weighted over the whole eval set
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
