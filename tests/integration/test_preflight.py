"""`ftdist preflight` on a real multi-node local Ray cluster (token auth, every node its own raylet) against the real
SeaweedFS server: a healthy cluster passes every check (one real training step and checkpoint commit included, and
nothing is left in the bucket); then nodes joined with one fault each are named, each in its own line:
- a node without S3 credentials (its processes inherit none, as a pod without its secret),
- a node whose credentials may only read (SeaweedFS identity with Read and List only),
- a node with another DeepSpeed (its package metadata says 0.14.0, as an older image would),
- a node whose workers cannot join the collective (GLOO_SOCKET_IFNAME names an interface it does not have),
- a node with a 8 MiB /dev/shm (its own mount namespace with a small tmpfs) under a GPU job (NCCL needs 1 GiB).
The CLI runs as a subprocess, as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_job_dict

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(s3_server):
    from tests.support.raycluster import start_cluster

    c = start_cluster(head_cpus=1, worker_cpus=(1,))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def bucket_name(s3_server):
    return s3_server.make_bucket("preflight")


def _job(tmp_path: Path, bucket: str, **sections) -> Path:
    job = tiny_job_dict(f"s3://{bucket}/runs", name="pf", **sections)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _preflight(cluster, job: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "ftdist.cli", "preflight", str(job), "--address", cluster.gcs, *args],
                       capture_output=True, text=True, env=cluster.client_env(), timeout=600, cwd=REPO)
    print("\n".join(ln for ln in r.stdout.splitlines() if not ln.startswith("(")), r.stderr[-300:], sep="\n")
    return r


def _lines(out: str, mark: str) -> list[str]:
    return [ln.strip() for ln in out.splitlines() if ln.strip().startswith(mark)]


def test_a_healthy_cluster_passes_and_leaves_nothing_behind(cluster, s3_server, bucket_name, tmp_path):
    # --json: stdout is the checklist alone, though the step's workers log to this process meanwhile
    r = _preflight(cluster, _job(tmp_path, bucket_name), "--json")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    report = json.loads(r.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["resources", "versions", "storage", "locations", "/dev/shm", "disk", "memory",
                            "collective", "step"], r.stdout
    assert report["ok"] and all(c["ok"] and not c["skipped"] for c in report["checks"])
    assert "2 nodes" in report["target"] and "[ftdist] step 1/1" in r.stderr  # the workers' lines went to stderr
    assert re.search(r"gloo all-reduce among 2 workers on 2 nodes: [0-9.]+ GB/s", checks["collective"]["detail"])
    ratio = float(re.search(r"([0-9.]+) x planned", checks["step"]["detail"]).group(1))
    assert 0.9 <= ratio <= 1.1, checks["step"]  # the planner's checkpoint size against the real one
    assert "ftdist: preflight passed" in r.stderr
    left = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket_name).get("Contents", [])]
    assert not left, f"the preflight left objects in the bucket: {left}"
    uploads = s3_server.client().list_multipart_uploads(Bucket=bucket_name).get("Uploads", [])
    assert not uploads


@pytest.fixture(scope="module")
def faulty_nodes(cluster, s3_server, tmp_path_factory):
    """Four more nodes, each with one fault; returns {fault: the node's raylet port}."""
    env = cluster.env
    no_creds = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    no_creds.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
                    AWS_EC2_METADATA_DISABLED="true")
    reader_key, reader_secret = s3_server.read_only
    old = tmp_path_factory.mktemp("old-deepspeed")
    meta = old / "deepspeed-0.14.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.14.0\n")
    return {
        "no credentials": cluster.add_node(0, "nocreds", env=no_creds),
        "read only": cluster.add_node(0, "readonly", env={**env, "AWS_ACCESS_KEY_ID": reader_key,
                                                          "AWS_SECRET_ACCESS_KEY": reader_secret}),
        "old deepspeed": cluster.add_node(0, "olddeepspeed", env={**env, "PYTHONPATH": str(old)}),
        "cannot join": cluster.add_node(1, "badnet", env={**env, "GLOO_SOCKET_IFNAME": "bogus0"}),
    }


def test_each_faulty_node_is_named_in_one_line(cluster, faulty_nodes, s3_server, bucket_name, tmp_path):
    # Three workers on the three nodes with a CPU (head, the healthy worker, the one that cannot join).
    job = _job(tmp_path, bucket_name, resources={"num_workers": 3, "cpus_per_worker": 1, "max_failures": 0},
               optim={**tiny_job_dict("x")["optim"], "global_batch_size": 24})
    r = _preflight(cluster, job, "--timeout", "60")
    assert r.returncode == 2, r.stdout[-4000:] + r.stderr[-3000:]
    failed = _lines(r.stdout, "FAIL")
    by_node = {fault: [ln for ln in failed if re.search(rf"node \S+:{port} ", ln)]
               for fault, port in faulty_nodes.items()}
    assert all(len(lines) == 1 for lines in by_node.values()), r.stdout + str(by_node)
    assert len(failed) == len(faulty_nodes), r.stdout  # the healthy nodes are not named
    assert re.search(r"^FAIL\s+storage .*writing: s3://.*no usable AWS credentials", by_node["no credentials"][0])
    assert re.search(r"^FAIL\s+storage .*writing: s3://.*access denied", by_node["read only"][0])
    assert re.search(r"^FAIL\s+versions .*deepspeed 0\.14\.0 \(driver [0-9.]+\)", by_node["old deepspeed"][0])
    assert re.search(r"^FAIL\s+collective .*gloo: .*Unable to find address for: bogus0", by_node["cannot join"][0])
    assert all("; fix: " in ln for ln in failed)
    assert "not run: fix the problems above first" in r.stdout
    assert "preflight failed: 4 problems (FAIL above) in " in r.stderr and "Traceback" not in r.stderr + r.stdout
    assert s3_server.client().list_objects_v2(Bucket=bucket_name).get("KeyCount", 0) == 0


def test_a_small_dev_shm_is_named_for_a_gpu_job(cluster, faulty_nodes, bucket_name, tmp_path):
    """The only node that offers a GPU (declared to Ray; none is used: no collective, no step) has an 8 MiB
    /dev/shm in its own mount namespace."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine refuses a mount namespace (unshare -m: {probe.stderr.decode().strip()})")
    wrap = ("unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=8m tmpfs /dev/shm && exec "$@"', "sh")
    port = cluster.add_node(1, "tinyshm", gpus=1, wrap=wrap)
    job = _job(tmp_path, bucket_name, resources={"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1,
                                                 "max_failures": 0},
               optim={**tiny_job_dict("x")["optim"], "global_batch_size": 8})
    r = _preflight(cluster, job, "--skip", "step")
    assert r.returncode == 2, r.stdout[-4000:] + r.stderr[-3000:]
    shm = [ln for ln in _lines(r.stdout, "FAIL") if ln.split()[1] == "/dev/shm"]
    assert len(shm) == 1 and re.search(rf"node \S+:{port} ", shm[0]) and "8 MiB" in shm[0], r.stdout
