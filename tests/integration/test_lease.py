"""The run lease on a real S3 server, and `ftdist train` refusing a second live attempt in one line (real Ray)."""

from __future__ import annotations

import re
import threading
import time

import pytest
import yaml

from ftdist.cli import main
from ftdist.spec import spec_from_dict
from ftdist.storage.checkpoints import MANIFEST, CheckpointStore
from ftdist.storage.lease import LEASE_DIR
from ftdist.storage.store import open_store
from ftdist.train.driver import run_training
from tests.conftest import tiny_job_dict
from tests.support.leases import foreign_lease, lease_cycle


@pytest.mark.s3
def test_lease_on_s3(bucket):
    lease_cycle(f"s3://{bucket}/runs/job")


@pytest.mark.ray
def test_train_refuses_a_second_live_attempt(ray_cluster, tmp_path, capsys):
    job = tiny_job_dict(str(tmp_path / "store"))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    foreign_lease(open_store(str(tmp_path / "store" / "tiny")), 1, age_s=5)
    assert main(["train", str(path)]) == 2
    # Ray's own daemons may forward a warning of theirs (e.g. the raylet's "disk over 95% full"): not ftdist's output.
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "(raylet)" not in line]
    assert len(err) == 1 and re.fullmatch(
        re.escape(f"ftdist: error: {tmp_path}/store/tiny: another attempt of this job is running (host gpu-node-7, "
                  f"pid 4242, pod ftdist-x-head; heartbeat ") + r"\d+" + re.escape(
            " s ago); two would write over each other's checkpoints. Stop it, or wait 120 s after it died"), err[0])


@pytest.mark.ray
@pytest.mark.deepspeed
def test_the_workers_of_a_taken_over_attempt_cannot_commit(ray_cluster, tmp_path):
    """Fencing with real workers: while an attempt trains, a newer attempt takes the lease over (as one does after the
    first stalled past its TTL). The old attempt's workers go on training, but rank 0 checks the generation right
    before each commit: nothing of theirs is committed after the takeover (at most the one commit whose check came
    first), and the run stops with the reason. (The driver is this test's process, so the takeover writes the newer
    generation instead of pausing the driver with SIGSTOP; the driver's own heartbeat, 30 s apart here, is not what
    stops the workers.)"""
    job = tmp_path / "store" / "fenced"
    spec = spec_from_dict(tiny_job_dict(str(tmp_path / "store"), name="fenced",
                                        optim={**tiny_job_dict("x")["optim"], "max_steps": 60},
                                        checkpoint={"every_n_steps": 2, "keep_last": 100}, export={"enabled": False},
                                        eval={"max_batches": 1}))
    store = CheckpointStore(str(job))
    at_takeover: list = []

    def take_over() -> None:
        deadline = time.monotonic() + 300
        while not (job / "step_00000002" / MANIFEST).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        gens = sorted(int(p.stem) for p in (job / LEASE_DIR).glob("*.json"))
        foreign_lease(open_store(str(job)), gens[-1] + 1, age_s=0)
        at_takeover.extend(c.step for c in store.checkpoints())

    thread = threading.Thread(target=take_over)
    thread.start()
    s = run_training(spec)
    thread.join()
    assert s.error is not None and "newer attempt of this job holds the run lease" in str(s.error), s.error
    committed = [c.step for c in store.checkpoints()]
    assert committed[: len(at_takeover)] == at_takeover and max(committed) <= max(at_takeover) + 2, (
        at_takeover, committed)
    assert max(committed) < 60
    refused = [c.step for c in store.checkpoints(committed_only=False) if not c.committed]
    assert refused and min(refused) > max(at_takeover)  # uploaded, never committed
