"""Job-file validation: every bad-input case gives one line naming the file:line and key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from ftdist.spec import load_spec, with_overrides
from ftdist.errors import SpecError
from tests.conftest import tiny_job_dict


def _err(write_job, job, *overrides) -> str:
    with pytest.raises(SpecError) as ei:
        load_spec(write_job(job), list(overrides))
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_valid_job_roundtrip(write_job, tmp_path):
    spec = load_spec(write_job(tiny_job_dict(str(tmp_path))))
    assert spec.grad_accum == 1 and spec.method == "full" and spec.zero.stage == 2
    again = with_overrides(spec, {"optim.lr": 1e-4, "method": "lora"})
    assert again.optim.lr == 1e-4 and again.method == "lora" and spec.optim.lr == 3e-3


def test_spec_is_frozen(write_job, tmp_path):
    spec = load_spec(write_job(tiny_job_dict(str(tmp_path))))
    with pytest.raises(ValidationError, match="frozen"):
        spec.optim.lr = 1.0  # type: ignore[misc]


def test_malformed_yaml_names_line(write_job):
    msg = _err(write_job, "name: x\nmodel: [unclosed\n")
    assert "job.yaml:" in msg and "malformed YAML" in msg


def test_unknown_key_names_path_and_line(write_job, tmp_path):
    job = tiny_job_dict(str(tmp_path))
    job["optim"]["learning_rate"] = 0.1
    msg = _err(write_job, job)
    assert "optim.learning_rate: unknown key" in msg
    line = msg.split(":")[1]
    text = (tmp_path / "job.yaml").read_text().splitlines()
    assert "learning_rate" in text[int(line) - 1]


def test_mistyped_value(write_job, tmp_path):
    job = tiny_job_dict(str(tmp_path))
    job["optim"]["lr"] = "fast"
    assert "optim.lr:" in _err(write_job, job)


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"zero": {"stage": 2, "offload_params": "cpu"}}, "offload_params needs zero.stage 3"),
        ({"zero": {"stage": 0, "offload_optimizer": "cpu"}}, "offload_optimizer needs"),
        ({"optim": {"micro_batch_size": 3, "global_batch_size": 16}}, "not a multiple"),
        ({"lora": {"rank": 8}}, "lora options are set but method is 'full'"),
        ({"method": "lora", "freeze": {"train_top_layers": 1}}, "freeze options are set"),
        ({"method": "sft"}, "method"),
        ({"zero": {"stage": 4}}, "zero.stage"),
        ({"optim": {"max_steps": None, "epochs": None}}, "exactly one of optim.max_steps or optim.epochs"),
        ({"model": {"name_or_path": "x", "from_config": {"model_type": "llama"}, "tokenizer": "t"}}, "exactly one"),
        ({"model": {"from_config": {"hidden_size": 8}, "tokenizer": "t"}}, "model_type"),
        ({"name": "Bad Name!"}, "name"),
        ({"checkpoint": {"storage": "gs://bucket/x"}}, "unsupported URI scheme gs://"),
        ({"data": {"train": "a.jsonl", "eval": "b.jsonl", "eval_fraction": 0.1}}, "not both"),
        ({"lora": {"rank": 0}, "method": "lora"}, "lora.rank"),
        ({"model": {"name_or_path": "x", "dtype": "fp16"}}, "fp16 needs GPUs"),
        ({"model": {"name_or_path": "x", "use_liger_kernel": True}}, "use_liger_kernel needs GPUs"),
        ({"model": {"name_or_path": "x", "use_liger_kernel": True, "compile": True},
          "resources": {"num_workers": 1, "gpus_per_worker": 1}}, "choose one"),
    ],
)
def test_impossible_combinations(write_job, tmp_path, patch, needle):
    job = tiny_job_dict(str(tmp_path))
    for k, v in patch.items():
        if isinstance(v, dict) and k in job and k not in ("model",):
            job[k] = {**job[k], **v}
        else:
            job[k] = v
    assert needle in _err(write_job, job)


def test_set_overrides_and_bad_override(write_job, tmp_path):
    p = write_job(tiny_job_dict(str(tmp_path)))
    spec = load_spec(p, ["optim.lr=2e-5", "zero.stage=3", "lora.rank=4", "method=lora"])
    assert spec.optim.lr == 2e-5 and spec.zero.stage == 3 and spec.lora.rank == 4
    with pytest.raises(SpecError, match="expected KEY.PATH=VALUE"):
        load_spec(p, ["optim.lr"])
    with pytest.raises(SpecError, match="optim.nope: unknown key"):
        load_spec(p, ["optim.nope=1"])


def test_relative_paths_resolve_against_job_file(write_job, tmp_path):
    job = tiny_job_dict(str(tmp_path))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.jsonl").write_text('{"text": "x"}\n')
    job["data"] = {"train": "d/t.jsonl"}
    spec = load_spec(write_job(job))
    assert spec.data.train == str(tmp_path / "d" / "t.jsonl")


def test_missing_job_file():
    with pytest.raises(SpecError, match="job file not found"):
        load_spec("/nonexistent/job.yaml")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ftdist.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda j: j["data"].update(train="/no/such/train.jsonl"), "data.train: /no/such/train.jsonl"),
        (lambda j: j["model"].update(from_config=None, name_or_path="/no/such/model"), "model.name_or_path"),
        (lambda j: j["optim"].update(global_batch_size=15), "global_batch_size"),
    ],
)
def test_cli_bad_input_one_line_exit_2(write_job, tmp_path, mutate, needle):
    job = tiny_job_dict(str(tmp_path / "store"))
    mutate(job)
    for cmd in ("validate", "train"):
        r = _cli(cmd, str(write_job(job)))
        assert r.returncode == 2, r.stderr
        assert needle in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "store").exists()  # nothing written


def test_cli_unreachable_ray_address(write_job, tmp_path):
    r = _cli("train", str(write_job(tiny_job_dict(str(tmp_path / "store")))), "--address", "127.0.0.1:1")
    assert r.returncode == 2 and "--address 127.0.0.1:1: cannot reach a Ray cluster" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "store").exists()


def test_validate_imports_no_torch_or_ray(write_job, tmp_path):
    # What keeps `ftdist validate` well under a second is that it never imports the heavy stack.
    p = write_job(tiny_job_dict(str(tmp_path)))
    code = (
        "import sys; from ftdist.cli import main; rc=main(['validate', %r]); "
        "heavy=[m for m in ('torch','ray','deepspeed','transformers') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(rc)" % str(p)
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout and ": ok (" in r.stdout


@pytest.mark.parametrize(
    "rows, needle",
    [
        (['{"prompt": "a", "completion": " b"}', '{"prompt": "a"'], "bad.jsonl:2: bad row: invalid JSON"),
        (['{"prompt": "a", "completion": " b"}', '{"text": "x"}'], "bad.jsonl:2: bad row: missing field 'prompt'"),
        (['{"prompt": "a", "completion": " b"}'], "fewer than one global batch"),
    ],
)
def test_cli_train_bad_data_exit_2_nothing_written(write_job, tmp_path, rows, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows * (1 if len(rows) == 1 else 20)) + "\n")
    job = tiny_job_dict(str(tmp_path / "store"))
    job["data"] = {**job["data"], "train": str(bad)}
    r = _cli("train", str(write_job(job)))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "store").exists()


def test_train_poll_interval_default_and_user_value(monkeypatch):
    """Ray Train's controller polls every 0.5 s under ftdist (reports stop waiting on its 2 s default); a value the
    user exported is kept."""
    from ftdist.train.ray_runtime import TRAIN_POLL_INTERVAL_S, train_poll_env

    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    assert train_poll_env() == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": TRAIN_POLL_INTERVAL_S}
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == TRAIN_POLL_INTERVAL_S
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    assert train_poll_env() == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3"}


def test_inside_a_submitted_job_ftdist_leaves_the_jobs_own_variables_to_it(monkeypatch):
    """ray.init inside a Ray job refuses to set a variable the job's runtime env sets (even to the same value):
    connect_ray leaves those out (seen with `ftdist submit`, which forwards the S3 endpoint itself)."""
    import json

    from ftdist.train.ray_runtime import _job_env_vars

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _job_env_vars() == {}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"AWS_ENDPOINT_URL": "http://s3:9000"}}}))
    assert _job_env_vars() == {"AWS_ENDPOINT_URL": "http://s3:9000"}
