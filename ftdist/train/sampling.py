"""The order of training samples: one sequence of global sample numbers g = 0, 1, 2, ..., each naming (source,
example), a pure function of the seed. Optimizer step s takes samples [s * G, (s + 1) * G) for the global batch G;
rank r of w takes micro batch m's slot (m * w + r) of it. So a resume at any step continues the exact sequence of an
uninterrupted run, and the position in the data is one number, whatever the number of workers.

Sources are interleaved by weight in blocks of BLOCK samples: each block gives source s floor(BLOCK * w_s) samples and
shares the remaining few by systematic sampling on the fractional parts (one seeded draw per block), in a seeded
order within the block. So the realised share of a source differs from its weight by less than 1 / BLOCK over any
whole number of blocks, with no drift (the rounding is unbiased), and the counts before any g are cheap to compute.
Within a source, samples go through a seeded permutation of its examples (one per pass over it, "source epoch"),
then the next; a small source is repeated that way as often as its weight asks. The permutation is computed per
index (Shuffle), not stored: a rank's memory does not grow with the number of examples.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ftdist.errors import SpecError
from ftdist.spec import JobSpec

BLOCK = 1024
_MASK64 = (1 << 64) - 1


class Shuffle:
    """A seeded permutation of [0, n) evaluated one index at a time, with no table: a 4-round Feistel network on the
    smallest even power of two >= n, cycle-walked back into [0, n) (a bijection; under two rounds of walking on
    average). A table of 8 bytes an example would be 800 MB per rank for 100M examples."""

    def __init__(self, n: int, seed: list[int]) -> None:
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.n, self.half, self.mask = n, bits // 2, (1 << (bits // 2)) - 1
        self.keys = [int(k) for k in np.random.default_rng(seed).integers(0, 1 << 62, size=4)]

    def __call__(self, i: int) -> int:
        x = i
        while True:
            left, right = x >> self.half, x & self.mask
            for k in self.keys:  # round function: SplitMix64's finaliser of (right + key)
                z = (right + k) & _MASK64
                z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
                z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
                left, right = right, left ^ ((z ^ (z >> 31)) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


class SampleOrder:
    def __init__(self, sizes: list[int], weights: list[float], seed: int, shuffle: bool) -> None:
        total = float(sum(weights))
        self.sizes, self.seed, self.shuffle = list(sizes), seed, shuffle
        self.weights = np.array(weights, dtype=np.float64) / total
        target = BLOCK * self.weights
        self.base = np.floor(target).astype(np.int64)
        self.frac = target - self.base
        self.extra = int(BLOCK - self.base.sum())
        self._block: tuple[int, np.ndarray, np.ndarray] | None = None  # (b, source of each slot, its rank in source)
        self._prefix = (0, np.zeros(len(sizes), dtype=np.int64))  # (b, samples per source before block b)
        self._perm: dict[int, tuple[int, Shuffle]] = {}  # source -> (epoch, its permutation)

    def block_counts(self, b: int) -> np.ndarray:
        """Samples per source in block b."""
        if self.extra == 0:
            return self.base
        u = np.random.default_rng([self.seed, 1, b]).random()
        edges = np.concatenate([[0.0], np.cumsum(self.frac)])
        edges[-1] = self.extra  # exact: the fractional parts add up to the whole number left over
        points = u + np.arange(self.extra)
        return self.base + np.diff(np.searchsorted(points, edges, side="left"))

    def _block_slots(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self._block is None or self._block[0] != b:
            counts = self.block_counts(b)
            source = np.repeat(np.arange(len(self.sizes)), counts)
            if len(self.sizes) > 1:
                source = np.random.default_rng([self.seed, 2, b]).permutation(source)
            rank = np.empty(BLOCK, dtype=np.int64)
            for s in range(len(self.sizes)):
                where = source == s
                rank[where] = np.arange(int(where.sum()))
            self._block = (b, source, rank)
        return self._block[1], self._block[2]

    def _counts_before_block(self, b: int) -> np.ndarray:
        start, counts = self._prefix
        if b == start:
            return counts
        if b < start:
            start, counts = 0, np.zeros(len(self.sizes), dtype=np.int64)
        counts = counts.copy()
        for block in range(start, b):
            counts += self.block_counts(block)
        self._prefix = (b, counts)
        return counts

    def counts_before(self, g: int) -> np.ndarray:
        """Samples each source gave before global sample g."""
        b, o = divmod(g, BLOCK)
        source, _ = self._block_slots(b)
        return self._counts_before_block(b) + np.bincount(source[:o], minlength=len(self.sizes))

    def _example(self, s: int, k: int) -> int:
        """The example of source s's k-th sample."""
        epoch, i = divmod(k, self.sizes[s])
        if not self.shuffle:
            return i
        if s not in self._perm or self._perm[s][0] != epoch:
            self._perm[s] = (epoch, Shuffle(self.sizes[s], [self.seed, epoch, s]))
        return self._perm[s][1](i)

    def samples(self, g: int, n: int) -> list[tuple[int, int]]:
        """(source, example index) of global samples g .. g + n - 1."""
        out = []
        for x in range(g, g + n):
            b, o = divmod(x, BLOCK)
            source, rank = self._block_slots(b)
            s = int(source[o])
            out.append((s, self._example(s, int(self._counts_before_block(b)[s] + rank[o]))))
        return out


class ShardedLoader:
    """Each rank's micro batches from optimizer step `start` on, forever: rank r of w takes slot (m * w + r) of
    micro batch m of every global batch (SampleOrder gives the samples). One source, or a weighted mixture.

    Where w does not divide the global batch's micro batches (an elastic job at some sizes), the last round has more
    slots than micro batches: the ranks past the end run a padding micro batch (`is_padding`) whose loss counts for
    nothing, and the real ones count w * accum / micro-batches-per-step each, so the step's gradient is the mean over
    exactly the global batch, at any size.

    An epoch is as many samples as the sources hold together (`steps_per_epoch` global batches): optim.epochs and the
    logged `epoch` count them."""

    def __init__(self, sources: list[Sequence], *, micro_batch: int, grad_accum: int, rank: int, world: int,
                 seed: int, shuffle: bool, weights: Optional[list[float]] = None, names: Optional[list[str]] = None,
                 global_batch: Optional[int] = None):
        self.sources = sources
        self.weights = weights or [1.0] * len(self.sources)
        self.names = names or [f"source{i}" for i in range(len(self.sources))]
        self.micro, self.accum, self.rank, self.world = micro_batch, grad_accum, rank, world
        self.global_batch = global_batch or micro_batch * grad_accum * world
        self.micro_per_step = self.global_batch // micro_batch
        self.real_weight = world * grad_accum / self.micro_per_step
        """The loss weight of a real micro batch: DeepSpeed averages over world x accum micro batches, of which
        micro_per_step are real (1.0 when the world divides them)."""
        used = [len(src) for src, w in zip(self.sources, self.weights) if w > 0]
        self.steps_per_epoch = sum(used) // self.global_batch
        if self.steps_per_epoch == 0:
            raise_too_few(sum(used), self.global_batch)
        empty = [n for n, src, w in zip(self.names, self.sources, self.weights) if w > 0 and len(src) == 0]
        if empty:
            raise SpecError(f"data.train: source {empty[0]} has no usable examples")
        self.order = SampleOrder([len(s) for s in self.sources], self.weights, seed, shuffle)

    @classmethod
    def for_job(cls, spec: JobSpec, sources: list[Sequence], rank: int, world: int) -> "ShardedLoader":
        """The loader a job's rank uses (batch sizes, seed, shuffling and source weights from the spec). The ranks
        of a sequence-parallel group read the same micro batches: the data-parallel rank is rank // N."""
        o, d, sp = spec.optim, spec.data, spec.parallel.sequence
        return cls(sources, micro_batch=o.micro_batch_size, grad_accum=spec.grad_accum_at(world), rank=rank // sp,
                   world=spec.data_parallel_at(world), global_batch=o.global_batch_size, seed=o.seed, shuffle=d.shuffle,
                   weights=[s.weight for s in d.sources],
                   names=[s.label for s in d.sources])

    def is_padding(self, m: int) -> bool:
        """Whether this rank's micro batch m of a step is past the global batch (its loss must count for nothing)."""
        return m * self.world + self.rank >= self.micro_per_step

    def micro_batches(self, start_step: int):
        step = start_step
        while True:
            base = step * self.global_batch
            for m in range(self.accum):
                # A padding slot reads the step's first micro batch again: real data of the usual shape, weight 0.
                slot = 0 if self.is_padding(m) else m * self.world + self.rank
                yield [self.sources[s][i] for s, i in self.order.samples(base + slot * self.micro, self.micro)]
            step += 1

    def shares(self, step: int) -> dict[str, float]:
        """The realised share of each source over the samples of steps [0, step)."""
        g = step * self.global_batch
        counts = self.order.counts_before(g)
        return {n: float(c) / g for n, c in zip(self.names, counts)} if g else {}



def raise_too_few(n: int, global_batch: int) -> None:
    raise SpecError(f"data.train: {n} examples are fewer than one global batch ({global_batch}); lower "
                    "optim.global_batch_size or add data")
