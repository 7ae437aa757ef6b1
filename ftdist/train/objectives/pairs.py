"""What the two preference objectives (dpo, reward) share: reading a preference row, and the metrics of a batch of
scored pairs (both report the same names, from the same sums)."""

from __future__ import annotations

from typing import Any

import torch

from ftdist.spec import DataSpec
from ftdist.train.data import RowError, Tokenize, json_object

PAIR_FIELDS = ("prompt", "chosen", "rejected")


class TwoSequences:
    """An example that feeds the model a chosen and a rejected sequence in one batch."""

    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def longest(self) -> int:
        """max_length applies to each sequence."""
        return max(len(self.chosen_ids), len(self.rejected_ids))


def read_pair(row: Any, prompt_required: bool) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a row: all strings, or all message lists (TRL's conversational form). Without a
    `prompt` field (when allowed: TRL's implicit prompt) the prompt is empty, of the completions' kind."""
    row = json_object(row)
    needed = PAIR_FIELDS if prompt_required else PAIR_FIELDS[1:]
    for name in needed:
        if name not in row:
            raise RowError(f"missing field {name!r} (preference rows have {', '.join(needed)}"
                           + ("" if prompt_required else " and optionally prompt") + ")")
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = row.get("prompt", "" if isinstance(chosen, str) else [])
    if chosen == rejected:
        raise RowError("chosen and rejected are identical (the pair prefers nothing)")
    if not (all(isinstance(v, str) for v in (prompt, chosen, rejected))
            or all(isinstance(v, list) for v in (prompt, chosen, rejected))):
        raise RowError(f"{'prompt, ' if 'prompt' in row else ''}chosen and rejected must all be strings, or all "
                       "message lists")
    return prompt, chosen, rejected


def pair_tokenize(tokenizer: Any, data: DataSpec) -> Tokenize:
    """The tokenizer wrapper the pair objectives render with: message-list rows use data.chat_template whatever
    data.format says (format is SFT's knob; a preference row's form is read from the row)."""
    if data.chat_template:
        data = data.model_copy(update={"format": "chat"})
    return Tokenize(tokenizer, data)


def pair_sums(loss: Any, chosen_rewards: Any, rejected_rewards: Any) -> Any:
    """The additive metric sums of a batch of pairs [loss, pairs, chosen rewards, rejected rewards, right] (float64;
    all-reduced by addition over ranks and batches)."""
    b = chosen_rewards.shape[0]
    return torch.stack([loss.detach().sum().float(), torch.tensor(float(b), device=loss.device),
                        chosen_rewards.detach().float().sum(), rejected_rewards.detach().float().sum(),
                        (chosen_rewards > rejected_rewards).sum().float()]).double()


def pair_metrics(sums: list[float], prefix: str) -> dict[str, float]:
    loss, pairs, chosen, rejected, right = sums
    pairs = max(pairs, 1.0)
    out = {"rewards_chosen": chosen / pairs, "rewards_rejected": rejected / pairs,
           "reward_margin": (chosen - rejected) / pairs, "preference_accuracy": right / pairs}
    return ({"eval_loss": loss / pairs} if prefix else {}) | {prefix + k: v for k, v in out.items()}
