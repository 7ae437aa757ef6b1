"""Packing for `objective: sft` with `data.packing` (data.pack builds the blocks): whole documents placed into
blocks of at most data.max_length tokens by best-fit decreasing (as TRL's `packing_strategy="bfd"`), never split
across blocks, and kept apart inside a block by position ids that restart at 0 for each document.

Given position ids and no attention mask, transformers (masking_utils) builds a block-diagonal causal mask for every
attention implementation, and the flash-attention path uses the varlen kernel: a token attends only to its own
document, and the first token of each document carries no loss (it would be predicted from the previous document).
So a packed batch's loss is the sum of its documents' own losses (tests/unit/test_packing.py checks it on a real
model). This holds for models whose attention mask goes through `transformers.masking_utils` (Llama, Mistral, Qwen2/3,
Gemma and most decoder models of transformers 5); a model with its own mask code would attend across documents.
The model runs with `use_cache=False` for this (a cache turns the packed-mask detection off).
"""

from __future__ import annotations


class _BinsByRoom:
    """Bins by remaining capacity, with the query "the fullest bin that still takes n tokens" in O(log capacity): a
    segment tree over capacities 0..max holding how many open bins have each."""

    def __init__(self, capacity: int) -> None:
        self.size = 1
        while self.size < capacity + 1:
            self.size *= 2
        self.count = [0] * (2 * self.size)  # a list: element access is 5x a NumPy array's here
        self.bins: list[list[int]] = [[] for _ in range(capacity + 1)]  # capacity -> open bin ids (a stack)

    def _add(self, cap: int, delta: int) -> None:
        i = cap + self.size
        while i:
            self.count[i] += delta
            i //= 2

    def push(self, cap: int, bin_id: int) -> None:
        self.bins[cap].append(bin_id)
        self._add(cap, 1)

    def pop_at_least(self, n: int) -> tuple[int, int]:
        """(capacity, bin id) of an open bin with the smallest capacity >= n; (-1, -1) if none."""
        node, lo, hi = 1, 0, self.size - 1
        cap = self._first(node, lo, hi, n)
        if cap < 0:
            return -1, -1
        self._add(cap, -1)
        return cap, self.bins[cap].pop()

    def _first(self, node: int, lo: int, hi: int, n: int) -> int:
        if hi < n or self.count[node] == 0:
            return -1
        if lo == hi:
            return lo
        mid = (lo + hi) // 2
        found = self._first(2 * node, lo, mid, n)
        return found if found >= 0 else self._first(2 * node + 1, mid + 1, hi, n)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity` (each length <= capacity), longest first, each
    into the open bin it fills most tightly; bins listed in creation order, documents in placement order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    tree = _BinsByRoom(capacity)
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        cap, b = tree.pop_at_least(n)
        if b < 0:
            b, cap = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        if cap > n:  # a full bin takes nothing more
            tree.push(cap - n, b)
    return bins
