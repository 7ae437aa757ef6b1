"""The run lease on a real S3 server, and `ftdist train` refusing a second live attempt in one line (real Ray)."""

from __future__ import annotations

import re

import pytest
import yaml

from ftdist.cli import main
from ftdist.storage.store import open_store
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
