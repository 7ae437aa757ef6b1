"""`ftdist submit|status|logs|stop|jobs` through the Ray Jobs API on a real 2-node local Ray cluster (head +
worker on 127.0.0.1, token auth) running a tiny job. The checks without a cluster are in tests/unit/test_submit.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "quickstart.yaml"


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
    export = storage / "quickstart" / "export"
    assert sorted(p.name for p in export.iterdir() if p.suffix in (".safetensors", ".json") and p.name.startswith(
        ("model", "config"))) == ["config.json", "model.safetensors"]  # one shard: this model is a few MB
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
