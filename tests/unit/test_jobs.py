"""Every job file shipped in jobs/ validates, through `ftdist validate` itself (cluster jobs name inputs on their
nodes, so they validate with --no-local-check; the laptop jobs with every input checked)."""

from pathlib import Path

import pytest

from ftdist.cli import main
from ftdist.spec import load_spec

JOBS = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.yaml"))
LAPTOP_JOBS = ("quickstart.yaml", "quickstart-sweep.yaml")


def test_there_are_jobs():
    assert len(JOBS) >= 3


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_job_file_validates(path, capsys):
    flags = [] if path.name in LAPTOP_JOBS else ["--no-local-check"]
    assert main(["validate", str(path), *flags]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"{path}: ok (")
    spec = load_spec(path)
    assert spec.name == path.read_text().split("\nname: ", 1)[1].split()[0]
    if path.name == "quickstart.yaml":
        assert spec.resources.num_workers == 2 and spec.zero.stage in (2, 3) and spec.has_eval
        assert Path(spec.data.train).is_file() and Path(spec.model.tokenizer_path).is_dir()
        assert spec.model.from_config is None  # it fine-tunes the shipped pre-trained model (jobs/data/upstream)


def test_cluster_job_without_the_flag_names_the_missing_input(capsys):
    qwen = next(p for p in JOBS if p.name.startswith("qwen"))
    assert main(["validate", str(qwen)]) == 2
    assert "data.train: /mnt/data/support-chats: no such file or directory" in capsys.readouterr().err
