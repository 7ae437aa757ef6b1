"""What an objective is to the training loop: how a data row becomes an example, how examples become a batch, and
what one forward pass turns into a loss and metric sums. The loop (train/worker.py) never branches on the objective;
the method (full / freeze / LoRA) and the sharding (ZeRO, offload) stay orthogonal to it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Optional

import torch

from ftdist.spec import JobSpec
from ftdist.train.heads import ScoreHead


class Objective(ABC):
    """The metric names each objective reports are listed in train/contracts.py (torch-free, for validation)."""

    name: str
    example_type: type
    """The dataclass its encoder makes (what a prepared data set stores, train/token_store.py)."""
    precomputes_reference = False
    """Whether the loop runs `reference.attach_reference` before training (DPO with full or freeze)."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec

    @abstractmethod
    def encoder(self, tokenizer: Any) -> Callable[[Any], Any]:
        """row -> example (raises data.RowError naming what is wrong with the row)."""

    def data_key(self) -> dict:
        """What, beyond the data spec and the tokenizer, decides the examples its encoder makes (part of the
        prepared data's key)."""
        return {}

    def adopt(self, meta: dict) -> None:
        """Take what the prepared data recorded (`prepare_meta`) instead of reading the rows again."""

    def prepare_meta(self) -> dict:
        """What the workers need from a data preparation besides the examples (stored in its manifest)."""
        return {}

    def score_head(self, tokenizer: Any) -> Optional[ScoreHead]:
        """The new head this objective trains on the backbone; None: the causal LM as loaded (its LM head)."""
        return None

    @abstractmethod
    def collate(self, batch: list, pad_id: int) -> dict[str, torch.Tensor]:
        """Examples -> the tensors of one micro batch (on the CPU)."""

    def tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokens the batch feeds the model (throughput): every unpadded position of its rows."""
        return batch["attention_mask"].sum()

    @abstractmethod
    def forward(self, engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, metric sums: a float64 vector that all-reduces by addition)."""

    def train_metrics_from(self, sums: list[float]) -> dict[str, float]:
        """Training metrics beyond the loop's own (loss, lr, ...) from the all-reduced sums of a log window."""
        return {}

    @abstractmethod
    def eval_metrics_from(self, sums: list[float]) -> dict[str, float]:
        """Held-out metrics from the all-reduced sums of every eval batch."""
