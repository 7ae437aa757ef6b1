"""Lease files as other attempts write them, and the lease life cycle run against any store (local, S3)."""

from __future__ import annotations

import json
import time

import pytest

from ftdist.errors import SpecError
from ftdist.storage.lease import LEASE_DIR, Lease, run_lease
from ftdist.storage.store import open_store


def foreign_lease(store, gen: int, age_s: float, ttl_s: float = 120.0, released: bool = False) -> None:
    """A lease file as another machine's attempt would have written it."""
    body = {"token": "x", "generation": gen, "holder": {"host": "gpu-node-7", "pid": 4242, "pod": "ftdist-x-head"},
            "heartbeat": time.time() - age_s, "ttl_s": ttl_s, "released": released}
    store.put_bytes(f"{LEASE_DIR}/{gen:08d}.json", json.dumps(body).encode())


def lease_cycle(uri: str) -> None:
    """Acquire, refuse, release, take over a dead holder, lose to a newer attempt, race: on any store."""
    store = open_store(uri)
    a = run_lease(uri, ttl_s=30).acquire()
    assert a.generation == 1 and a.check()
    with pytest.raises(SpecError, match=r"another attempt of this job is running \(host .*; heartbeat \d+ s ago\)"):
        run_lease(uri, ttl_s=30).acquire()
    a.release()  # released: the next attempt may start at once
    b = run_lease(uri, ttl_s=30).acquire()
    assert b.generation == 2
    # b's machine is lost (heartbeat older than the TTL, other host): c takes over; b finds out at its next beat
    foreign_lease(store, 2, age_s=31, ttl_s=30)
    c = run_lease(uri, ttl_s=30).acquire()
    assert c.generation == 3
    b.heartbeat()
    assert b.lost and not b.check()
    b.release()  # a lost lease is not written any more
    assert json.loads(store.get_bytes(f"{LEASE_DIR}/00000003.json"))["token"] == c.token
    # a live attempt on another machine blocks; racing for the same generation, exactly one wins
    foreign_lease(store, 4, age_s=1)
    with pytest.raises(SpecError, match=r"host gpu-node-7, pid 4242, pod ftdist-x-head; heartbeat \d+ s ago"):
        run_lease(uri).acquire()
    foreign_lease(store, 4, age_s=1, released=True)
    x, y = Lease(store, uri, 30), Lease(store, uri, 30)
    x.generation = y.generation = 5
    assert store.put_bytes(x._key(5), b"{}", if_absent=True) is True
    assert store.put_bytes(y._key(5), b"{}", if_absent=True) is False

