
"""The run lease on local storage: one live attempt per job folder; a dead holder is taken over, a stalled one
that was taken over finds out."""

from __future__ import annotations

import json
import socket
import time

from ftdist.storage.lease import LEASE_DIR, run_lease
from ftdist.storage.store import open_store
from tests.support.leases import foreign_lease, lease_cycle


def test_lease_local(tmp_path):
    lease_cycle(str(tmp_path / "run"))


def test_dead_local_holder_is_taken_over_at_once(tmp_path):
    store = open_store(str(tmp_path))
    body = {"token": "x", "generation": 1, "holder": {"host": socket.gethostname(), "pid": 2**22 + 7},  # no such pid
            "heartbeat": time.time(), "ttl_s": 120, "released": False}
    store.put_bytes(f"{LEASE_DIR}/00000001.json", json.dumps(body).encode())
    assert run_lease(str(tmp_path)).acquire().generation == 2


def test_heartbeat_thread_stops_a_run_that_lost_its_lease(tmp_path):
    lost = []
    lease = run_lease(str(tmp_path), ttl_s=0.2).acquire().start(on_lost=lambda: lost.append(True))
    foreign_lease(open_store(str(tmp_path)), 2, age_s=0)
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost == [True] and lease.lost
    lease.release()
