"""`ftdist plan`'s model states against what DeepSpeed really holds per rank (real DeepSpeed, 2 gloo ranks, the
bench's 3.07M-parameter Llama in fp32 at sequence 256): parameters, gradients and optimizer states measured with
gradients present once Adam's state exists (the counters `ftdist bench --only memory` uses), over the grid of
`ftdist bench --only peak`: ZeRO 0-3, optimizer and parameter offload, full and LoRA, micro batches 1 and 4,
gradient checkpointing on and off. The same run measures each rank's peak resident memory; the planner's peak is not
yet held to it (README, Planning: the gaps that remain), so it is printed, not asserted."""

from __future__ import annotations

import pytest

from ftdist.bench.peak import GRID, bench_peak

pytestmark = pytest.mark.deepspeed


def test_planned_model_states_match_deepspeed_over_the_grid(tmp_path):
    rows = bench_peak(str(tmp_path))
    assert [r["setting"] for r in rows] == [label for label, _ in GRID]
    for r in rows:
        print(f"{r['setting']:<52} model states {r['model_states_ratio']:.3f}  peak {r['peak_ratio']:.3f}")
    off = [(r["setting"], round(r["model_states_ratio"], 3)) for r in rows
           if not 0.9 <= r["model_states_ratio"] <= 1.1]
    assert not off, off
