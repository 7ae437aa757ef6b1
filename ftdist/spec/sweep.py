"""`sweep:` (read only by `ftdist tune`): the search space over dotted job keys, search, scheduler, budget,
retention. Pure: no torch, ray or I/O."""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from ftdist.spec.base import FrozenSpec


class SearchDim(FrozenSpec):
    """One dimension of a sweep's search space: exactly one of these. A bare list in `space` means `choice`."""

    choice: Optional[list[Any]] = None
    grid: Optional[list[Any]] = None
    """Every value, one trial each (the grid is the product of all grid dimensions)."""
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    randint: Optional[tuple[int, int]] = None
    """Integers in [low, high)."""

    @model_validator(mode="after")
    def _one(self) -> "SearchDim":
        set_ = [k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError("give exactly one of choice, grid, uniform, loguniform, randint")
        kind = set_[0]
        val = getattr(self, kind)
        if kind in ("choice", "grid") and not val:
            raise ValueError(f"{kind}: empty list")
        if kind in ("uniform", "loguniform", "randint") and not val[0] < val[1]:
            raise ValueError(f"{kind}: low must be below high")
        if kind == "loguniform" and val[0] <= 0:
            raise ValueError("loguniform: bounds must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    @property
    def values(self) -> Optional[list[Any]]:
        """The finite set of values (choice/grid), else None."""
        return self.choice if self.choice is not None else self.grid

    def corners(self) -> list[Any]:
        """Values that span the dimension, for validating the space before any trial starts."""
        if self.values is not None:
            return list(self.values)
        lo, hi = getattr(self, self.kind)
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]


class SchedulerSpec(FrozenSpec):
    type: Literal["fifo", "asha"] = "asha"
    """fifo: every trial runs to the end; asha: asynchronous successive halving (stops weak trials early)."""
    grace_period: int = Field(1, ge=1)
    """asha: optimizer steps a trial runs before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1)
    """asha: 1/reduction_factor of the trials go on at each rung."""


class SweepSpec(FrozenSpec):
    """`ftdist tune`: Ray Tune over any dotted job key; each trial is the `ftdist train` run with overrides."""

    space: dict[str, SearchDim]
    search: Literal["random", "grid", "optuna"] = "random"
    num_samples: int = Field(1, ge=1)
    """random/optuna: number of trials; grid: how many times the grid is repeated."""
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerSpec = SchedulerSpec()
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    """Cap on trials at once; the default fits as many as the cluster's CPUs/GPUs hold (never more)."""
    max_trials: Optional[int] = Field(None, ge=1)
    max_total_steps: Optional[int] = Field(None, ge=1)
    """Stop the sweep once all trials together ran this many optimizer steps."""
    time_budget_s: Optional[float] = Field(None, gt=0)
    alpha_per_rank: Optional[float] = Field(None, gt=0)
    """LoRA: set lora.alpha = alpha_per_rank x lora.rank in every trial (e.g. 2.0 keeps alpha/rank fixed)."""
    keep_best_trials: int = Field(1, ge=0)
    """Checkpoints of this many best trials are kept; the other trials' checkpoints are deleted after the sweep."""
    export_best: bool = True
    seed: Optional[int] = None
    """Seed of the random / Optuna search (the trials' own seed is optim.seed)."""

    @field_validator("space", mode="before")
    @classmethod
    def _bare_lists(cls, v: Any) -> Any:
        if isinstance(v, dict):  # `optim.lr: [1e-4, 3e-4]` is short for `optim.lr: {choice: [1e-4, 3e-4]}`
            return {k: {"choice": d} if isinstance(d, list) else d for k, d in v.items()}
        return v

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict) -> dict:
        if not v:
            raise ValueError("empty search space: give at least one dotted key, e.g. optim.lr: {loguniform: [1e-5, 1e-3]}")
        for key in v:
            if not re.match(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$", key):
                raise ValueError(f"{key!r} is not a dotted job key like optim.lr")
            if key.startswith("sweep.") or key == "name":
                raise ValueError(f"{key}: the sweep cannot search over {key.split('.')[0]}")
        return v
