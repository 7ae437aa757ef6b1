"""Data at scale: a rank's memory for its data does not grow with the data set. Generated sets of 100k and 500k
prompt/completion rows are prepared for real (chunks of 20k rows tokenised by two local processes), then a fresh
process does what a training rank does with its data (open the prepared entry from this node's verified copy, build
the sample order, draw 50 micro batches of 16) and reports its memory growth.

The bound is on private (anonymous) memory, the part a rank does not share: under 8 MiB at either size and within
2 MiB between them (measured ~0.1 and ~0.2 MiB; the sample order keeps no permutation table). The parts' pages the
rank maps are page cache, shared with the node's other ranks and evictable; the kernel maps 64 KiB around each page
a sample touches, so at these sizes they approach the parts' size (20-100 MB) and say nothing about a rank's own
memory. Today's path (`data.cache: off`: every rank holds the tokenised set as Python lists) grew by 205 MiB of
private memory (339 MiB peak) for 200k rows of this task (`ftdist bench --only data`, 2026-12-03)."""

from __future__ import annotations

import pytest

from ftdist.bench.data import data_spec, rank_memory
from ftdist.train.locations import load_tokenizer
from ftdist.train.objectives import objective_for
from ftdist.train.prepare import Runner, prepare

pytestmark = [pytest.mark.slow]

MIB = 1 << 20


def test_a_ranks_data_memory_does_not_grow_with_the_row_count(tmp_path):
    grown = {}
    for rows in (100_000, 500_000):
        spec = data_spec(str(tmp_path), rows, "mem", str(tmp_path / "prepared"))
        manifest, built = prepare(spec, load_tokenizer(spec.model.tokenizer_path), objective_for(spec), Runner(2))
        assert built and manifest.train_rows == rows and len(manifest.train) == rows // 20_000
        grown[rows] = rank_memory(spec, batches=50)
        assert grown[rows]["examples"] == rows
    for rows, m in grown.items():
        assert m["anon"] < 8 * MIB, (rows, m)
    assert abs(grown[500_000]["anon"] - grown[100_000]["anon"]) < 2 * MIB, grown
