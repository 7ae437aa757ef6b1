"""Real Ray Train + DeepSpeed jobs checkpointing to a real S3-compatible server (SeaweedFS): a SIGKILLed worker
restarts by itself from S3 and ends where an uninterrupted run ends; a crash during an upload commits nothing;
injected 5xx/dropped connections are absorbed; retention; no credential in logs, manifests or metadata."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch

from ftdist.cli import main
from ftdist.spec import spec_from_dict
from ftdist.storage.checkpoints import CheckpointStore
from ftdist.storage.store import open_store
from ftdist.train.driver import run_training
from tests.conftest import REPO, tiny_job_dict
from tests.support.faultproxy import FaultProxy

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.s3]


def _losses(history):
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def _state(job_uri: str, name: str) -> dict:
    return json.loads(CheckpointStore(job_uri).store.get_bytes(f"{name}/ftdist_state.json"))


def _export_weights(s3_server, uri: str) -> dict:
    from safetensors.torch import load

    bucket, _, key = uri[len("s3://"):].partition("/")
    body = s3_server.client().get_object(Bucket=bucket, Key=f"{key}/model.safetensors")["Body"].read()
    return load(body)


def _kill_a_worker_after(job_uri: str, ckpt: str, stop: threading.Event, killed: list) -> None:
    """Wait until checkpoint `ckpt` is committed in storage, then SIGKILL one Ray Train worker process."""
    import psutil

    cs = CheckpointStore(job_uri)
    while not stop.is_set():
        if cs.read_manifest(ckpt) is not None:
            # Ray names worker processes after the actor; ours are descendants of this (driver) process's Ray.
            workers = [p for p in psutil.Process().children(recursive=True)
                       if "RayTrainWorker" in " ".join(p.cmdline() if p.is_running() else [])]
            if workers:
                victim = sorted(workers, key=lambda p: p.pid)[-1]
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(victim.pid)
                return
        time.sleep(0.05)


def test_sigkilled_worker_restarts_from_s3_and_matches_uninterrupted(ray_cluster, bucket, s3_server):
    storage = f"s3://{bucket}/runs"
    common = dict(zero={"stage": 3}, optim={**tiny_job_dict("x")["optim"], "max_steps": 12},
                  checkpoint={"every_n_steps": 4, "keep_last": 2}, eval={"max_batches": 2})
    ref = run_training(spec_from_dict(tiny_job_dict(storage, name="uninterrupted", **common)))
    assert ref.error is None, ref.error
    # On s3:// storage the run report and the TensorBoard events (uploaded from rank 0's staging) land in the run
    # folder too, and `ftdist report` rebuilds the report from there.
    keys = open_store(f"{storage}/uninterrupted").list("")
    assert {"report/report.md", "report/metrics.csv", "report/curves.png", "ftdist_job.json"} <= set(keys)
    assert any(k.startswith("tensorboard/events.out.tfevents.") and size > 0 for k, size in keys.items()), keys
    assert main(["report", f"{storage}/uninterrupted"]) == 0

    spec = spec_from_dict(tiny_job_dict(storage, name="killed", resources={"num_workers": 2, "cpus_per_worker": 1,
                                                                           "max_failures": 2}, **common))
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_after, args=(f"{storage}/killed", "step_00000004", stop, killed))
    killer.start()
    try:
        got = run_training(spec)
    finally:
        stop.set()
        killer.join()
    assert got.error is None, got.error
    assert killed, "the run finished before a worker could be killed"
    state = _state(f"{storage}/killed", "step_00000012")
    assert state["resumes"] and state["resumes"][0] >= 4  # restarted by FailureConfig from a committed checkpoint

    a, b = _losses(ref.history), _losses(got.history)
    assert sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    assert got.metrics["eval_loss"] == pytest.approx(ref.metrics["eval_loss"], rel=1e-5)
    wa, wb = _export_weights(s3_server, ref.export_dir), _export_weights(s3_server, got.export_dir)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    # Retention kept the newest two committed checkpoints, each complete.
    cs = CheckpointStore(f"{storage}/killed")
    assert [c.name for c in cs.checkpoints()] == ["step_00000008", "step_00000012"]
    assert all(cs.problems(c.name, deep=True) == [] for c in cs.checkpoints())


def test_crash_during_upload_commits_nothing_and_next_run_resumes(ray_cluster, bucket, s3_server, monkeypatch):
    storage = f"s3://{bucket}/runs"
    job = dict(name="crashy", checkpoint={"every_n_steps": 4, "upload": {"max_attempts": 1}},
               export={"enabled": False})
    # Every write under step_00000008/ fails: the upload thread raises mid-checkpoint and the run dies.
    with FaultProxy(s3_server.endpoint, fail_paths=r"/step_00000008/") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        crashed = run_training(spec_from_dict(tiny_job_dict(storage, **job)))
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert crashed.error is not None
    assert proxy.injected > 0, crashed.error
    cs = CheckpointStore(f"{storage}/crashy")
    assert [c.name for c in cs.checkpoints()] == ["step_00000004"]  # step 8 never committed

    rerun = run_training(spec_from_dict(tiny_job_dict(storage, **job)))
    assert rerun.error is None, rerun.error
    assert _state(f"{storage}/crashy", "step_00000008")["resumes"] == [4]
    assert [c.name for c in cs.checkpoints()] == ["step_00000004", "step_00000008"]
    assert cs.problems("step_00000008", deep=True) == []


def test_flaky_storage_run_completes_and_every_checkpoint_verifies(ray_cluster, bucket, s3_server, monkeypatch):
    storage = f"s3://{bucket}/runs"
    # 5xx on 5% of all requests: ftdist's boto3 transfers and Ray's own pyarrow calls (run state, retention) alike.
    # (ftdist's side alone takes 30% with dropped connections: test_storage. Ray's pyarrow client retries 3 times:
    # pyarrow drops a custom retry_strategy when the filesystem is pickled to Ray's controller.)
    with FaultProxy(s3_server.endpoint, fail_rate=0.05, seed=7, kinds=("503", "500")) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        s = run_training(spec_from_dict(tiny_job_dict(
            storage, name="flaky", zero={"stage": 3}, checkpoint={"every_n_steps": 2, "keep_last": 3},
            export={"enabled": False})))
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert s.error is None, s.error
    assert proxy.injected >= 5, (proxy.injected, proxy.requests)
    cs = CheckpointStore(f"{storage}/flaky")
    assert [c.name for c in cs.checkpoints()] == ["step_00000004", "step_00000006", "step_00000008"]
    for c in cs.checkpoints():
        assert cs.problems(c.name, deep=True) == [], c.name
        assert c.manifest.zero_stage == 3 and c.manifest.world_size == 2 and c.manifest.method == "full"


@pytest.mark.slow
def test_no_credential_in_logs_manifests_or_metadata(bucket, s3_server, write_job, tmp_path):
    """`ftdist train` as a user runs it (own embedded Ray): scan its output, Ray's log folder and every object."""
    job = write_job(tiny_job_dict(f"s3://{bucket}/runs", name="secretscan", optim={
        **tiny_job_dict("x")["optim"], "max_steps": 4}, checkpoint={"every_n_steps": 2}))
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="/tmp/fts")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    r = subprocess.run([sys.executable, "-m", "ftdist.cli", "train", str(job)], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    secrets = [s3_server.secret_key, s3_server.access_key]
    for s in secrets:
        assert s not in r.stdout and s not in r.stderr
    scanned = 0
    for d, _, files in os.walk(ray_tmp):
        for f in files:
            p = os.path.join(d, f)
            if not stat.S_ISREG(os.lstat(p).st_mode):
                continue
            if not os.path.isfile(p) or os.path.islink(p) or os.path.getsize(p) > 50 << 20:
                continue  # sockets, links, big object-store spill files
            data = open(p, "rb").read()
            scanned += 1
            for s in secrets:
                assert s.encode() not in data, p
    c = s3_server.client()
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.endswith("ftdist_manifest.json") for k in keys)
    for k in keys:
        obj = c.get_object(Bucket=bucket, Key=k)
        data = obj["Body"].read()
        meta = json.dumps(obj.get("Metadata", {}))
        for s in secrets:
            assert s.encode() not in data and s not in meta, k
    assert scanned > 10
