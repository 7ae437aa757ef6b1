"""`ftdist plan`'s model states against what DeepSpeed really holds per rank (real DeepSpeed, 2 gloo ranks, the
bench's 3.6M-parameter Llama in fp32): parameters, gradients and optimizer states measured with gradients present
once Adam's state exists (the counters `ftdist bench --only memory` uses)."""

from __future__ import annotations

import pytest

from ftdist.bench.common import BENCH_LLAMA, WORLD, bench_spec, spawn
from ftdist.bench.training import _model_state
from ftdist.plan.memory import model_state_bytes
from ftdist.plan.shape import ModelShape
from ftdist.spec import with_overrides

pytestmark = pytest.mark.deepspeed


@pytest.mark.parametrize("stage, method", [(1, "full"), (2, "full"), (3, "full"), (2, "lora"), (3, "lora"),
                                           (2, "freeze")])
def test_planned_model_states_match_deepspeed(stage, method, tmp_path):
    spec = bench_spec(str(tmp_path / "store"), 4, stage=stage)
    if method != "full":
        spec = with_overrides(spec, {"method": method})
    measured = max(r["bytes"] for r in spawn(_model_state, spec.model_dump(mode="json")))
    predicted = sum(model_state_bytes(spec, ModelShape.from_config(BENCH_LLAMA), WORLD).values())
    assert 0.9 <= predicted / measured <= 1.1, (predicted, measured)
