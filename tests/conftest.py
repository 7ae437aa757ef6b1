"""Shared fixtures: tiny job specs on the shipped quickstart task, and one real local Ray cluster per session."""

from __future__ import annotations

import copy
import os
import re
import tempfile
from pathlib import Path

import pytest

from ftdist.environ import temporary_environ
import yaml

REPO = Path(__file__).resolve().parents[1]
QS = REPO / "jobs" / "data" / "quickstart"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


STARTS_SOMETHING = ("ray", "deepspeed", "s3", "slow")
"""Markers of tests that start real parts; each of them is also an `integration` test."""


def pytest_collection_modifyitems(config, items):
    """The tiers by folder and by marker: tests/integration and anything that starts Ray, DeepSpeed or S3 is
    `integration`; tests/gpu is `gpu`. A unit test (tests/unit) may start none of them."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "gpu" in parts[-2:]:
            item.add_marker(pytest.mark.gpu)
        if "integration" in parts[-2:] or any(item.get_closest_marker(m) for m in STARTS_SOMETHING):
            item.add_marker(pytest.mark.integration)
            if "unit" in parts[-2:]:
                raise pytest.UsageError(f"{item.nodeid}: a unit test may not start Ray, DeepSpeed or S3 "
                                        f"(move it to tests/integration)")


def tiny_job_dict(storage: str, **sections) -> dict:
    """A small, valid job on the quickstart data (2 workers, few steps). Override whole sections by keyword."""
    job = {
        "name": "tiny",
        "model": {"from_config": copy.deepcopy(TINY_LLAMA), "tokenizer": str(QS / "tokenizer"), "dtype": "fp32"},
        "data": {"train": str(QS / "train.jsonl"), "eval": str(QS / "eval.jsonl"), "format": "prompt_completion",
                 "max_length": 48},
        "method": "full",
        "zero": {"stage": 2},
        "optim": {"lr": 3e-3, "micro_batch_size": 8, "global_batch_size": 16, "max_steps": 8, "warmup_steps": 0,
                  "schedule": "constant", "seed": 3},
        "resources": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 0},
        "checkpoint": {"storage": storage, "every_n_steps": 4, "keep_last": 3},
        "eval": {"max_batches": 4},
        "logging": {"every_n_steps": 1},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(job.get(k), dict):
            job[k] = {**job[k], **v}
        else:
            job[k] = v
    return job


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory):
    """A real HF checkpoint folder (safetensors, the quickstart tokenizer) of the tiny Llama to fine-tune from: the
    base that interpolation and checkpoints without frozen parameters take weights from."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = dict(TINY_LLAMA)
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=torch.float32)
    out = tmp_path_factory.mktemp("base")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(QS / "tokenizer").save_pretrained(out)
    return str(out)


def base_model_section(base_dir: str) -> dict:
    """tiny_job_dict's model section for fine-tuning the saved base model."""
    return {"name_or_path": base_dir, "from_config": None, "tokenizer": None, "dtype": "fp32"}


def sweep_job_dict(storage: str, name: str = "sweep", sweep: dict | None = None, **sections) -> dict:
    """A LoRA sweep on the tiny job: lr x LoRA-rank grid, ASHA on eval_loss, alpha = 2 x rank."""
    defaults = {"method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
                "optim": {**tiny_job_dict("x")["optim"], "lr": 1e-2, "max_steps": 12},
                "eval": {"every_n_steps": 2, "max_batches": 4}, "logging": {"every_n_steps": 2},
                "checkpoint": {"every_n_steps": 4, "keep_last": 2}}
    job = tiny_job_dict(storage, name=name, **{**defaults, **sections})
    job["sweep"] = sweep or {"search": "grid", "space": {"optim.lr": [1e-2, 3e-3, 1e-4], "lora.rank": [4, 8]},
                             "alpha_per_rank": 2.0, "scheduler": {"type": "asha", "grace_period": 4,
                                                                  "reduction_factor": 2}}
    return job


# ---------------------------------------------------------------------------------------------------------------
# validation: one line before any trial starts


# ---------------------------------------------------------------------------------------------------------------
# real sweeps


@pytest.fixture
def write_job(tmp_path):
    def _write(data: dict | str, name: str = "job.yaml") -> Path:
        p = tmp_path / name
        p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return p

    return _write


class ModelAsEngine:
    """What an objective needs of a DeepSpeed engine, for unit tests: calling it runs the model; `.module` is the
    model; it lives on the CPU."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw)

    def __getattr__(self, name):  # eval(), train(), parameters(): the model's
        return getattr(self.module, name)

    @property
    def device(self):
        import torch

        return torch.device("cpu")


@pytest.fixture
def validate_refuses(tmp_path, write_job, capsys):
    """`ftdist validate` on the tiny job with `change` (its sections): exit 2, one line matching the regex
    `message`, nothing written."""
    def check(change: dict, message: str) -> None:
        from ftdist.cli import main

        job = write_job(tiny_job_dict(str(tmp_path / "runs"), **change))
        assert main(["validate", str(job)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
        assert not (tmp_path / "runs").exists()

    return check


@pytest.fixture(scope="session")
def s3_credentials():
    """The session's S3 identity, in this process's AWS environment before any local Ray or S3 server starts, so
    Ray's processes inherit it (as a user's shell would hand it on) whether or not a test ever starts the server."""
    from tests.support.seaweed import new_credentials

    access, secret = new_credentials()
    env = {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"}
    with _environ(env):
        yield access, secret


@pytest.fixture(scope="session")
def s3_server(s3_credentials):
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole session, accepting the session's credentials. Its
    endpoint goes into this process's AWS environment; ftdist forwards it to Ray's processes. A second, read-only
    identity (server.read_only) plays a node whose credentials may not write."""
    from tests.support.seaweed import new_credentials, start_seaweedfs

    server = start_seaweedfs(credentials=s3_credentials, read_only=new_credentials())
    with _environ(server.env()):
        yield server
    server.stop()


_environ = temporary_environ


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket per test."""
    import re

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + os.urandom(3).hex()
    return s3_server.make_bucket(name)


@pytest.fixture(scope="session")
def mlflow_credentials():
    """The session's MLflow identity in this process's environment before any local Ray starts (Ray's processes,
    where rank 0 logs, inherit it as they would a user's shell): the username and a fresh password."""
    from tests.support.mlflow_server import ADMIN, new_password

    password = new_password()
    with _environ({"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": password}):
        yield ADMIN, password


@pytest.fixture(scope="session")
def mlflow_server(mlflow_credentials):
    """A real MLflow tracking server (SQLite backend, local artifact root, basic auth) on 127.0.0.1 for the
    session; stopped by PID."""
    from tests.support.mlflow_server import start_mlflow

    server = start_mlflow(mlflow_credentials[1])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_credentials, mlflow_credentials):
    """A real local Ray (own temp dir; stopped by ray.shutdown, never `ray stop`). It does not start the S3 server:
    its processes inherit the session's credentials, and ftdist forwards the endpoint of a server started later."""
    import ray

    import socket

    tmp = tempfile.mkdtemp(prefix="/tmp/ftr")
    with socket.socket() as s:  # the dashboard (State API) on its own port: Ray Train's placement-group cleaner needs it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from ftdist.train.ray_runtime import EMBEDDED_TRAIN_ENV

    # As the embedded Ray of `ftdist train` runs (train/ray_runtime.py): no preemption watcher actor per run, no idle
    # workers prestarted (Ray Train's actors never use them); the dashboard stays, for Tune's placement-group cleaner.
    ray.init(num_cpus=3, include_dashboard=True, dashboard_port=port, _temp_dir=tmp, logging_level="WARNING",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", **EMBEDDED_TRAIN_ENV}},
             _system_config={"prestart_worker_first_driver": False})
    yield
    ray.shutdown()
