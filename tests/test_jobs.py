"""Every job file shipped in jobs/ validates."""

from pathlib import Path

import pytest

from ftdist.spec import load_spec

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


def test_there_are_jobs():
    assert len(JOBS) >= 3


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_file_validates(path):
    spec = load_spec(path)
    assert spec.name
    if path.name == "quickstart.yaml":
        assert spec.resources.num_workers == 2 and spec.zero.stage in (2, 3) and spec.has_eval
        assert Path(spec.data.train).is_file() and Path(spec.model.tokenizer).is_dir()
