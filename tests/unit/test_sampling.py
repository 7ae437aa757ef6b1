"""The sample order (train/sampling.py): weighted mixtures realise their weights within 1/BLOCK over whole blocks, a
resume at any step continues the exact sequence, every rank's slots of a step are distinct samples, a source of
weight 0 is never read, a small source repeats through fresh permutations."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ftdist.errors import SpecError
from ftdist.train.sampling import BLOCK, SampleOrder, ShardedLoader, Shuffle


def _sources(*sizes: int) -> list[list[tuple[int, int]]]:
    return [[(s, i) for i in range(n)] for s, n in enumerate(sizes)]


def _loader(sources, weights, rank=0, world=2, micro=4, accum=2, seed=11):
    return ShardedLoader(sources, micro_batch=micro, grad_accum=accum, rank=rank, world=world, seed=seed,
                         shuffle=True, weights=weights, names=[f"s{i}" for i in range(len(sources))])


def test_realised_shares_are_within_one_over_block_of_the_weights():
    weights = [0.7, 0.2, 0.1]
    order = SampleOrder([5000, 300, 40], weights, seed=3, shuffle=True)
    for blocks in (1, 7, 50):
        counts = order.counts_before(blocks * BLOCK)
        shares = counts / counts.sum()
        assert np.all(np.abs(shares - weights) < 1 / BLOCK), (blocks, shares)
    # and what the samples say matches the counts
    taken = Counter(s for s, _ in order.samples(0, 7 * BLOCK))
    assert [taken[s] for s in range(3)] == order.counts_before(7 * BLOCK).tolist()


def test_uneven_weights_realise_without_drift():
    weights = [1.0, 1.0, 1.0]  # thirds: 1024 / 3 has a remainder every block
    order = SampleOrder([100, 100, 100], weights, seed=0, shuffle=True)
    counts = order.counts_before(300 * BLOCK)
    assert np.all(np.abs(counts / counts.sum() - 1 / 3) < 1 / (300 * BLOCK) * 300)  # < 1/BLOCK
    assert counts.max() - counts.min() <= 300  # within one sample per block, not drifting one way


def test_a_resume_at_any_step_continues_the_exact_sequence():
    sources = _sources(50, 13, 200)
    weights = [0.5, 0.25, 0.25]
    for rank in (0, 1):
        full = _loader(sources, weights, rank=rank).micro_batches(0)
        stream = [next(full) for _ in range(2 * 40)]  # 40 steps of 2 micro batches
        for step in (1, 17, 39):
            resumed = _loader(sources, weights, rank=rank).micro_batches(step)  # a fresh process, as on resume
            assert [next(resumed) for _ in range(2)] == stream[2 * step:2 * step + 2]


def test_the_ranks_of_a_step_take_distinct_samples_and_weight_zero_is_never_read():
    sources = _sources(400, 400, 400)
    weights = [3.0, 1.0, 0.0]
    loaders = [_loader(sources, weights, rank=r, world=3) for r in range(3)]
    its = [ld.micro_batches(0) for ld in loaders]
    seen = Counter()
    for _ in range(30):  # 15 steps
        step = [x for it in its for _ in range(1) for x in next(it)]
        seen.update(s for s, _ in step)
    assert seen[2] == 0 and abs(seen[0] / (seen[0] + seen[1]) - 0.75) < 0.05
    # within one pass over a source no example repeats: every rank's slots are distinct global samples
    first = [x for it in [ld.micro_batches(0) for ld in loaders] for x in next(it)]
    assert len(set(first)) == len(first)
    assert loaders[0].steps_per_epoch == 800 // 24  # an epoch: the examples of the sources with weight


def test_a_small_source_repeats_through_new_permutations():
    order = SampleOrder([10, 1000], [0.5, 0.5], seed=1, shuffle=True)
    small = [i for s, i in order.samples(0, 200) if s == 0]
    passes = [small[k:k + 10] for k in range(0, 90, 10)]
    assert all(sorted(p) == list(range(10)) for p in passes)  # each pass is a permutation
    assert len({tuple(p) for p in passes}) > 1


def test_shares_report_the_samples_taken():
    ld = _loader(_sources(100, 100), [0.8, 0.2])
    shares = ld.shares(3 * BLOCK // ld.global_batch)  # three whole blocks
    assert set(shares) == {"s0", "s1"} and abs(shares["s0"] - 0.8) < 1 / BLOCK
    assert abs(ld.shares(7)["s0"] - 0.8) < 0.1  # part of a block: the block's order is shuffled


def test_too_few_examples_and_an_empty_source():
    with pytest.raises(SpecError, match="fewer than one global batch"):
        _loader(_sources(3, 4), [1, 1])
    with pytest.raises(SpecError, match="source s1 has no usable examples"):
        _loader(_sources(100, 0), [1, 1])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_shuffle_is_a_permutation_computed_per_index(n):
    out = [Shuffle(n, [5, 0, 1])(i) for i in range(n)]
    assert sorted(out) == list(range(n))
    if n >= 64:
        assert out != list(range(n)) and out != [Shuffle(n, [6, 0, 1])(i) for i in range(n)]
        # a shuffle, not a shift: neighbours land far apart on average
        assert np.mean(np.abs(np.diff(out))) > n / 5


@pytest.mark.parametrize("before, after", [(2, 3), (2, 1), (3, 2)])
def test_a_resize_continues_the_global_sample_sequence(before, after):
    """N workers to step s, then M workers from s: the samples of each step (all ranks together, in rank-slot order)
    are those one uninterrupted run takes at that step, at any world size; the global batch is held (24), so
    gradient accumulation is re-derived (N=2: 3, N=3: 2, N=1: 6)."""
    sources = _sources(3000, 900)  # (no pass over a source ends within these 12 steps)
    weights = [2.0, 1.0]

    def global_steps(world: int, start: int, steps: int) -> list[set]:
        accum = 24 // (4 * world)
        its = [_loader(sources, weights, rank=r, world=world, accum=accum).micro_batches(start) for r in range(world)]
        return [{x for it in its for _ in range(accum) for x in next(it)} for _ in range(steps)]

    reference = global_steps(2, 0, 12)
    resized = global_steps(before, 0, 5) + global_steps(after, 5, 7)
    assert resized == reference
    assert all(len(s) == 24 for s in resized)  # no sample twice within a step


def test_a_world_that_does_not_divide_the_global_batch_pads_with_zero_weight_micro_batches():
    """16 samples in micro batches of 4 over 3 ranks: 2 rounds, 6 slots, 2 of them padding; the real slots are
    exactly the global batch the job has at any size, each counting 6/4 (DeepSpeed averages over all 6)."""
    sources = _sources(200)
    for step in (0, 5):
        real, padding = [], 0
        for rank in range(3):
            loader = ShardedLoader(sources, micro_batch=4, grad_accum=2, rank=rank, world=3, seed=11, shuffle=True,
                                   global_batch=16)
            it = loader.micro_batches(step)
            for m in range(2):
                batch = next(it)
                if loader.is_padding(m):
                    padding += 1
                else:
                    real += batch
            assert loader.real_weight == 1.5
        whole = ShardedLoader(sources, micro_batch=4, grad_accum=4, rank=0, world=1, seed=11, shuffle=True)
        it = whole.micro_batches(step)
        assert sorted(real) == sorted(s for _ in range(4) for s in next(it)), step
        assert padding == 2
