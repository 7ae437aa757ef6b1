"""`ftdist submit|status|logs|stop|jobs` through the Ray Jobs API: fast checks of the submission (ids, paths,
secrets), then a real 2-node local Ray cluster (head + worker on 127.0.0.1, token auth) running a tiny job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ftdist.spec import load_spec
from ftdist.errors import SpecError
from ftdist.remote.portability import check_paths
from ftdist.remote.submit import build_submission, dashboard_address, next_attempt

REPO = Path(__file__).resolve().parents[1]
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


# ---------------------------------------------------------------------------------------------------------------
# a real 2-node local Ray cluster


@pytest.fixture(scope="module")
def cluster():
    from tests.support.raycluster import start_cluster

    c = start_cluster(head_cpus=1, worker_cpus=(2,))
    yield c
    c.stop()


def _ftdist(cluster, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftdist.cli", *args], capture_output=True, text=True,
                          env=env or cluster.client_env(), timeout=timeout, cwd=REPO)


def _sets(storage: Path, steps: int) -> list[str]:
    out = []
    for s in (f"checkpoint.storage={storage}", f"optim.max_steps={steps}", "eval.every_n_steps=2",
              "logging.every_n_steps=1", "checkpoint.every_n_steps=null"):
        out += ["--set", s]
    return out


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.slow
def test_submit_follow_status_stop_on_a_real_cluster(cluster, tmp_path):
    storage = tmp_path / "store"
    addr = ["--address", cluster.dashboard]

    # 1. submit + --follow to the end: logs streamed, success, checkpoint and export where the job says
    r = _ftdist(cluster, "submit", str(QUICKSTART), *_sets(storage, 4), *addr, "--follow")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ftdist: submitted ftdist-quickstart-1" in r.stdout
    assert "[ftdist] step 4/4" in r.stdout and "ftdist: done at step 4" in r.stdout
    assert r.stdout.rstrip().endswith("ftdist-quickstart-1 SUCCEEDED")
    assert (storage / "quickstart" / "export" / "model.safetensors").exists() or \
        any((storage / "quickstart" / "export").glob("*.safetensors"))
    st = _ftdist(cluster, "status", "ftdist-quickstart-1", *addr)
    assert st.returncode == 0 and st.stdout.startswith("ftdist-quickstart-1: SUCCEEDED"), st.stdout + st.stderr

    # 2. a second attempt of the same name (new id, resumes from attempt 1's storage), stopped mid-run
    r = _ftdist(cluster, "submit", str(QUICKSTART), *_sets(storage, 400), *addr)
    assert r.returncode == 0, r.stderr
    assert "ftdist: submitted ftdist-quickstart-2" in r.stdout
    sid = "ftdist-quickstart-2"
    deadline = time.monotonic() + 240
    while "step 6/400" not in (logs := _ftdist(cluster, "logs", sid, *addr).stdout):
        assert time.monotonic() < deadline, logs[-3000:]
        time.sleep(3)
    assert "resumed from" in logs and "at step 4" in logs  # attempt 2 picked up attempt 1's checkpoint

    # resubmitting while it runs is refused, one line, exit 2
    again = _ftdist(cluster, "submit", str(QUICKSTART), *_sets(storage, 400), *addr)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"ftdist: error: job 'quickstart' is already RUNNING on this cluster as {sid}; follow it with "
        f"`ftdist logs {sid} --follow`, or `ftdist stop {sid}` first"]

    stop = _ftdist(cluster, "stop", sid, *addr)
    assert stop.returncode == 0 and f"ftdist: {sid} STOPPED" in stop.stdout, stop.stdout + stop.stderr
    st = _ftdist(cluster, "status", sid, *addr)
    assert st.stdout.startswith(f"{sid}: STOPPED")

    jobs = _ftdist(cluster, "jobs", *addr)
    assert jobs.returncode == 0
    lines = jobs.stdout.splitlines()
    assert lines[0].split()[:5] == ["submission", "job", "kind", "attempt", "status"]
    assert [ln.split()[:5] for ln in lines[1:]] == [
        ["ftdist-quickstart-1", "quickstart", "train", "1", "SUCCEEDED"],
        ["ftdist-quickstart-2", "quickstart", "train", "2", "STOPPED"]]

    # 3. the submission payload Ray stored carries no credential value
    secret = "sekrit-" + os.urandom(6).hex()
    env = cluster.client_env(AWS_SECRET_ACCESS_KEY=secret, AWS_ACCESS_KEY_ID="AKIA" + secret)
    info = subprocess.run([sys.executable, "-c", (
        "import json,sys;from ray.job_submission import JobSubmissionClient as C;"
        f"c=C({cluster.dashboard!r});print(json.dumps([j.dict() for j in c.list_jobs()], default=str))")],
        capture_output=True, text=True, env=env, timeout=120)
    assert info.returncode == 0, info.stderr[-2000:]
    assert secret not in info.stdout and open(cluster.token_path).read().strip() not in info.stdout


@pytest.mark.ray
def test_bad_token_and_unreachable_address_are_one_line(cluster):
    bad = cluster.client_env(RAY_AUTH_TOKEN="not-the-token")
    bad.pop("RAY_AUTH_TOKEN_PATH")
    r = _ftdist(cluster, "jobs", "--address", cluster.dashboard, env=bad, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        f"ftdist: error: --address {cluster.dashboard}: the cluster refused the Ray auth token; set "
        f"RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to this cluster's token"]

    from tests.support.raycluster import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    r = _ftdist(cluster, "status", "ftdist-x-1", "--address", dead, timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"ftdist: error: --address {dead}: cannot reach the Ray dashboard there")
    r = _ftdist(cluster, "status", "ftdist-nope-1", "--address", cluster.dashboard, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == \
        "ftdist: error: ftdist-nope-1: no such job on this cluster (see `ftdist jobs`)"
