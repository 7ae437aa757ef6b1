"""Schema rules added with the package split: cross-field errors name a key and its line, the method's section is
never None, `ftdist validate` runs the sweep checks, and a method switch by override drops the old defaults."""

from __future__ import annotations

import pytest
import yaml

from ftdist.cli import main
from ftdist.spec import LoraSpec, load_spec, with_overrides
from tests.conftest import tiny_job_dict


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
