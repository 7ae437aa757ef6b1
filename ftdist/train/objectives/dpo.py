"""`objective: dpo`: preference tuning on (prompt, chosen, rejected) rows, the DPO family's losses
(objectives/preference_loss.py). Chosen and rejected go through the model in one forward pass (one batch of 2B rows:
the B chosen, then the B rejected). The reference log-probabilities come, by method:
- LoRA: the same model with its adapters disabled (peft), in a no-grad pass per batch: no second copy of the model;
- full / freeze: a pass over the data with the initial weights before training (reference.py), stored in the run
  folder and reused on resume;
- SimPO needs none."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ftdist.train.data import IGNORE_INDEX, RowError, Tokenize, attention_mask, has_target, right_padded
from ftdist.train.objectives.base import Objective
from ftdist.train.objectives.pairs import TwoSequences, pair_metrics, pair_sums, pair_tokenize, read_pair
from ftdist.train.objectives.preference_loss import completion_logps, preference_loss


@dataclass
class PairExample(TwoSequences):
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    reference: Optional[tuple[float, float]] = field(default=None, compare=False)
    """The reference model's (chosen, rejected) completion log-probabilities, once computed."""

    def truncated(self, max_length: int) -> "PairExample":
        return PairExample(self.chosen_ids[:max_length], self.chosen_labels[:max_length],
                           self.rejected_ids[:max_length], self.rejected_labels[:max_length])

    @property
    def has_target(self) -> bool:
        """Both completions keep a token after truncation (a pair with one side empty compares nothing)."""
        return has_target(self.chosen_labels) and has_target(self.rejected_labels)


class PairEncoder:
    """A preference row -> PairExample: strings (prompt + completion, the prompt masked) or TRL's conversational
    form (message lists: the prompt rendered with the generation prompt, each completion's messages after it)."""

    def __init__(self, tokenizer: Any, tokenize: Tokenize) -> None:
        self.tok, self.t = tokenizer, tokenize
        self.warm = tokenize.warm

    def __call__(self, row: Any) -> PairExample:
        prompt, chosen, rejected = read_pair(row, prompt_required=True)
        if isinstance(chosen, str):
            head = self.t.bos + self.t.encode(prompt)
            sides = [self.t.encode(c) + self.t.eos for c in (chosen, rejected)]
            if not all(len(s) > len(self.t.eos) for s in sides):
                raise RowError("chosen or rejected is empty")
            (c, r) = ([*head, *s] for s in sides)
            return PairExample(c, _masked(len(head), c), r, _masked(len(head), r))
        return self._conversation(prompt, chosen, rejected)

    def _conversation(self, prompt: list, chosen: list, rejected: list) -> PairExample:
        if not getattr(self.tok, "chat_template", None):
            raise RowError("message lists need a chat template: the tokenizer has none; set data.chat_template")
        head = self.t.render(prompt, gen_prompt=True)
        out = []
        for side in (chosen, rejected):
            ids = self.t.render(prompt + side, gen_prompt=False)
            if ids[: len(head)] != head:
                raise RowError("chat template is not prefix-stable; cannot locate the completion's tokens")
            out.append((ids, _masked(len(head), ids)))
        return PairExample(out[0][0], out[0][1], out[1][0], out[1][1])


def _masked(prompt_len: int, ids: list[int]) -> list[int]:
    return [IGNORE_INDEX] * prompt_len + ids[prompt_len:]


def collate_pairs(batch: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """[chosen_1..chosen_B, rejected_1..rejected_B], right-padded to the longest; `reference` [2B] when known."""
    seqs = [e.chosen_ids for e in batch] + [e.rejected_ids for e in batch]
    ids = right_padded(seqs, pad_id)  # [2B, T]
    labels = right_padded([e.chosen_labels for e in batch] + [e.rejected_labels for e in batch], IGNORE_INDEX,
                          ids.shape[1])  # [2B, T]
    out = {"input_ids": ids, "labels": labels, "attention_mask": attention_mask(seqs)}
    if all(e.reference is not None for e in batch):
        out["reference"] = torch.tensor([e.reference[0] for e in batch] + [e.reference[1] for e in batch],
                                        dtype=torch.float64)  # [2B]
    return out


class DPO(Objective):
    name = "dpo"
    example_type = PairExample

    @property
    def precomputes_reference(self) -> bool:
        """Full and freeze keep no second model: the reference's log-probabilities are computed once up front."""
        return self.spec.dpo.uses_reference and self.spec.method != "lora"

    def encoder(self, tokenizer: Any) -> Callable[[Any], Any]:
        return PairEncoder(tokenizer, pair_tokenize(tokenizer, self.spec.data))

    def collate(self, batch: list, pad_id: int) -> dict[str, torch.Tensor]:
        return collate_pairs(batch, pad_id)

    def logps(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Completion log-probabilities and token counts of every row of the batch [2B]."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return completion_logps(logits, batch["labels"])

    def forward(self, engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.spec.dpo
        logps, tokens = self.logps(engine, batch)
        reference = None
        if d.uses_reference:
            reference = batch.get("reference")
            if reference is None:  # LoRA: the base model is the model with its adapters switched off
                with torch.no_grad(), engine.module.disable_adapter():
                    reference = self.logps(engine.module, batch)[0]
            reference = reference.to(logps.dtype)
        b = logps.shape[0] // 2
        out = preference_loss(d.loss_type, d.beta, logps[:b], logps[b:], None if reference is None else reference[:b],
                              None if reference is None else reference[b:], tokens[:b], tokens[b:],
                              label_smoothing=d.label_smoothing, simpo_gamma=d.simpo_gamma,
                              sft_weight=d.sft_weight)
        return out.loss.mean(), pair_sums(out.loss, out.chosen_rewards, out.rejected_rewards)

    def train_metrics_from(self, sums: list[float]) -> dict[str, float]:
        return pair_metrics(sums, "")

    def eval_metrics_from(self, sums: list[float]) -> dict[str, float]:
        return pair_metrics(sums, "eval_")
