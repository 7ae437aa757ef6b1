"""The DPO family's losses on sequence log-probabilities: pure tensor functions, checked against TRL's own
implementations (tests/unit/test_preference_loss.py runs TRL's DPOTrainer and CPOTrainer on the same numbers).

- `sigmoid`: DPO (Rafailov et al., 2023), -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))); with
  label_smoothing e > 0 the conservative DPO of Mitchell (2023): the preference is taken to be flipped with
  probability e, -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d).
- `ipo`: IPO (Azar et al., 2023), (d / tokens - 1 / (2 beta))^2, with each side's log-ratio averaged over its
  completion tokens as TRL does (confirmed with the IPO authors, per TRL).
- `simpo`: SimPO (Meng et al., 2024), reference-free: -log sigmoid(beta * (avg pi_c - avg pi_r) - gamma), with the
  same label smoothing as `sigmoid`; the log-probabilities are averaged over completion tokens.

`sft_weight` > 0 adds that weight x the chosen completions' negative log-likelihood per token over the batch (RPO,
Pang et al., 2024; TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, w]): DPO alone may lower the likelihood of
both completions, and with it what SFT taught.

Rewards (the metrics): beta x the log-ratio to the reference (DPO, IPO), beta x the average log-probability (SimPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "simpo")


@dataclass
class PairOutputs:
    """Per pair: the loss, and the rewards of the chosen and rejected completions."""

    loss: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B]
    rejected_rewards: torch.Tensor  # [B]


def completion_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the log-probabilities of the labelled tokens, their count) per sequence. logits [B, T, V] predict
    the next token (shifted here, as transformers shifts for its own loss); labels [B, T], ignore_index where no
    completion token is."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != ignore_index
    # cross_entropy gives -log p(label) per token without keeping a [B, T, V] log-softmax around
    token_logps = -F.cross_entropy(logits.transpose(1, 2), labels.masked_fill(~mask, 0), reduction="none")
    return (token_logps * mask).sum(-1), mask.sum(-1)


def preference_loss(loss_type: str, beta: float, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None,
                    chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, label_smoothing: float = 0.0,
                    simpo_gamma: float = 0.5, sft_weight: float = 0.0) -> PairOutputs:
    """The loss of each pair from summed completion log-probabilities (policy and, but for SimPO, reference)."""
    out = _pair_loss(loss_type, beta, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                     chosen_tokens, rejected_tokens, label_smoothing, simpo_gamma)
    if sft_weight:  # a batch-level term, spread evenly over the pairs so that their mean is the total
        nll = -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)
        out.loss = out.loss + sft_weight * nll
    return out


def _pair_loss(loss_type: str, beta: float, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None,
               chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, label_smoothing: float,
               simpo_gamma: float) -> PairOutputs:
    if loss_type == "simpo":
        chosen = chosen_logps / chosen_tokens.clamp(min=1)
        rejected = rejected_logps / rejected_tokens.clamp(min=1)
        logits = beta * (chosen - rejected) - simpo_gamma
        return PairOutputs(_smoothed_sigmoid(logits, label_smoothing), beta * chosen.detach(),
                           beta * rejected.detach())
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type {loss_type} needs reference log-probabilities")
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        loss = _smoothed_sigmoid(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    elif loss_type == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        loss = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} (one of {', '.join(LOSS_TYPES)})")
    return PairOutputs(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss
