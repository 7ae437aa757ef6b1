"""What an evaluation measures, inside the workers: the objective's held-out metrics on the task's eval set, and the
next-token loss on each reference set (data from the upstream distribution: `eval_ref_<name>_loss`, the forgetting
measure). Every rank scores its shard; the sums all-reduce, so every rank returns the same numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ftdist.spec import JobSpec
from ftdist.train.data import DataStats, Example, Tokenize, collate, eval_batches, read_rows, tokenize_rows
from ftdist.train.generation import GenerationEval
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
    """One evaluation = the task's eval set through the objective + every reference set through the LM head + (at
    step 0, the end and eval.generate.every_n_steps) greedy generation on the held-out prompts."""

    def __init__(self, spec: JobSpec, objective: Objective, eval_sets: list[tuple[str, Sequence]],
                 references: list[ReferenceSet], generation: Optional[GenerationEval], rank: int, world: int,
                 to_device: Callable[[list], dict], pad_id: int) -> None:
        """`eval_sets`: (source name, held-out examples) of each source with any; one unnamed set without a mixture."""
        self.spec, self.objective, self.references = spec, objective, references
        self.eval_sets = [(name, examples) for name, examples in eval_sets if len(examples)]
        self.generation = generation
        self.rank, self.world, self.to_device, self.pad_id = rank, world, to_device, pad_id

    @property
    def enabled(self) -> bool:
        return bool(self.eval_sets or self.references or self.generation)

    def _sums(self, examples: list, forward: Callable[[list], torch.Tensor]) -> torch.Tensor:
        total: Optional[torch.Tensor] = None
        for batch in eval_batches(examples, self.spec.optim.micro_batch_size, self.rank, self.world,
                                  self.spec.eval.max_batches):
            weight = 1.0
            if not batch:  # keep ZeRO-3 collectives in step on ranks with a short shard
                batch, weight = examples[:1], 0.0
            sums = forward(batch) * weight
            total = sums if total is None else total + sums
        if dist.is_initialized():
            dist.all_reduce(total)
        return total

    def _lm_sums(self, engine: Any, batch: list) -> torch.Tensor:
        """[loss sum, target tokens] of plain next-token prediction, whatever the job's objective."""
        b = {k: v.to(engine.device) for k, v in collate(batch, self.pad_id).items()}
        return next_token_sums(engine, b)[1]

    def __call__(self, engine: Any, step: int, last: bool) -> dict[str, float]:
        engine.eval()
        metrics: dict[str, float] = {}
        with torch.no_grad():
            total = None
            for name, examples in self.eval_sets:  # a mixture: each source's loss, and all of them together
                sums = self._sums(examples, lambda b: self.objective.forward(engine, self.to_device(b))[1])
                if name:
                    metrics[f"eval_{name}_loss"] = self.objective.eval_metrics_from(sums.tolist())["eval_loss"]
                total = sums if total is None else total + sums
            if total is not None:
                metrics.update(self.objective.eval_metrics_from(total.tolist()))
            for ref in self.references:
                loss_sum, tokens = self._sums(ref.examples, lambda b: self._lm_sums(engine, b)).tolist()
                metrics[ref.metric] = loss_sum / max(tokens, 1.0)  # token-weighted over the whole set
            if self.generation is not None and self.generation.due(step, last):
                metrics.update(self.generation(engine.module, engine.device))
        engine.train()
        return metrics


class SingleProcessEngine:
    """A plain model where the Evaluator expects a DeepSpeed engine (one process, no ZeRO): the WiSE-FT curve."""

    def __init__(self, model: Any) -> None:
        self.module = model
        self.device = next(model.parameters()).device

    def __call__(self, **batch: Any) -> Any:
        return self.module(**batch)

    def eval(self) -> None:
        self.module.eval()

    def train(self) -> None:
        pass  # the model stays in eval mode: nothing trains here


def evaluate_alone(spec: JobSpec, objective: Objective, model: Any, tokenizer: Any) -> dict[str, float]:
    """One evaluation of a model in this process, as the job's evaluations measure it: the task's data.eval through
    the objective (not for DPO, whose metrics need the reference log-probabilities of the run), every reference set,
    and eval.generate."""
    eval_examples = []
    if spec.data.eval and spec.objective != "dpo":
        stats = DataStats()
        eval_examples = tokenize_rows(read_rows(spec.data.eval), objective.encoder(tokenizer), spec.data, stats)
    generation = GenerationEval(spec, tokenizer, 0, 1) if spec.eval.generate else None
    engine = SingleProcessEngine(model)

    def to_device(batch: list) -> dict:
        return {k: v.to(engine.device) for k, v in objective.collate(batch, tokenizer.pad_token_id).items()}

    evaluator = Evaluator(spec, objective, [("", eval_examples)], load_references(spec, tokenizer), generation, 0,
                          1, to_device, tokenizer.pad_token_id)
    return evaluator(engine, 0, last=True)
