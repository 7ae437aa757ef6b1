"""Checkpoint storage against a real S3-compatible server (SeaweedFS) and a local folder: upload, commit marker,
per-rank fetch with checksums, cleanup of uncommitted checkpoints, faults, and one-line errors for bad storage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from ftdist.errors import SpecError
from ftdist.storage import s3
from ftdist.storage.checkpoints import CheckpointError, CheckpointStore
from ftdist.storage.store import TransferOptions
from tests.conftest import tiny_job_dict
from tests.support.checkpoints import meta as _meta
from tests.support.faultproxy import FaultProxy

pytestmark = [pytest.mark.s3]

SMALL_PARTS = TransferOptions(part_size=5 << 20, concurrency=4, max_attempts=10)


def _rank_dir(root, rank: int, big: bool = False) -> str:
    d = root / f"rank{rank}"
    (d / "step_00000004").mkdir(parents=True)
    (d / "step_00000004" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(
        (12 << 20) + 123 if big else 1000))
    (d / "step_00000004" / f"rng_state_rank{rank}.pt").write_bytes(os.urandom(64))
    if rank == 0:
        (d / "step_00000004" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(2048))
        (d / "ftdist_state.json").write_text('{"step": 4}')
        (d / "latest").write_text("step_00000004")
    return str(d)


@pytest.fixture(params=["s3", "local"])
def job_uri(request, tmp_path):
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        return f"s3://{server.make_bucket('ck-' + os.urandom(4).hex())}/team/runs/job1"
    return str(tmp_path / "runs" / "job1")


def test_two_ranks_commit_and_each_fetches_only_its_files(job_uri, tmp_path):
    cs = CheckpointStore(job_uri, SMALL_PARTS)
    name = "step_00000004"
    assert cs.checkpoints() == []
    cs.upload_rank(_rank_dir(tmp_path, 1, big=True), name, 1)  # 12 MiB: a 3-part multipart upload on S3
    assert cs.checkpoints() == []  # files without a manifest are not a checkpoint
    cs.upload_rank(_rank_dir(tmp_path, 0), name, 0)
    m = cs.commit(name, 2, _meta(4, zero_stage=3, method="full", spec_sha256="x", metrics={}),
                  timeout_s=10)
    assert m.world_size == 2 and m.step == 4
    assert {f.path for f in m.files} == {
        "ftdist_state.json", "latest", "step_00000004/mp_rank_00_model_states.pt",
        "step_00000004/zero_pp_rank_0_mp_rank_00_optim_states.pt", "step_00000004/rng_state_rank0.pt",
        "step_00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt", "step_00000004/rng_state_rank1.pt"}
    [c] = cs.checkpoints()
    assert c.committed and c.step == 4 and c.size == m.total_bytes
    assert cs.problems(name, deep=True) == []

    got = tmp_path / "fetch1"
    cs.fetch_for_rank(name, 1, str(got))
    files = {os.path.relpath(os.path.join(d, f), got) for d, _, fs in os.walk(got) for f in fs}
    assert files == {"ftdist_state.json", "latest", "step_00000004/mp_rank_00_model_states.pt",
                     "step_00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt", "step_00000004/rng_state_rank1.pt"}
    src = tmp_path / "rank1" / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert (got / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").read_bytes() == src.read_bytes()

    # A second writer cannot commit a different checkpoint over it (conditional write).
    cs.store.put_bytes(f"{name}/.ftdist/rank-00001.json", json.dumps(
        [{"path": "other", "size": 1, "blake3": "0", "rank": 1}]).encode())
    with pytest.raises(CheckpointError, match="already committed"):
        cs.commit(name, 2, _meta(4), timeout_s=5)


def test_checkpoints_from_before_blake3_still_verify(job_uri, tmp_path):
    """Manifests written before ftdist hashed with BLAKE3 list a SHA-256 per file: resume, export and
    `ftdist checkpoints --verify` check those with SHA-256."""
    from ftdist.storage.store import file_digest

    cs = CheckpointStore(job_uri, SMALL_PARTS)
    name = "step_00000004"
    for r in (0, 1):
        local = _rank_dir(tmp_path, r)
        files = [f.model_dump(exclude_none=True) for f in cs.upload_rank(local, name, r)]
        for f in files:  # rewrite this rank's file list as the older ftdist wrote it
            del f["blake3"]
            f["sha256"] = file_digest(os.path.join(local, f["path"]), "sha256")
        cs.store.put_bytes(f"{name}/.ftdist/rank-{r:05d}.json", json.dumps(files).encode())
    m = cs.commit(name, 2, _meta(4), timeout_s=10)
    assert all(f.sha256 is not None and f.blake3 is None for f in m.files)
    assert cs.problems(name, deep=True) == []
    cs.fetch_for_rank(name, 1, str(tmp_path / "f1"))
    cs.store.put_bytes(f"{name}/step_00000004/rng_state_rank1.pt", os.urandom(64))
    assert any("SHA-256 mismatch" in p for p in cs.problems(name, deep=True))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        cs.fetch_for_rank(name, 1, str(tmp_path / "f2"))


def test_corruption_is_an_error_and_uncommitted_folders_are_removed(job_uri, tmp_path):
    cs = CheckpointStore(job_uri, SMALL_PARTS)
    for r in (0, 1):
        cs.upload_rank(_rank_dir(tmp_path, r), "step_00000004", r)
    cs.commit("step_00000004", 2, _meta(4), timeout_s=10)
    # Same size, different bytes: only the checksum can tell.
    key = "step_00000004/step_00000004/rng_state_rank1.pt"
    cs.store.put_bytes(key, os.urandom(64))
    assert cs.problems("step_00000004") == []  # shallow check: sizes match
    assert any("BLAKE3 mismatch" in p for p in cs.problems("step_00000004", deep=True))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        cs.fetch_for_rank("step_00000004", 1, str(tmp_path / "f"))
    cs.fetch_for_rank("step_00000004", 0, str(tmp_path / "f0"))  # rank 0 doesn't need that file

    # A crash mid-upload: a step folder with some files and no manifest (plus, on S3, an open multipart upload).
    cs.upload_rank(_rank_dir(tmp_path / "later", 0), "step_00000008", 0)
    if job_uri.startswith("s3://"):
        st = cs.store
        st.client.create_multipart_upload(Bucket=st.bucket, Key=st._k("step_00000008/big.pt"))
    assert [c.name for c in cs.checkpoints(committed_only=False)] == ["step_00000004", "step_00000008"]
    assert cs.remove_uncommitted() == ["step_00000008"]
    assert [c.name for c in cs.checkpoints(committed_only=False)] == ["step_00000004"]
    if job_uri.startswith("s3://"):
        assert cs.store.abort_uploads("") == 0
    # Deleting uncommits first; the store is then empty of checkpoints.
    cs.delete("step_00000004")
    assert cs.checkpoints(committed_only=False) == []


def test_uploads_survive_injected_5xx_and_dropped_connections(s3_server, tmp_path, monkeypatch):
    bucket = s3_server.make_bucket("flaky-" + os.urandom(4).hex())
    with FaultProxy(s3_server.endpoint, fail_rate=0.3, seed=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        cs = CheckpointStore(f"s3://{bucket}/j", SMALL_PARTS)
        for r in (0, 1):
            cs.upload_rank(_rank_dir(tmp_path, r, big=True), "step_00000004", r)
        cs.commit("step_00000004", 2, _meta(4), timeout_s=30)
        assert cs.problems("step_00000004", deep=True) == []
        assert proxy.injected > 3, (proxy.injected, proxy.requests)


def _download_in_child(uri, q):
    from ftdist.storage.cache import download

    path = download(uri)
    with open(os.path.join(path, "part-0.jsonl"), "rb") as fh:
        q.put((path, len(fh.read())))


def test_ranks_on_one_node_share_one_download(s3_server, tmp_path, monkeypatch):
    """Four processes (the ranks of a node) read the same s3:// data prefix at once: one downloads, the others
    reuse its copy; every one reads complete files, and the cache holds one folder and no leftover temp folders."""
    import multiprocessing as mp

    import boto3

    bucket = s3_server.make_bucket("cache-" + os.urandom(4).hex())
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    body = b'{"text": "hello"}\n' * 200_000  # 3.6 MB per file: the downloads overlap
    for i in range(3):
        client.put_object(Bucket=bucket, Key=f"data/train/part-{i}.jsonl", Body=body)
    monkeypatch.setenv("FTDIST_CACHE", str(tmp_path / "cache"))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with FaultProxy(s3_server.endpoint) as proxy:  # no faults: it counts the requests that reach the store
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        procs = [ctx.Process(target=_download_in_child, args=(f"s3://{bucket}/data/train", q)) for _ in range(4)]
        for p in procs:
            p.start()
        results = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
    assert {r[0] for r in results} == {results[0][0]} and all(r[1] == len(body) for r in results)
    assert proxy.requests <= 8, proxy.requests  # one listing + HEAD/GET per file, once: not once per process
    entries = sorted(os.listdir(tmp_path / "cache" / "s3"))
    assert [e for e in entries if ".tmp" in e] == [] and len([e for e in entries if e.endswith(".complete")]) == 1


# --- bad storage: one line, exit 2, before anything starts --------------------------------------------------------


def _cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "ftdist.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("case", ["wrong-secret", "unknown-key", "no-bucket", "unreachable", "no-credentials"])
def test_bad_storage_is_one_line_exit_2(s3_server, write_job, tmp_path, case):
    bucket = s3_server.make_bucket("bad-" + os.urandom(4).hex())
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_server.env())
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")
    storage = f"s3://{bucket}/runs"
    expect = {"wrong-secret": "credentials were rejected", "unknown-key": "credentials were rejected",
              "no-bucket": "does not exist", "unreachable": "cannot reach the S3 endpoint",
              "no-credentials": "no usable AWS credentials"}[case]
    if case == "wrong-secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif case == "unknown-key":
        env["AWS_ACCESS_KEY_ID"] = "AKIAUNKNOWN"
    elif case == "no-bucket":
        storage = "s3://no-such-bucket-ftdist/runs"
    elif case == "unreachable":
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"
    else:
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        env["AWS_EC2_METADATA_DISABLED"] = "true"
    job = write_job(tiny_job_dict(storage))
    r = _cli(["train", str(job)], env, tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert s3_server.secret_key not in r.stderr + r.stdout
    # Nothing written.
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_check_access_messages(s3_server):
    bucket = s3_server.make_bucket("acc-" + os.urandom(4).hex())
    s3.check_access(f"s3://{bucket}/x")  # fine: leaves nothing behind
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    with pytest.raises(SpecError, match="does not exist"):
        s3.check_access("s3://ftdist-missing-bucket/x")




def test_prepared_data_on_s3_is_reused_verified_per_node_and_rebuilt_when_corrupt(s3_server, tmp_path, monkeypatch):
    """The prepared-data entry on the S3 server: built once, found by the next preparation, downloaded once into this
    node's cache and verified; an object replaced by one of the same size but other bytes is detected (BLAKE3), the
    entry discarded and built again, the bad bytes never read as tokens."""
    import boto3

    from ftdist.spec import spec_from_dict
    from ftdist.storage.uri import split_s3
    from ftdist.train import prepare as prep
    from ftdist.train.locations import load_tokenizer
    from ftdist.train.objectives import objective_for
    from tests.conftest import QS

    monkeypatch.setenv("FTDIST_CACHE", str(tmp_path / "node-cache"))
    bucket = s3_server.make_bucket("prep-" + os.urandom(4).hex())
    spec = spec_from_dict(tiny_job_dict(f"s3://{bucket}/runs"))
    tok, objective = load_tokenizer(str(QS / "tokenizer")), objective_for(spec)
    first, built = prep.ensure_prepared(spec, tok, objective)
    again, built_again = prep.ensure_prepared(spec, tok, objective)
    assert built and not built_again and again == first
    splits = prep.open_splits(spec, first, prep.local_parts(spec, first), objective)
    good = splits.train[:50]
    assert len(splits.train) == first.train_rows == 2600 and len(splits.eval) == 400

    client = boto3.client("s3", endpoint_url=s3.endpoint_url())
    part = first.train[0]
    b, key = split_s3(f"{prep.prepared_entry(spec, first.key)}/{part.path}")
    raw = bytearray(client.get_object(Bucket=b, Key=key)["Body"].read())
    raw[len(raw) // 2] ^= 0xFF
    client.put_object(Bucket=b, Key=key, Body=bytes(raw))
    shutil.rmtree(tmp_path / "node-cache")  # a node that has not seen the entry yet downloads the damaged object
    rebuilt, built = prep.ensure_prepared(spec, tok, objective)
    assert built and rebuilt.train[0].path != part.path  # a new attempt's parts
    again = prep.open_splits(spec, rebuilt, prep.local_parts(spec, rebuilt), objective)
    assert again.train[:50] == good
