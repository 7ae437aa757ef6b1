"""`objective: reward`: a reward model, a scalar head on the backbone (AutoModelForSequenceClassification with one
label) trained with the Bradley-Terry loss on preference pairs, -log sigmoid(r_chosen - r_rejected - margin), as
TRL's RewardTrainer computes it (tests/unit/test_reward_and_classification.py runs TRL on the same batch).

Rows as TRL reads them: `chosen` and `rejected` (strings or message lists), an optional `prompt` put in front of
both, an optional numeric `margin`. Strings are tokenised as one text with the tokenizer's special tokens and the
EOS text appended (TRL's layout: the score is read at the end of the whole sequence); message lists are rendered
with the chat template. The two sequences of B pairs go through the model as one batch of 2B rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ftdist.train.data import RowError, Tokenize, attention_mask, right_padded
from ftdist.train.heads import ScoreHead
from ftdist.train.objectives.base import Objective
from ftdist.train.objectives.pairs import TwoSequences, pair_metrics, pair_sums, pair_tokenize, read_pair


@dataclass
class ScoredPair(TwoSequences):
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0

    def truncated(self, max_length: int) -> "ScoredPair":
        return ScoredPair(self.chosen_ids[:max_length], self.rejected_ids[:max_length], self.margin)

    @property
    def has_target(self) -> bool:
        """Still two different sequences after truncation (cut at the same place, a long shared prompt leaves
        nothing to compare)."""
        return self.chosen_ids != self.rejected_ids


class PairScorer:
    """A preference row -> ScoredPair (whole sequences: a reward model scores the prompt with its completion)."""

    def __init__(self, tokenizer: Any, tokenize: Tokenize) -> None:
        self.tok, self.t = tokenizer, tokenize

    def __call__(self, row: Any) -> ScoredPair:
        prompt, chosen, rejected = read_pair(row, prompt_required=False)
        margin = row.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise RowError(f"field 'margin' must be a number, got {type(margin).__name__}")
        if isinstance(chosen, str):
            if not chosen or not rejected:
                raise RowError("chosen or rejected is empty")
            return ScoredPair(self._text(prompt + chosen), self._text(prompt + rejected), float(margin))
        if not getattr(self.tok, "chat_template", None):
            raise RowError("message lists need a chat template: the tokenizer has none; set data.chat_template")
        return ScoredPair(self.t.render(prompt + chosen, gen_prompt=False),
                          self.t.render(prompt + rejected, gen_prompt=False), float(margin))

    def _text(self, text: str) -> list[int]:
        eos = self.tok.eos_token
        if eos and not text.endswith(eos):
            text += eos
        return self.tok(text)["input_ids"]


def collate_scored_pairs(batch: list[ScoredPair], pad_id: int) -> dict[str, torch.Tensor]:
    """[chosen_1..chosen_B, rejected_1..rejected_B] right-padded (the head reads each row's last non-pad token)."""
    seqs = [e.chosen_ids for e in batch] + [e.rejected_ids for e in batch]
    return {"input_ids": right_padded(seqs, pad_id), "attention_mask": attention_mask(seqs),  # [2B, T]
            "margin": torch.tensor([e.margin for e in batch], dtype=torch.float32)}  # [B]


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor,
                  center_coefficient: float) -> torch.Tensor:
    """Per-pair loss [B]: -log sigmoid(r_c - r_r - margin) + c (r_c + r_r)^2 (its batch mean is TRL's loss)."""
    loss = -F.logsigmoid(chosen - rejected - margin)
    if center_coefficient:
        loss = loss + center_coefficient * (chosen + rejected) ** 2
    return loss


class Reward(Objective):
    name = "reward"
    example_type = ScoredPair

    def encoder(self, tokenizer: Any) -> Callable[[Any], Any]:
        return PairScorer(tokenizer, pair_tokenize(tokenizer, self.spec.data))

    def score_head(self, tokenizer: Any) -> ScoreHead:
        return ScoreHead(None, tokenizer.pad_token_id)

    def collate(self, batch: list, pad_id: int) -> dict[str, torch.Tensor]:
        return collate_scored_pairs(batch, pad_id)

    def forward(self, engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rewards = rewards.squeeze(-1).float()  # [2B]
        b = rewards.shape[0] // 2
        chosen, rejected = rewards[:b], rewards[b:]
        loss = bradley_terry(chosen, rejected, batch["margin"], self.spec.reward.center_rewards_coefficient)
        return loss.mean(), pair_sums(loss, chosen, rejected)

    def train_metrics_from(self, sums: list[float]) -> dict[str, float]:
        return pair_metrics(sums, "")

    def eval_metrics_from(self, sums: list[float]) -> dict[str, float]:
        return pair_metrics(sums, "eval_")
