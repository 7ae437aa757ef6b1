"""Shared fixtures: tiny job specs on the shipped quickstart task, and one real local Ray cluster per session."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
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


@pytest.fixture
def write_job(tmp_path):
    def _write(data: dict | str, name: str = "job.yaml") -> Path:
        p = tmp_path / name
        p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return p

    return _write


@pytest.fixture(scope="session")
def s3_server():
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole session. Its endpoint and credentials go into this
    process's AWS environment (as a user's shell would have them), so the local Ray started after it inherits them."""
    from tests.support.seaweed import start_seaweedfs

    server = start_seaweedfs()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket per test."""
    import re

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + os.urandom(3).hex()
    return s3_server.make_bucket(name)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real local Ray (own temp dir; stopped by ray.shutdown, never `ray stop`). Started after the S3 server so
    its workers have the same AWS environment as the driver."""
    import ray

    import socket

    tmp = tempfile.mkdtemp(prefix="/tmp/ftr")
    with socket.socket() as s:  # the dashboard (State API) on its own port: Ray Train's placement-group cleaner needs it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=3, include_dashboard=True, dashboard_port=port, _temp_dir=tmp, logging_level="WARNING",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()
