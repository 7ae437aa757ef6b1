"""DeepSpeed dict goldens: stage x offload x method x world size. Regenerate with FTDIST_UPDATE_GOLDENS=1."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from ftdist.spec import spec_from_dict
from ftdist.train.ds_config import to_deepspeed
from tests.conftest import tiny_job_dict

GOLDEN = Path(__file__).parent / "goldens" / "ds_config.json"

CASES = [
    (stage, off_opt, off_par, method, world, dtype)
    for stage, (off_opt, off_par), method, world, dtype in itertools.product(
        [0, 1, 2, 3], [("none", "none"), ("cpu", "none"), ("cpu", "cpu")], ["full", "lora"], [1, 2, 8], ["fp32", "bf16"]
    )
    if not (off_par == "cpu" and stage != 3) and not (off_opt == "cpu" and stage == 0)
]


def _case_spec(stage, off_opt, off_par, method, world, dtype, optimizer="torch_adamw"):
    job = tiny_job_dict("/tmp/x", method=method)
    job["zero"] = {"stage": stage, "offload_optimizer": off_opt, "offload_params": off_par}
    job["optim"] = {**job["optim"], "micro_batch_size": 2, "global_batch_size": 32 * world // 2,
                    "optimizer": optimizer}
    job["resources"] = {"num_workers": world, "gpus_per_worker": 1 if dtype == "bf16" else 0}
    job["model"]["dtype"] = dtype
    return spec_from_dict(job)


def _key(c) -> str:
    return "stage{}-optoff_{}-paroff_{}-{}-w{}-{}".format(*c)


# ZeRO++ and keys passed through (merged into the derived sections key by key).
EXTRA_CASES = {
    "zeropp-hpz2-qw-qg-w8-bf16": {"zero": {"stage": 3, "hpz_partition_size": 2, "quantized_weights": True,
                                           "quantized_gradients": True}},
    "passthrough-zero2-w2": {"zero": {"stage": 2}, "deepspeed_extra": {
        "zero_optimization": {"round_robin_gradients": True, "sub_group_size": 100_000_000},
        "comms_logger": {"enabled": True, "verbose": False}, "communication_data_type": "fp32"}},
    # Ulysses: 4 workers in 2 groups of 2 read 2 micro batches per step (data-parallel size 2).
    "sequence2-zero3-w4": {"zero": {"stage": 3}, "parallel": {"sequence": 2}},
}


def _extra_case(change: dict) -> dict:
    job = tiny_job_dict("/tmp/x", **change)
    job["optim"] = {**job["optim"], "micro_batch_size": 2, "global_batch_size": 32}
    world = 8 if "hpz_partition_size" in change["zero"] else 4 if "parallel" in change else 2
    job["resources"] = {"num_workers": world, "gpus_per_worker": 1 if world == 8 else 0}
    if world == 8:
        job["model"]["dtype"] = "bf16"
    return to_deepspeed(spec_from_dict(job), world)


def _all() -> dict:
    return {**{_key(c): to_deepspeed(_case_spec(*c), c[4]) for c in CASES},
            **{name: _extra_case(change) for name, change in EXTRA_CASES.items()}}


def test_goldens():
    got = _all()
    if os.environ.get("FTDIST_UPDATE_GOLDENS"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(want)
    for k in got:
        assert got[k] == want[k], k


def _walk(v):
    if isinstance(v, dict):
        for x in v.values():
            yield from _walk(x)
    else:
        yield v


@pytest.mark.parametrize("c", CASES, ids=_key)
def test_no_auto_and_batch_identity(c):
    cfg = to_deepspeed(_case_spec(*c), c[4])
    assert "auto" not in [v for v in _walk(cfg) if isinstance(v, str)]
    assert cfg["train_batch_size"] == (
        cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * c[4]
    )


def test_deepspeed_optimizer_section_only_when_asked():
    assert "optimizer" not in to_deepspeed(_case_spec(2, "none", "none", "full", 2, "fp32"), 2)
    cfg = to_deepspeed(_case_spec(3, "cpu", "cpu", "full", 2, "bf16", optimizer="deepspeed_adamw"), 2)
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["lr"] == 3e-3
    assert cfg["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}


def test_world_size_mismatch_is_rejected():
    with pytest.raises(ValueError, match="not a multiple"):
        to_deepspeed(_case_spec(2, "none", "none", "full", 8, "fp32"), 3)


def test_deepspeed_accepts_every_config():
    """DeepSpeed's own config parser (pydantic models for ZeRO, offload, ...) accepts each dict as written."""
    from deepspeed.runtime.config import DeepSpeedConfig

    for c in CASES:
        cfg = to_deepspeed(_case_spec(*c), c[4])
        # DeepSpeedConfig checks the batch identity against the current world size (1 here): check the rest.
        cfg = {**cfg, "train_batch_size": cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]}
        ds = DeepSpeedConfig(cfg)
        assert ds.zero_optimization_stage == c[0]


def test_universal_load_only_when_resuming_at_another_world_size():
    spec = _case_spec(2, "none", "none", "full", 2, "fp32")
    assert "checkpoint" not in to_deepspeed(spec, 2)
    cfg = to_deepspeed(spec, 1, load_universal=True)
    assert cfg["checkpoint"] == {"load_universal": True}
    assert cfg["train_batch_size"] == to_deepspeed(spec, 2)["train_batch_size"]  # the global batch is the job's
    assert cfg["gradient_accumulation_steps"] == 2 * to_deepspeed(spec, 2)["gradient_accumulation_steps"]


@pytest.mark.parametrize("change, message", [
    ({"deepspeed_extra": {"train_batch_size": 64}},
     r"^ftdist: .*deepspeed_extra.train_batch_size: ftdist derives this DeepSpeed key from optim.global_batch_size"),
    ({"deepspeed_extra": {"zero_optimization": {"stage": 3}}},
     r"deepspeed_extra.zero_optimization.stage: ftdist derives this DeepSpeed key from zero.stage; set that instead"),
    ({"deepspeed_extra": {"bf16": {"enabled": True}}}, r"deepspeed_extra.bf16: .* from model.dtype"),
    ({"deepspeed_extra": {"comms_loger": {"enabled": True}}},
     r"^ftdist: error: deepspeed_extra.comms_loger: not a DeepSpeed config key \(did you mean comms_logger\?\)$"),
    ({"deepspeed_extra": {"zero_optimization": {"round_robin_gradient": True}}},
     r"^ftdist: error: deepspeed_extra.zero_optimization.round_robin_gradient: not a key of DeepSpeed's "
     r"DeepSpeedZeroConfig \(did you mean round_robin_gradients\?\)$"),
    ({"deepspeed_extra": {"zero_optimization": {"sub_group_size": -1}}},
     r"deepspeed_extra.zero_optimization.sub_group_size: Input should be greater than or equal to 0"),
    ({"deepspeed_extra": ["wall_clock_breakdown"]}, r"^ftdist: .*deepspeed_extra"),
    ({"zero": {"stage": 2, "hpz_partition_size": 2}}, r"zero.hpz_partition_size is ZeRO\+\+, .* needs zero.stage 3"),
    ({"zero": {"stage": 3, "hpz_partition_size": 3}},
     r"zero.hpz_partition_size 3 must divide resources.num_workers 2"),
    ({"zero": {"stage": 3, "quantized_weights": True}},
     r"zero.quantized_weights needs GPUs \(resources.gpus_per_worker > 0\): DeepSpeed quantises with CUDA"),
])
def test_bad_deepspeed_settings_are_one_line(validate_refuses, change, message):
    validate_refuses(change, message)


def test_passed_keys_reach_deepspeed_beside_the_derived_ones():
    cfg = _extra_case(EXTRA_CASES["passthrough-zero2-w2"])
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["zero_optimization"]["round_robin_gradients"] is True
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 500_000_000  # the derived keys stay beside them
    assert cfg["comms_logger"] == {"enabled": True, "verbose": False}
