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

import subprocess
import sys

import pytest
import yaml

from ftdist.bench.data import data_spec, rank_memory
from ftdist.spec import with_overrides
from ftdist.train.locations import load_tokenizer
from ftdist.train.objectives import objective_for
from ftdist.train.prepare import Runner, prepare


MIB = 1 << 20


@pytest.mark.slow
def test_a_ranks_data_memory_does_not_grow_with_the_row_count(tmp_path):
    grown = {}
    for rows in (100_000, 500_000):
        spec = data_spec(str(tmp_path), rows, "mem", str(tmp_path / "prepared"))
        manifest, built = prepare(spec, load_tokenizer(spec.model.tokenizer_path), objective_for(spec), Runner(2))
        assert built and manifest.train_rows == rows and len(manifest.train) == -(-rows // 20_000)
        grown[rows] = rank_memory(spec, batches=50)
        assert grown[rows]["examples"] == rows
    for rows, m in grown.items():
        assert m["anon"] < 8 * MIB, (rows, m)
    assert abs(grown[500_000]["anon"] - grown[100_000]["anon"]) < 2 * MIB, grown


@pytest.mark.ray
def test_data_prepare_as_ray_tasks_on_the_cluster_equals_one_process(ray_cluster, tmp_path):
    """`ftdist data prepare --address`: the chunks tokenised as Ray tasks on the session's cluster give the same parts,
    byte for byte (BLAKE3), as one process; a second call finds the entry and says so."""
    import ray

    spec = data_spec(str(tmp_path), 45_000, "prep", str(tmp_path / "on-ray"))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    argv = [sys.executable, "-m", "ftdist.cli", "data", "prepare", str(job), "--address",
            ray.get_runtime_context().gcs_address]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ftdist: prepared " in r.stdout and "on Ray tasks on " in r.stdout, r.stdout
    assert "train: 45000 rows" in r.stdout and "lengths (tokens per example): <=64: 45000" in r.stdout, r.stdout
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0 and "ftdist: already prepared: " in again.stdout, again.stderr[-2000:]

    tok = load_tokenizer(spec.model.tokenizer_path)
    on_ray = prepare(spec, tok, objective_for(spec))[0]
    alone = with_overrides(spec, {"data.cache": str(tmp_path / "one-process")})
    here, built = prepare(alone, tok, objective_for(alone))
    assert built and here.key == on_ray.key and len(here.train) == 3
    assert [p.blake3 for p in here.train] == [p.blake3 for p in on_ray.train]
