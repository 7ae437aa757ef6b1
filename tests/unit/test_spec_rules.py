"""Schema rules added with the package split: cross-field errors name a key and its line, the method's section is
never None, `ftdist validate` runs the sweep checks, and a method switch by override drops the old defaults."""

from __future__ import annotations

import pytest
import yaml

from ftdist.cli import main
from ftdist.spec import LoraSpec, load_spec, with_overrides
from tests.conftest import TINY_LLAMA, tiny_job_dict


def _line_of(path, key: str) -> int:
    return next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip().startswith(f"{key}:"))


def test_cross_field_error_names_the_key_and_its_line(write_job, tmp_path, capsys):
    job = tiny_job_dict(str(tmp_path))
    job["optim"]["global_batch_size"] = 15
    path = write_job(job)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ftdist: error: {path}:{_line_of(path, 'global_batch_size')}: optim.global_batch_size: ")
    assert "(top level)" not in err


def test_nested_cross_field_error_names_the_field(write_job, tmp_path, capsys):
    job = tiny_job_dict(str(tmp_path), zero={"stage": 2, "offload_params": "cpu"})
    path = write_job(job)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path}:{_line_of(path, 'offload_params')}: zero.offload_params: zero.offload_params needs" in err


def test_method_section_is_always_there(write_job, tmp_path):
    spec = load_spec(write_job(tiny_job_dict(str(tmp_path), method="lora")))
    assert spec.lora == LoraSpec() and spec.freeze is None
    full = with_overrides(spec, {"method": "full"})  # the default LoRA section goes with the method
    assert full.method == "full" and full.lora is None
    frozen = load_spec(write_job(tiny_job_dict(str(tmp_path), method="freeze"), "f.yaml"))
    assert frozen.freeze is not None and frozen.freeze.train_top_layers == 2


def test_validate_runs_the_sweep_checks(write_job, tmp_path, capsys):
    job = tiny_job_dict(str(tmp_path), method="lora", sweep={"space": {"optim.lrr": [1e-3, 1e-2]}})
    path = write_job(job)
    assert main(["validate", str(path)]) == 2
    assert "sweep.space.optim.lrr: unknown job key" in capsys.readouterr().err
    job["sweep"].update(space={"optim.lr": [1e-3, 1e-2]}, scheduler={"type": "fifo"})
    path.write_text(yaml.safe_dump(job))
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("model, message", [
    ({"activation_offload": True}, r"model.activation_offload moves what gradient checkpointing keeps: set "
                                   r"model.gradient_checkpointing: true"),
    ({"activation_offload": True, "gradient_checkpointing": True},
     r"model.activation_offload needs GPUs .*: on a CPU activations are in host memory already"),
])
def test_activation_offload_rules_are_one_line(validate_refuses, model, message):
    validate_refuses({"model": {**tiny_job_dict("x")["model"], **model}}, message)


@pytest.mark.parametrize("change, message", [
    ({"resources": {"num_workers": 3}}, r"parallel.sequence 2 must divide resources.num_workers 3"),
    ({"objective": "reward"}, r"parallel.sequence splits one sequence for next-token loss \(objective sft\); "
                              r"objective reward scores whole rows"),
    ({"model": {"attn_implementation": "eager"}}, r"model.attn_implementation: parallel.sequence needs sdpa or "
                                                  r"flash attention"),
    ({"data": {"packing": True}}, r"data.packing: data.packing under parallel.sequence needs "
                                  r"model.attn_implementation flash_attention_2 or 3"),
    ({"model": {"from_config": {**TINY_LLAMA, "hidden_size": 96, "num_attention_heads": 6,
                                "num_key_value_heads": 3}}},
     r"parallel.sequence 2 and the model's 3 key/value heads must divide one another"),
    ({"parallel": {"sequence": 3}, "resources": {"num_workers": 3}, "optim": {"global_batch_size": 24}},
     r"parallel.sequence 3 must divide the model's 4 attention heads"),
    ({"optim": {"global_batch_size": 12}}, r"optim.global_batch_size 12 is not a multiple of optim.micro_batch_size "
                                           r"8 x resources.num_workers 2 / parallel.sequence 2"),
])
def test_sequence_parallel_rules_are_one_line(validate_refuses, change, message):
    validate_refuses({"parallel": {"sequence": 2}, **change}, message)


def test_sequence_parallel_groups_share_the_data_parallel_batch():
    from ftdist.spec import spec_from_dict

    spec = spec_from_dict(tiny_job_dict("x", parallel={"sequence": 2}, resources={"num_workers": 4},
                                        optim={**tiny_job_dict("x")["optim"], "global_batch_size": 32}))
    assert spec.grad_accum == 2  # 32 sequences = micro 8 x 2 data-parallel groups x 2


def test_an_elastic_range_is_stored_as_bounds():
    from ftdist.spec import spec_from_dict

    r = spec_from_dict(tiny_job_dict("x", resources={"num_workers": {"min": 1, "max": 2}})).resources
    assert (r.min_workers, r.num_workers, r.elastic) == (1, 2, True)
    fixed = spec_from_dict(tiny_job_dict("x")).resources
    assert fixed.min_workers is None and not fixed.elastic


@pytest.mark.parametrize("resources, change, message", [
    ({"num_workers": {"min": 4, "max": 2}}, {}, r"resources.num_workers.min: resources.num_workers.min 4 is above "
                                                r"max 2"),
    ({"num_workers": {"min": 1, "most": 2}}, {}, r"resources.num_workers.most: resources.num_workers takes a number "
                                                 r"or \{min: N, max: M\}"),
    ({"num_workers": {"min": 1, "max": "x"}}, {}, r"resources.num_workers.max must be a whole number"),
    ({"num_workers": {"min": 1, "max": 3}}, {"optim": {"global_batch_size": 12}},
     r"optim.global_batch_size 12 is not a multiple of optim.micro_batch_size 8"),
    ({"num_workers": {"min": 1, "max": 3}}, {}, r"resources.num_workers.max 3 is more workers than the 2 micro "
                                                r"batches of a global batch"),
    ({"num_workers": {"min": 2, "max": 4}}, {"parallel": {"sequence": 2}, "optim": {"global_batch_size": 64}},
     r"parallel.sequence needs a fixed resources.num_workers"),
])
def test_elastic_rules_are_one_line(validate_refuses, resources, change, message):
    validate_refuses({"resources": resources, **change}, message)
