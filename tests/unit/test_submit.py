
"""`ftdist submit` without a cluster: attempt ids, addresses, what a submission carries (the job folder, never a
secret), and which paths can reach the cluster."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ftdist.errors import SpecError
from ftdist.remote.portability import check_paths
from ftdist.remote.submit import build_submission, dashboard_address, next_attempt
from ftdist.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "quickstart.yaml"


def _job(name: str, status: str, attempt: int):
    return SimpleNamespace(submission_id=f"ftdist-{name}-{attempt}", status=status, start_time=attempt, end_time=None,
                           message="", metadata={"ftdist_job": name, "ftdist_attempt": str(attempt)})


def test_attempt_ids_refuse_a_live_job():
    assert next_attempt([], "qs") == 1
    assert next_attempt([_job("qs", "FAILED", 1), _job("qs", "SUCCEEDED", 2), _job("other", "RUNNING", 7)], "qs") == 3
    with pytest.raises(SpecError, match=r"job 'qs' is already RUNNING on this cluster as ftdist-qs-2; .*ftdist stop"):
        next_attempt([_job("qs", "FAILED", 1), _job("qs", "RUNNING", 2)], "qs")


@pytest.mark.parametrize("addr, match", [
    ("127.0.0.1:6379", r"needs the dashboard's HTTP address, e.g. http://127.0.0.1:6379"),
    ("ray://h:10001", r"expected http\(s\)://<head>:8265"),
])
def test_bad_addresses(addr, match):
    with pytest.raises(SpecError, match=match):
        dashboard_address(addr)


def test_submission_ships_the_job_folder_and_no_secrets(monkeypatch, tmp_path):
    from ftdist.storage.s3 import FORWARDED_ENV

    for k in FORWARDED_ENV:
        monkeypatch.delenv(k, raising=False)  # (another test's S3 server may have set them in this process)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.internal:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value-123")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    over = [f"checkpoint.storage={tmp_path}/runs", "optim.max_steps=4"]
    spec = load_spec(QUICKSTART, over)
    sub = build_submission(str(QUICKSTART), spec, kind="train", attempt=3, overrides=over, env=["WANDB_MODE=offline"])
    assert sub.submission_id == "ftdist-quickstart-3"
    assert sub.entrypoint == f"ftdist train quickstart.yaml --set checkpoint.storage={tmp_path}/runs --set optim.max_steps=4"
    assert sub.runtime_env["working_dir"] == str(REPO / "jobs")
    assert sub.runtime_env["env_vars"] == {"AWS_ENDPOINT_URL": "http://s3.internal:9000", "WANDB_MODE": "offline"}
    payload = json.dumps(sub.__dict__)
    assert "sekrit-value-123" not in payload and "AKIAEXAMPLE" not in payload
    sweep = REPO / "jobs" / "quickstart-sweep.yaml"
    tune = build_submission(str(sweep), load_spec(sweep), kind="tune", attempt=1, overrides=[], pip=["ftdist==0.1.0"],
                            py_modules=[str(REPO / "ftdist")])
    assert tune.entrypoint == "ftdist tune quickstart-sweep.yaml" and tune.metadata["ftdist_kind"] == "tune"
    assert tune.runtime_env["pip"] == ["ftdist==0.1.0"] and tune.runtime_env["py_modules"] == [str(REPO / "ftdist")]
    # with an image nothing is shipped: the job travels in the entrypoint
    img = build_submission(str(QUICKSTART), spec, kind="train", attempt=1, overrides=over, image="reg/ftdist:0.1.0")
    assert img.runtime_env["image_uri"] == "reg/ftdist:0.1.0" and "working_dir" not in img.runtime_env
    assert img.entrypoint.startswith("ftdist train --job-json ")
    with pytest.raises(SpecError, match=r"--image: Ray runs the image as is and cannot add --pip"):
        build_submission(str(QUICKSTART), spec, kind="train", attempt=1, overrides=[], image="r/f:1", pip=["x"])
    with pytest.raises(SpecError, match=r"--env HF_TOKEN: looks like a secret"):
        build_submission(str(QUICKSTART), spec, kind="train", attempt=1, overrides=[], env=["HF_TOKEN=hf_x"])


def test_paths_that_cannot_reach_the_cluster(tmp_path):
    # checkpoint.storage relative to the working dir: Ray deletes it with the job
    with pytest.raises(SpecError, match=r"checkpoint.storage: ./runs is relative"):
        check_paths(str(QUICKSTART), load_spec(QUICKSTART), REPO / "jobs")
    # a data file outside the shipped folder, given relative to the job file
    job = tmp_path / "sub" / "job.yaml"
    job.parent.mkdir()
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
    job.write_text(QUICKSTART.read_text().replace("data/quickstart/train.jsonl", "../train.jsonl")
                   .replace("data/quickstart/tokenizer", str(REPO / "jobs/data/quickstart/tokenizer"))
                   .replace("data/quickstart/eval.jsonl", str(REPO / "jobs/data/quickstart/eval.jsonl")))
    spec = load_spec(job, [f"checkpoint.storage={tmp_path}/runs"])
    with pytest.raises(SpecError, match=r"data.train: ../train.jsonl is outside the working dir"):
        check_paths(str(job), spec, job.parent)
    # absolute paths are not shipped: allowed, with a note
    over = [f"checkpoint.storage={tmp_path}/runs", f"data.train={tmp_path}/train.jsonl"]
    notes = check_paths(str(job), load_spec(job, over), job.parent, over)
    assert any(n.startswith("data.train:") and "must exist at that path on the cluster" in n for n in notes)
