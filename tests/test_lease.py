"""The run lease: one live attempt per job folder (local and on a real S3 server); a dead holder is taken over,
a stalled one that was taken over finds out; `ftdist train` refuses a second live attempt in one line."""

from __future__ import annotations

import json
import socket
import time

import pytest
import yaml

from ftdist.cli import main
from ftdist.errors import SpecError
from ftdist.storage.lease import LEASE_DIR, Lease, run_lease
from ftdist.storage.store import open_store
from tests.conftest import tiny_job_dict


def _foreign(store, gen: int, age_s: float, ttl_s: float = 120.0, released: bool = False) -> None:
    """A lease file as another machine's attempt would have written it."""
    body = {"token": "x", "generation": gen, "holder": {"host": "gpu-node-7", "pid": 4242, "pod": "ftdist-x-head"},
            "heartbeat": time.time() - age_s, "ttl_s": ttl_s, "released": released}
    store.put_bytes(f"{LEASE_DIR}/{gen:08d}.json", json.dumps(body).encode())


def _lease_cycle(uri: str) -> None:
    store = open_store(uri)
    a = run_lease(uri, ttl_s=30).acquire()
    assert a.generation == 1 and a.check()
    with pytest.raises(SpecError, match=r"another attempt of this job is running \(host .*; heartbeat \d+ s ago\)"):
        run_lease(uri, ttl_s=30).acquire()
    a.release()  # released: the next attempt may start at once
    b = run_lease(uri, ttl_s=30).acquire()
    assert b.generation == 2
    # b's machine is lost (heartbeat older than the TTL, other host): c takes over; b finds out at its next beat
    _foreign(store, 2, age_s=31, ttl_s=30)
    c = run_lease(uri, ttl_s=30).acquire()
    assert c.generation == 3
    b.heartbeat()
    assert b.lost and not b.check()
    b.release()  # a lost lease is not written any more
    assert json.loads(store.get_bytes(f"{LEASE_DIR}/00000003.json"))["token"] == c.token
    # a live attempt on another machine blocks; racing for the same generation, exactly one wins
    _foreign(store, 4, age_s=1)
    with pytest.raises(SpecError, match=r"host gpu-node-7, pid 4242, pod ftdist-x-head; heartbeat \d+ s ago"):
        run_lease(uri).acquire()
    _foreign(store, 4, age_s=1, released=True)
    x, y = Lease(store, uri, 30), Lease(store, uri, 30)
    x.generation = y.generation = 5
    assert store.put_bytes(x._key(5), b"{}", if_absent=True) is True
    assert store.put_bytes(y._key(5), b"{}", if_absent=True) is False


def test_lease_local(tmp_path):
    _lease_cycle(str(tmp_path / "run"))


@pytest.mark.s3
def test_lease_on_s3(bucket):
    _lease_cycle(f"s3://{bucket}/runs/job")


def test_dead_local_holder_is_taken_over_at_once(tmp_path):
    store = open_store(str(tmp_path))
    body = {"token": "x", "generation": 1, "holder": {"host": socket.gethostname(), "pid": 2**22 + 7},  # no such pid
            "heartbeat": time.time(), "ttl_s": 120, "released": False}
    store.put_bytes(f"{LEASE_DIR}/00000001.json", json.dumps(body).encode())
    assert run_lease(str(tmp_path)).acquire().generation == 2


def test_heartbeat_thread_stops_a_run_that_lost_its_lease(tmp_path):
    lost = []
    lease = run_lease(str(tmp_path), ttl_s=0.2).acquire().start(on_lost=lambda: lost.append(True))
    _foreign(open_store(str(tmp_path)), 2, age_s=0)
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost == [True] and lease.lost
    lease.release()


@pytest.mark.ray
def test_train_refuses_a_second_live_attempt(ray_cluster, tmp_path, capsys):
    job = tiny_job_dict(str(tmp_path / "store"))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    _foreign(open_store(str(tmp_path / "store" / "tiny")), 1, age_s=5)
    assert main(["train", str(path)]) == 2
    import re

    # Ray's own daemons may forward a warning of theirs (e.g. the raylet's "disk over 95% full"): not ftdist's output.
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "(raylet)" not in line]
    assert len(err) == 1 and re.fullmatch(
        re.escape(f"ftdist: error: {tmp_path}/store/tiny: another attempt of this job is running (host gpu-node-7, "
                  f"pid 4242, pod ftdist-x-head; heartbeat ") + r"\d+" + re.escape(
            " s ago); two would write over each other's checkpoints. Stop it, or wait 120 s after it died"), err[0])
