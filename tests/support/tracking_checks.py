"""What a tracked run must have left behind after an attempt died between logging a step and committing its
checkpoint and a re-run resumed (tests/integration/test_train.py's resume test): one MLflow run with every step once,
TensorBoard events with the replayed steps purged, the run report (and `ftdist report` rebuilding it), no secret."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ftdist.cli import main
from ftdist.spec import JobSpec
from ftdist.train.obs.tracking import flat_params


def metric_history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """{step: value} of a metric, asserting no step was logged twice."""
    points = client.get_metric_history(run_id, key)
    steps = [m.step for m in points]
    assert len(steps) == len(set(steps)), (key, sorted(steps))
    return {m.step: m.value for m in points}


def check_one_tracking_run(server, experiment: str, first: JobSpec, history: list[dict], checkpoint: str,
                           last_step: int, replayed: set[int], eval_steps: list[int]) -> None:
    """MLflow: one FINISHED run, the second attempt's tags, the first attempt's params, each step once (the
    `replayed` ones hold the first attempt's values), artifacts. TensorBoard: each step once, the replayed ones
    the second attempt's."""
    ours = {h["step"]: h for h in history}
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    rid = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == first.name
    tags = run.data.tags
    assert (tags["ftdist.job"], tags["ftdist.attempt"], tags["ftdist.world_size"]) == (first.name, "2", "2")
    assert tags["ftdist.version"] and tags["ftdist.checkpoint_uri"] == checkpoint
    assert run.data.params == flat_params(first)  # logged once, by the attempt that created the run
    loss = metric_history(client, rid, "loss")
    assert sorted(loss) == list(range(1, last_step + 1))
    for step in set(loss) - replayed:
        assert loss[step] == pytest.approx(ours[step]["loss"], rel=1e-6)
    for step in replayed:  # the first attempt's values: the same computation, to float noise
        assert loss[step] == pytest.approx(ours[step]["loss"], rel=1e-4)
    reference = metric_history(client, rid, "eval_ref_heldout_loss")
    assert sorted(reference) == eval_steps
    assert reference[last_step] == pytest.approx(ours[last_step]["eval_ref_heldout_loss"], rel=1e-6)
    assert sorted(metric_history(client, rid, "eval_loss")) == eval_steps
    artifacts = {a.path for d in ("report", "ftdist") for a in client.list_artifacts(rid, d)}
    assert artifacts == {"report/metrics.csv", "report/curves.png", "report/report.md", "ftdist/outputs.json"}

    events = EventAccumulator(str(Path(first.run_dir) / "tensorboard"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("loss")}
    assert sorted(tb) == list(range(1, last_step + 1)) and len(events.Scalars("loss")) == last_step
    for step in tb:
        assert tb[step] == pytest.approx(ours[step]["loss"], rel=1e-6)
    assert [e.step for e in events.Scalars("eval_ref_heldout_loss")] == eval_steps


def check_run_report(run_dir: Path, history: list[dict], resumed_at: int, capsys) -> None:
    """report/ in the run folder: the forgetting table, every logged row; `ftdist report` rebuilds it."""
    last = history[-1]
    md = (run_dir / "report" / "report.md").read_text()
    assert "## Forgetting" in md and "| heldout |" in md and f"resumed at: {resumed_at}" in md
    rows = list(csv.DictReader(io.StringIO((run_dir / "report" / "metrics.csv").read_text())))
    assert [int(r["step"]) for r in rows] == [h["step"] for h in history]
    assert float(rows[-1]["eval_ref_heldout_loss"]) == pytest.approx(last["eval_ref_heldout_loss"])
    before = (run_dir / "report" / "metrics.csv").read_text()
    shutil.rmtree(run_dir / "report")
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    assert "## Forgetting" in capsys.readouterr().out
    assert (run_dir / "report" / "metrics.csv").read_text() == before


def check_no_secret(paths: list[str], secrets: list[str]) -> None:
    """No credential value in any of these files (a tracking server's stores, a run folder)."""
    needles = [s.encode() for s in secrets]
    for path in paths:
        with open(path, "rb") as fh:
            data = fh.read()
        assert not any(n in data for n in needles), path
