"""The objective axis: one module per objective, one table from the job's `objective:` to it."""

from __future__ import annotations

from typing import Any, Optional

from ftdist.spec import JobSpec
from ftdist.train.data import Splits, build_splits
from ftdist.train.objectives.base import Objective
from ftdist.train.objectives.classification import Classification
from ftdist.train.objectives.dpo import DPO
from ftdist.train.objectives.reward import Reward
from ftdist.train.objectives.sft import SFT

OBJECTIVES: dict[str, type[Objective]] = {"sft": SFT, "dpo": DPO, "reward": Reward, "classification": Classification}


def objective_for(spec: JobSpec) -> Objective:
    return OBJECTIVES[spec.objective](spec)


def splits_for(spec: JobSpec, tokenizer: Any, objective: Optional[Objective] = None, show: bool = False) -> Splits:
    """The job's train and eval examples as its objective reads rows (the driver's check, every worker, the bench).
    `show`: progress lines for a long tokenisation."""
    objective = objective or objective_for(spec)
    return build_splits(spec.data, tokenizer, spec.optim.seed, objective.encoder(tokenizer), show)
