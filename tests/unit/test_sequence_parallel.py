"""How a sequence-parallel group's ranks cut a micro batch (train/sequence_parallel.py) and which samples they read:
the slices put back together are the whole batch, padded to a multiple of the group, labels shifted before the cut."""

from __future__ import annotations

import torch

from ftdist.spec import spec_from_dict
from ftdist.train.data import IGNORE_INDEX, PackedExample, collate_packed
from ftdist.train.sampling import ShardedLoader
from ftdist.train.sequence_parallel import SequenceParallel
from tests.conftest import tiny_job_dict

PAD = 0


def _slices(batch: dict, size: int) -> list[dict]:
    return [SequenceParallel(size, i, None, PAD, zero_stage=2).shard(batch) for i in range(size)]


def test_slices_put_together_are_the_padded_batch_with_labels_shifted_before_the_cut():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, PAD, PAD, PAD]])  # width 7: padded to 9 for 3
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9, 10, 11], [12, 13, 14, 15] + [IGNORE_INDEX] * 3])
    mask = (ids != PAD).long()
    parts = _slices({"input_ids": ids, "labels": labels, "attention_mask": mask}, 3)
    assert [p["input_ids"].shape for p in parts] == [torch.Size([2, 3])] * 3
    joined = {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}
    assert joined["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, PAD, PAD], [12, 13, 14, 15] + [PAD] * 5]
    # position t predicts token t+1, also across a cut (rank 0's last position predicts rank 1's first token)
    assert joined["shift_labels"].tolist() == [[IGNORE_INDEX, 7, 8, 9, 10, 11] + [IGNORE_INDEX] * 3,
                                               [13, 14, 15] + [IGNORE_INDEX] * 6]
    assert joined["position_ids"].tolist() == [list(range(9))] * 2
    assert sum(int(p["attention_mask"].sum()) for p in parts) == int(mask.sum())  # tokens counted once


def test_a_packed_batch_keeps_its_document_positions_and_counts_tokens_once():
    batch = collate_packed([PackedExample(input_ids=[1, 2, 3, 4, 5], labels=[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5],
                                          position_ids=[0, 1, 2, 0, 1])], PAD)
    parts = _slices(batch, 2)
    assert torch.cat([p["position_ids"] for p in parts], dim=1).tolist() == [[0, 1, 2, 0, 1, 2]]
    assert sum(int(p["token_count"]) for p in parts) == 5


def test_a_group_reads_one_data_parallel_rank_s_batches():
    spec = spec_from_dict(tiny_job_dict("x", parallel={"sequence": 2}, resources={"num_workers": 4},
                                        optim={**tiny_job_dict("x")["optim"], "global_batch_size": 32}))
    data = [list(range(64))]
    first = [next(ShardedLoader.for_job(spec, data, rank, 4).micro_batches(0)) for rank in range(4)]
    assert first[0] == first[1] and first[2] == first[3] and first[0] != first[2]
    assert sorted(first[0] + first[2]) == sorted(set(first[0] + first[2]))  # two groups, different samples
