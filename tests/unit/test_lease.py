
"""The run lease on local storage: one live attempt per job folder; a dead holder is taken over, a stalled one
that was taken over finds out."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from ftdist.errors import SpecError
from ftdist.storage.checkpoints import CheckpointStore, FencedError, checkpoint_name
from ftdist.storage.lease import LEASE_DIR, run_lease
from ftdist.storage.manifest import CheckpointMeta
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


def test_a_retry_waits_for_the_dead_attempts_lease_to_expire(tmp_path, capsys):
    """A retried RayJob starts while the failed attempt's lease still looks live (its driver died seconds ago on
    another machine): with a wait it takes over once the heartbeat is older than the TTL; a live holder (heartbeat
    kept fresh) is still refused once the wait is over."""
    store = open_store(str(tmp_path))
    foreign_lease(store, 1, age_s=0.5, ttl_s=1.5)  # dies now: expires one second from here
    t0 = time.monotonic()
    lease = run_lease(str(tmp_path), ttl_s=30, wait_s=10).acquire()
    assert lease.generation == 2 and 0.8 < time.monotonic() - t0 < 5
    assert "waiting up to" in capsys.readouterr().err
    lease.release()
    foreign_lease(store, 3, age_s=0, ttl_s=60)  # alive
    with pytest.raises(SpecError, match="another attempt of this job is running"):
        run_lease(str(tmp_path), ttl_s=30, wait_s=0.3).acquire()


def test_a_taken_over_attempt_can_neither_commit_nor_delete_checkpoints(tmp_path):
    """Fencing: the workers of an attempt that stalled past its lease and was taken over check the generation right
    before they commit or delete (CheckpointStore's `fence`), so nothing of theirs lands after the takeover."""
    job = str(tmp_path / "job")
    old = run_lease(job, ttl_s=30).acquire()
    store = CheckpointStore(job)
    meta = CheckpointMeta(step=2, zero_stage=2, method="full", job_name="job", spec_sha256="0" * 64)
    for step in (2, 4, 6):
        write_checkpoint(store, step, meta)
        store.commit(checkpoint_name(step), 1, meta.model_copy(update={"step": step}), fence=old.check)
    foreign_lease(open_store(job), old.generation + 1, age_s=0)  # the new attempt took over
    write_checkpoint(store, 8, meta)
    with pytest.raises(FencedError, match="newer attempt"):
        store.commit(checkpoint_name(8), 1, meta.model_copy(update={"step": 8}), fence=old.check)
    assert store.read_manifest(checkpoint_name(8)) is None
    with pytest.raises(FencedError):
        store.apply_retention(1, fence=old.check)
    assert [c.step for c in store.checkpoints()] == [2, 4, 6]


def write_checkpoint(store: CheckpointStore, step: int, meta: CheckpointMeta, rank: int = 0) -> None:
    """One rank's files of a checkpoint, uploaded (not yet committed)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"), "wb") as fh:
            fh.write(os.urandom(64))
        store.upload_rank(d, checkpoint_name(step), rank)


def test_preflight_notes_a_resume_on_another_number_of_workers(tmp_path):
    """A checkpoint of 2 workers and a job of 1: no refusal any more (it resumes from the universal form), one note."""
    from ftdist.spec import spec_from_dict
    from ftdist.train.driver import preflight_storage
    from tests.conftest import tiny_job_dict

    spec = spec_from_dict(tiny_job_dict(str(tmp_path / "store"), resources={"num_workers": 1}))
    store = CheckpointStore(spec.run_dir)
    meta = CheckpointMeta(step=4, zero_stage=2, method="full", job_name="tiny", spec_sha256="0" * 64)
    write_checkpoint(store, 4, meta)
    assert preflight_storage(spec) is None  # nothing committed yet
    write_checkpoint(store, 4, meta, rank=1)
    store.commit(checkpoint_name(4), 2, meta)
    note = preflight_storage(spec)
    assert note is not None and "written by 2 workers and this run has 1" in note and "universal" in note
