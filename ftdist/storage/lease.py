"""A run lease in checkpoint storage: at most one live attempt writes `<storage>/<job name>` at a time.

Attempts of the same job (a re-run on a laptop, a resubmitted Ray job, a retried RayJob on a fresh cluster, or a
hand-made second RayJob) share the checkpoint prefix by design: that is how they resume. Two of them alive at once
would interleave checkpoints and retention. The lease is a sequence of generation files
`_ftdist_lease/NNNNNNNN.json`, each created with a conditional write (S3 If-None-Match / an atomic link locally),
so of two attempts racing for the next generation exactly one wins. The holder rewrites its file every
`ttl/4` seconds (heartbeat); an attempt finding a holder with a fresh heartbeat is refused with a one-line error;
one whose heartbeat is older than the TTL (the attempt died: pod deleted, node lost) is taken over. A holder that
finds a newer generation than its own (it stalled past the TTL and was taken over) stops its run.
"""

from __future__ import annotations

import _thread
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from ftdist.errors import SpecError

LEASE_DIR = "_ftdist_lease"
TTL_ENV = "FTDIST_LEASE_TTL_S"
TTL_S = 120.0
DEFAULT_TTL_S = float(os.environ.get(TTL_ENV, TTL_S))
WAIT_ENV = "FTDIST_LEASE_WAIT_S"
"""Seconds a new attempt waits for a live-looking lease to expire before refusing (default 0: refuse at once). A
rendered RayJob sets it: its retry starts on a fresh cluster seconds after the failed attempt's driver died, while
that driver's lease still looks live; refusing would burn the retry."""
KEEP_GENERATIONS = 5


def _holder() -> dict:
    where = {"host": socket.gethostname(), "pid": os.getpid()}
    for k, env in (("ray_job", "RAY_JOB_ID"), ("submission", "RAY_JOB_SUBMISSION_ID"), ("pod", "HOSTNAME")):
        if os.environ.get(env):
            where[k] = os.environ[env]
    return where


def _dead_here(lease: dict) -> bool:
    """The holder ran on this machine and its process is gone (killed): no need to wait for the TTL."""
    h = lease.get("holder", {})
    if h.get("host") != socket.gethostname() or not isinstance(h.get("pid"), int):
        return False
    try:
        os.kill(h["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Lease:
    store: object  # ftdist.storage.store.Store of the run folder
    what: str  # the run folder's URI, for messages
    ttl_s: float = DEFAULT_TTL_S
    wait_s: float = 0.0
    generation: int = 0
    token: str = ""
    lost: bool = False
    _stop: Optional[threading.Event] = None
    _thread: Optional[threading.Thread] = None

    def _key(self, gen: int) -> str:
        return f"{LEASE_DIR}/{gen:08d}.json"

    def _generations(self) -> list[int]:
        gens = []
        for key in self.store.list(LEASE_DIR):
            name = key.rsplit("/", 1)[-1]
            if name.endswith(".json") and name[:-5].isdigit():
                gens.append(int(name[:-5]))
        return sorted(gens)

    def _read(self, gen: int) -> Optional[dict]:
        raw = self.store.get_bytes(self._key(gen))
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def _body(self, released: bool = False) -> bytes:
        return json.dumps({"token": self.token, "generation": self.generation, "holder": _holder(),
                           "heartbeat": time.time(), "ttl_s": self.ttl_s, "released": released}).encode()

    def _live(self, gens: list[int]) -> Optional[tuple[dict, float]]:
        """(the newest generation's record, its heartbeat's age) when a live attempt holds the lease."""
        if not gens:
            return None
        cur = self._read(gens[-1]) or {}
        age = time.time() - float(cur.get("heartbeat", 0))
        if cur.get("released") or age >= float(cur.get("ttl_s", self.ttl_s)) or _dead_here(cur):
            return None
        return cur, age

    def refuse_if_held(self) -> list[int]:
        """Read only: SpecError when a live attempt holds the lease (the driver's preflight asks before Ray starts),
        after waiting up to `wait_s` for it to be released or expire; returns the generations found."""
        deadline = time.monotonic() + self.wait_s
        said = False
        while True:
            gens = self._generations()
            live = self._live(gens)
            if live is None:
                return gens
            cur, age = live
            ttl = float(cur.get("ttl_s", self.ttl_s))
            who = ", ".join(f"{k} {v}" for k, v in cur.get("holder", {}).items())
            left = deadline - time.monotonic()
            if left <= 0:
                raise SpecError(f"{self.what}: another attempt of this job is running ({who}; heartbeat {age:.0f} s "
                                f"ago); two would write over each other's checkpoints. Stop it, or wait "
                                f"{ttl:.0f} s after it died")
            if not said:
                print(f"[ftdist] {self.what}: the run lease is held ({who}; heartbeat {age:.0f} s ago); waiting up "
                      f"to {left:.0f} s for it to expire (a previous attempt that died) or be released",
                      file=sys.stderr, flush=True)
                said = True
            time.sleep(min(5.0, max(0.05, ttl / 8), left))

    def acquire(self) -> "Lease":
        gens = self.refuse_if_held()
        self.generation = (gens[-1] if gens else 0) + 1
        self.token = uuid.uuid4().hex
        if not self.store.put_bytes(self._key(self.generation), self._body(), if_absent=True):
            raise SpecError(f"{self.what}: another attempt of this job started at the same moment; it runs, this one "
                            f"stops")
        for g in gens[:-KEEP_GENERATIONS]:  # keep a short history for `ls`, drop the rest
            self.store.delete_prefix(self._key(g), first=[self._key(g)])
        return self

    def check(self) -> bool:
        """Still ours? False once a newer generation exists (we were taken over after stalling past the TTL). Also
        the fence of this attempt's processes without the heartbeat: a worker checks right before it commits or
        deletes a checkpoint, so an attempt that stalled and was taken over finds out before it writes, not one
        heartbeat later."""
        gens = self._generations()
        return not gens or gens[-1] == self.generation

    def heartbeat(self) -> None:
        if not self.check():
            self.lost = True
            return
        self.store.put_bytes(self._key(self.generation), self._body())

    def start(self, on_lost=None) -> "Lease":
        """Heartbeat in a daemon thread; on loss, print one line and interrupt the main thread (stops the run)."""
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    self.heartbeat()
                except Exception as e:  # noqa: BLE001  (a storage blip: the next beat retries; TTL covers 3 misses)
                    print(f"[ftdist] lease heartbeat failed ({e.__class__.__name__}); retrying", file=sys.stderr)
                    continue
                if self.lost:
                    print(f"ftdist: error: {self.what}: lost the run lease to a newer attempt (this one stalled "
                          f"for over {self.ttl_s:.0f} s); stopping so the two do not both write checkpoints",
                          file=sys.stderr, flush=True)
                    (on_lost or _thread.interrupt_main)()
                    return

        self._thread = threading.Thread(target=loop, name="ftdist-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self.generation and not self.lost and self.check():
            self.store.put_bytes(self._key(self.generation), self._body(released=True))

    def __enter__(self) -> "Lease":
        return self.acquire().start()

    def __exit__(self, *exc) -> None:
        self.release()


def run_lease(uri: str, ttl_s: Optional[float] = None, wait_s: Optional[float] = None) -> Lease:
    from ftdist.storage.store import open_store  # (boto3: not on the path of `ftdist k8s render`, which reads the
    # constants above)

    return Lease(open_store(uri), uri, ttl_s if ttl_s is not None else DEFAULT_TTL_S,
                 wait_s if wait_s is not None else float(os.environ.get(WAIT_ENV, "0") or 0))


GROUP_DIR = f"{LEASE_DIR}/groups"


@dataclass
class GroupFence:
    """The fence of one worker group inside a lease generation. Ray Train restarts the worker group within one
    attempt (a lost worker, an elastic resize), and a replaced group's rank 0 may still be finishing an asynchronous
    commit, or its retention, while the new group starts: measured on a 3-node cluster, the old group committed step
    8 after the new group had resumed from step 4, whose own step-8 commit then failed as "committed by another
    writer", attempt after attempt. So each group's rank 0 claims the next number `<generation>-<n>` (a conditional
    create) before it picks its resume point, and a commit or deletion goes ahead only while no later group of the
    generation exists and the generation is the lease's newest. (What stays open: a commit that passed its check in
    the moment before the new group's claim; the window is one request.)"""

    lease: Lease
    number: int = 0

    def _prefix(self) -> str:
        return f"{GROUP_DIR}/{self.lease.generation:08d}-"

    def _numbers(self) -> list[int]:
        out = []
        for key in self.lease.store.list(GROUP_DIR):
            name = key.rsplit("/", 1)[-1]
            gen, _, n = name.partition("-")
            if gen == f"{self.lease.generation:08d}" and n.isdigit():
                out.append(int(n))
        return sorted(out)

    def claim(self) -> int:
        """Rank 0 of a new group: take the next number (retrying when a racing claim took it)."""
        while True:
            taken = self._numbers()
            n = (taken[-1] if taken else 0) + 1
            if self.lease.store.put_bytes(f"{self._prefix()}{n:06d}", json.dumps({"holder": _holder()}).encode(),
                                          if_absent=True):
                self.number = n
                return n

    def check(self) -> bool:
        numbers = self._numbers()
        leased = self.lease.generation == 0 or self.lease.check()  # (0: a sweep trial, which holds no lease)
        return leased and (not numbers or numbers[-1] == self.number)
