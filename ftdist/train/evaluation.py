"""What an evaluation measures, inside the workers: the objective's held-out metrics on the task's eval set, and the
next-token loss on each reference set (data from the upstream distribution: `eval_ref_<name>_loss`, the forgetting
measure). Every rank scores its shard; the sums all-reduce, so every rank returns the same numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ftdist.spec import JobSpec
from ftdist.train.data import DataStats, Example, Tokenize, collate, eval_batches, read_rows, tokenize_rows
from ftdist.train.objectives.base import Objective
from ftdist.train.objectives.sft import next_token_sums


@dataclass
class ReferenceSet:
    name: str
    metric: str
    """eval_ref_<name>_loss"""
    examples: list[Example]


def load_references(spec: JobSpec, tokenizer: Any) -> list[ReferenceSet]:
    """Each eval.reference set tokenised as plain text (the whole text is the target, truncated to data.max_length;
    bad rows follow data.on_bad_row and name their file:line)."""
    out = []
    for ref in spec.eval.reference:
        data = spec.data.model_copy(update={"train": ref.path, "eval": None, "format": "text",
                                            "text_field": ref.text_field, "completion_only_loss": False,
                                            "packing": False})
        examples = tokenize_rows(read_rows(ref.path), Tokenize(tokenizer, data), data, DataStats())
        out.append(ReferenceSet(ref.label, ref.metric, examples))
    return out


class Evaluator:
    """One evaluation = the task's eval set through the objective + every reference set through the LM head."""

    def __init__(self, spec: JobSpec, objective: Objective, eval_examples: list, references: list[ReferenceSet],
                 rank: int, world: int, to_device: Callable[[list], dict], pad_id: int) -> None:
        self.spec, self.objective, self.eval_examples, self.references = spec, objective, eval_examples, references
        self.rank, self.world, self.to_device, self.pad_id = rank, world, to_device, pad_id

    @property
    def enabled(self) -> bool:
        return bool(self.eval_examples or self.references)

    def _sums(self, examples: list, forward: Callable[[list], torch.Tensor]) -> torch.Tensor:
        total: Optional[torch.Tensor] = None
        for batch in eval_batches(examples, self.spec.optim.micro_batch_size, self.rank, self.world,
                                  self.spec.eval.max_batches):
            weight = 1.0
            if not batch:  # keep ZeRO-3 collectives in step on ranks with a short shard
                batch, weight = examples[:1], 0.0
            sums = forward(batch) * weight
            total = sums if total is None else total + sums
        dist.all_reduce(total)
        return total

    def _lm_sums(self, engine: Any, batch: list) -> torch.Tensor:
        """[loss sum, target tokens] of plain next-token prediction, whatever the job's objective."""
        b = {k: v.to(engine.device) for k, v in collate(batch, self.pad_id).items()}
        return next_token_sums(engine, b)[1]

    def __call__(self, engine: Any) -> dict[str, float]:
        engine.eval()
        metrics: dict[str, float] = {}
        with torch.no_grad():
            if self.eval_examples:
                sums = self._sums(self.eval_examples, lambda b: self.objective.forward(engine, self.to_device(b))[1])
                metrics.update(self.objective.eval_metrics_from(sums.tolist()))
            for ref in self.references:
                loss_sum, tokens = self._sums(ref.examples, lambda b: self._lm_sums(engine, b)).tolist()
                metrics[ref.metric] = loss_sum / max(tokens, 1.0)  # token-weighted over the whole set
        engine.train()
        return metrics
