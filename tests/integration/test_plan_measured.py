"""`ftdist plan` against what DeepSpeed really holds per rank (real DeepSpeed, 2 gloo ranks, the bench's
3.07M-parameter Llama in fp32 at sequence 256) over the grid of `ftdist bench --only peak`: ZeRO 0-3, optimizer and
parameter offload, full and LoRA, micro batches 1 and 4, gradient checkpointing on and off. Model states
(parameters, gradients and optimizer states measured with gradients present once Adam's state exists: the counters
`ftdist bench --only memory` uses) within [0.9, 1.1]; the planner's per-process peak against each rank's peak
resident memory minus its baseline within [0.8, 1.25]."""

from __future__ import annotations

import pytest

from ftdist.bench.peak import GRID, bench_peak

pytestmark = pytest.mark.deepspeed


def test_planned_memory_matches_deepspeed_over_the_grid(tmp_path):
    rows = bench_peak(str(tmp_path))
    assert [r["setting"] for r in rows] == [label for label, _ in GRID]
    for r in rows:
        print(f"{r['setting']:<52} model states {r['model_states_ratio']:.3f}  peak {r['peak_ratio']:.3f}")
    for key, low, high in (("model_states_ratio", 0.9, 1.1), ("peak_ratio", 0.8, 1.25)):
        off = [(r["setting"], round(r[key], 3)) for r in rows if not low <= r[key] <= high]
        assert not off, (key, off)
