"""`objective: sft`: next-token cross-entropy on the labelled tokens (all of them, or the completion only)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ftdist.train.data import IGNORE_INDEX, Tokenize, collate
from ftdist.train.objectives.base import Objective


def next_token_sums(engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over the batch's target tokens, [loss sum, target tokens]): SFT's loss, and the reference sets'
    loss under any objective that keeps the LM head."""
    loss = engine(**batch).loss  # the mean over the batch's target tokens (transformers shifts the labels)
    n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    return loss, torch.stack([loss.detach().double() * n, n.double()])


class SFT(Objective):
    name = "sft"

    def encoder(self, tokenizer: Any) -> Callable[[Any], Any]:
        return Tokenize(tokenizer, self.spec.data)

    def collate(self, batch: list, pad_id: int) -> dict[str, torch.Tensor]:
        return collate(batch, pad_id)

    def forward(self, engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return next_token_sums(engine, batch)

    def eval_metrics_from(self, sums: list[float]) -> dict[str, float]:
        loss = sums[0] / max(sums[1], 1.0)  # token-weighted over the whole eval set
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
