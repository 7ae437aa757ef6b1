"""`parallel.sequence: N`: Ulysses sequence parallelism (DeepSpeed's `UlyssesSPAttentionHF`, part of its Arctic Long
Sequence Training) for `objective: sft`.

Ranks [g*N, (g+1)*N) (consecutive: DeepSpeed's groups) form sequence-parallel group g. They read the same micro batch
(the loader's data-parallel rank is rank // N) and each keeps 1/N of every sequence's positions. Around each
attention call DeepSpeed all-to-alls heads for positions, so attention sees the whole sequence with 1/N of the heads,
while embeddings, MLPs, the LM head and its logits hold 1/N of the positions: activation memory per worker / N.

What ftdist adds around DeepSpeed's attention:
- the batch: padded to a multiple of N (pad tokens carry no loss and come after every real token, so causal
  attention never reads them), labels shifted before the split (a shard's last position predicts the next shard's
  first token), position ids made explicit (after the all-to-all they give the global positions causal masking
  needs), and each rank's slice taken;
- the loss: each rank's target-token loss sum over the group's target tokens, so the N ranks' losses add up to the
  micro batch's mean loss and their gradients to its gradient. DeepSpeed sums gradients over all ranks and divides by
  the data-parallel size (world / N) under ZeRO 0-2, so the update equals the one without sequence parallelism (the
  integration test compares losses and gradient norms step by step). ZeRO-3's reduce-scatter (DeepSpeed 0.19's
  `reduce_scatter_coalesced`, which ftdist's `reduce_scatter: true` selects) divides by the whole world instead: its
  gradients would be 1/N of the true ones (measured: the norm halves at N=2; Adam hides the scale, gradient clipping
  does not), so under ZeRO-3 the loss is scaled by N for the backward pass;
- evaluation and generation: DeepSpeed's wrapper replaces the attention function process-wide and drops attention
  masks (a left-padded generation batch would attend to its padding); ftdist routes a module in eval mode to the
  original function with its mask, so eval batches run whole on each rank, as without sequence parallelism.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ftdist.errors import SpecError
from ftdist.spec import JobSpec
from ftdist.train.data import IGNORE_INDEX


class SequenceParallel:
    """One rank's part of its sequence-parallel group: how a collated micro batch becomes this rank's slice, and the
    loss of that slice."""

    def __init__(self, size: int, index: int, group: Any, pad_id: int, zero_stage: int) -> None:
        self.size = size
        self.index = index  # this rank's slice of each sequence
        self.group = group
        self.pad_id = pad_id
        self.loss_scale = float(size if zero_stage == 3 else 1)  # (the ZeRO-3 reduce-scatter's 1/world: above)
        self.micro_share = self.loss_scale / size
        """What one rank's micro step counts for in the logged loss, so that the group's N (scaled) partial losses
        log as one mean."""

    @classmethod
    def attach(cls, model: Any, spec: JobSpec, pad_id: int) -> tuple["SequenceParallel", Any]:
        """Put DeepSpeed's Ulysses attention into the model's attention implementation (train mode only) and make
        the process groups; returns this rank's SequenceParallel and the mpu for deepspeed.initialize."""
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        impl = spec.model.attn_implementation
        whole = ALL_ATTENTION_FUNCTIONS[impl]
        try:
            mpu = UlyssesSPAttentionHF.register_with_transformers(
                model, core_attn_implementation=impl, sequence_parallel_size=spec.parallel.sequence,
                micro_batch_size=spec.optim.micro_batch_size, seq_length_is_variable=True)
        except ValueError as e:  # heads that do not divide (a model named by path, read only now)
            raise SpecError(f"parallel.sequence: {e}") from None
        split = ALL_ATTENTION_FUNCTIONS[impl]

        def attention(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            return (split if module.training else whole)(module, *args, **kwargs)

        ALL_ATTENTION_FUNCTIONS[impl] = attention
        group = mpu.get_sequence_parallel_group()
        return cls(spec.parallel.sequence, dist.get_rank(group), group, pad_id, spec.zero.stage), mpu

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A collated micro batch (whole sequences, the same on every rank of the group) -> this rank's slice:
        input_ids, position_ids, shift_labels, and what counts its tokens (attention_mask, or a packed batch's
        token_count on the group's first rank)."""
        ids = batch["input_ids"]
        rows, width = ids.shape
        pad = -width % self.size
        positions = batch.get("position_ids")
        if positions is None:
            positions = torch.arange(width, device=ids.device).expand(rows, width)
        shifted = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], IGNORE_INDEX)], dim=1)
        if pad:
            ids = F.pad(ids, (0, pad), value=self.pad_id)
            positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, pad + 1, device=ids.device)], dim=1)
            shifted = F.pad(shifted, (0, pad), value=IGNORE_INDEX)
        part = (width + pad) // self.size
        cut = slice(self.index * part, (self.index + 1) * part)
        out = {"input_ids": ids[:, cut], "position_ids": positions[:, cut], "shift_labels": shifted[:, cut]}
        out = {k: v.contiguous() for k, v in out.items()}
        if "attention_mask" in batch:
            out["attention_mask"] = F.pad(batch["attention_mask"], (0, pad))[:, cut]
        if "token_count" in batch:
            out["token_count"] = batch["token_count"] * (self.index == 0)
        return out

    def forward(self, engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's share of the micro batch's mean loss x loss_scale, [loss sum, target tokens] of its slice):
        SFT's sums. The model's own loss function computes it (transformers' `shift_labels` and
        `num_items_in_batch`: a sum over this slice divided by the given count), so Liger's fused loss, where it is
        on, still never materialises the logits."""
        labels = batch["shift_labels"]
        targets = (labels != IGNORE_INDEX).sum().double()
        group_targets = targets.clone()
        dist.all_reduce(group_targets, group=self.group)
        per = group_targets.clamp(min=1.0) / self.loss_scale
        loss = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=labels,
                      shift_labels=labels, num_items_in_batch=per, use_cache=False).loss
        return loss, torch.stack([loss.detach().double() * per, targets])
