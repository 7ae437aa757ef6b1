"""Tracking against a real MLflow tracking server (SQLite backend, local artifact root, basic auth), TensorBoard
events read back with TensorBoard's own reader, the run report, and the reference sets' forgetting measure, on real
Ray Train + DeepSpeed runs."""

from __future__ import annotations

import csv
import io
import os
import shutil

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ftdist.cli import main
from ftdist.spec import spec_from_dict
from ftdist.storage.checkpoints import MANIFEST
from ftdist.train.driver import run_training
from ftdist.train.obs.tracking import flat_params
from tests.conftest import REPO, tiny_job_dict

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed]

REFERENCE = str(REPO / "jobs" / "data" / "upstream" / "heldout.jsonl")


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """{step: value} of a metric, asserting no step was logged twice."""
    points = client.get_metric_history(run_id, key)
    steps = [m.step for m in points]
    assert len(steps) == len(set(steps)), (key, sorted(steps))
    return {m.step: m.value for m in points}


def test_a_resumed_run_continues_the_same_tracking_run_without_duplicate_steps(ray_cluster, mlflow_server,
                                                                                s3_credentials, tmp_path, capsys):
    """Attempt 1 runs to step 6 (checkpoints at 4 and 6) and its step-6 checkpoint loses its commit marker, as when
    an attempt dies after logging a step but before committing it; attempt 2 resumes at 4, replays 5 and 6, and runs
    to 8."""
    store = str(tmp_path / "store")
    sections = dict(name="tracked", export={"enabled": False},
                    tracking={"mlflow": {"tracking_uri": mlflow_server.uri, "experiment": "ftdist-tests"}},
                    eval={"every_n_steps": 2, "max_batches": 2, "reference": [REFERENCE]},
                    checkpoint={"every_n_steps": 4, "keep_last": 3})
    optim = tiny_job_dict("x")["optim"]
    first = spec_from_dict(tiny_job_dict(store, optim={**optim, "max_steps": 6}, **sections))
    s1 = run_training(first)
    assert s1.error is None, s1.error
    os.remove(f"{store}/tracked/step_00000006/{MANIFEST}")
    s2 = run_training(spec_from_dict(tiny_job_dict(store, optim={**optim, "max_steps": 8}, **sections)))
    assert s2.error is None, s2.error
    assert s2.state.resumes == [4]

    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ftdist-tests").experiment_id])
    rid = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    tags = run.data.tags
    assert (tags["ftdist.job"], tags["ftdist.attempt"], tags["ftdist.world_size"]) == ("tracked", "2", "2")
    assert tags["ftdist.version"] and tags["ftdist.checkpoint_uri"] == s2.checkpoint
    assert run.data.params == flat_params(first)  # logged once, by the attempt that created the run
    loss = _history(client, rid, "loss")
    assert sorted(loss) == list(range(1, 9))
    ours = {h["step"]: h for h in s2.history}
    for step in (1, 2, 3, 4, 7, 8):  # 5 and 6 hold the first attempt's values (the same to float noise)
        assert loss[step] == pytest.approx(ours[step]["loss"], rel=1e-6)
    reference = _history(client, rid, "eval_ref_heldout_loss")
    assert sorted(reference) == [0, 2, 4, 6, 8]
    assert reference[8] == pytest.approx(ours[8]["eval_ref_heldout_loss"], rel=1e-6)
    assert sorted(_history(client, rid, "eval_loss")) == [0, 2, 4, 6, 8]
    artifacts = {a.path for d in ("report", "ftdist") for a in client.list_artifacts(rid, d)}
    assert artifacts == {"report/metrics.csv", "report/curves.png", "report/report.md", "ftdist/outputs.json"}

    # TensorBoard: every step once; the second attempt's purge step drops the first attempt's 5 and 6.
    events = EventAccumulator(f"{store}/tracked/tensorboard")
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("loss")}
    assert sorted(tb) == list(range(1, 9)) and len(events.Scalars("loss")) == 8
    for step in range(1, 9):
        assert tb[step] == pytest.approx(ours[step]["loss"], rel=1e-5)
    assert [e.step for e in events.Scalars("eval_ref_heldout_loss")] == [0, 2, 4, 6, 8]

    # The run report in the run folder; `ftdist report` rebuilds the same from storage.
    run_dir = tmp_path / "store" / "tracked"
    md = (run_dir / "report" / "report.md").read_text()
    assert "## Forgetting" in md and "| heldout |" in md and "resumed at: 4" in md
    rows = list(csv.DictReader(io.StringIO((run_dir / "report" / "metrics.csv").read_text())))
    assert [int(r["step"]) for r in rows] == list(range(0, 9))
    assert float(rows[-1]["eval_ref_heldout_loss"]) == pytest.approx(ours[8]["eval_ref_heldout_loss"])
    before = (run_dir / "report" / "metrics.csv").read_text()
    shutil.rmtree(run_dir / "report")
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    assert "## Forgetting" in capsys.readouterr().out
    assert (run_dir / "report" / "metrics.csv").read_text() == before

    # No credential anywhere the server stores things, nor in the run folder.
    secrets = [mlflow_server.password.encode(), s3_credentials[1].encode()]
    files = mlflow_server.files() + [str(p) for p in tmp_path.rglob("*") if p.is_file()]
    for path in files:
        with open(path, "rb") as fh:
            data = fh.read()
        assert not any(s in data for s in secrets), path


def test_credentials_the_server_refuses_are_one_line_before_ray(mlflow_server, tmp_path, write_job, monkeypatch,
                                                                capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    job = write_job(tiny_job_dict(str(tmp_path / "runs"), tracking={"mlflow": {"tracking_uri": mlflow_server.uri}}))
    assert main(["train", str(job)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the server refused the credentials" in err[0], err
    assert "not-the-password" not in err[0]
    assert not (tmp_path / "runs").exists()


def test_full_fine_tuning_forgets_more_than_lora_and_the_wise_ft_curve_spans_them(ray_cluster, tmp_path, capsys):
    """The upstream model (pre-trained on Python's docs) fine-tuned on the number-spelling task, 16 steps at the
    same constant lr 3e-3: the reference set's loss (its held-out docs) rises under full fine-tuning and much less
    under LoRA. The WiSE-FT curve of the full run: alpha 0 is the base model (its step-0 losses), alpha 1 the
    fine-tuned one (its last eval)."""
    upstream = str(REPO / "jobs" / "data" / "upstream" / "model")
    change, history = {}, {}
    for method in ("full", "lora"):
        job = tiny_job_dict(str(tmp_path / "store"), name=f"forget-{method}", method=method,
                            model={"name_or_path": upstream, "from_config": None, "tokenizer": None,
                                   "dtype": "fp32"},
                            optim={"lr": 3e-3, "max_steps": 16, "schedule": "constant"},
                            eval={"reference": [REFERENCE], "max_batches": None},
                            checkpoint={"every_n_steps": 16}, export={"enabled": False})
        s = run_training(spec_from_dict(job))
        assert s.error is None, s.error
        history[method] = {h["step"]: h for h in s.history if "eval_ref_heldout_loss" in h}
        assert sorted(history[method]) == [0, 16]
        change[method] = history[method][16]["eval_ref_heldout_loss"] - history[method][0]["eval_ref_heldout_loss"]
    assert change["full"] > 1.0 and 0 <= change["lora"] < 0.5 * change["full"], change

    run = tmp_path / "store" / "forget-full"
    capsys.readouterr()
    assert main(["export", str(run / "step_00000016"), "--interpolate", "0,0.5,1", "--eval"]) == 0
    curve = {float(r["alpha"]): r for r in csv.DictReader((run / "report" / "wise_ft.csv").open())}
    for alpha, step in ((0.0, 0), (1.0, 16)):
        for key in ("eval_ref_heldout_loss", "eval_loss"):
            assert float(curve[alpha][key]) == pytest.approx(history["full"][step][key], rel=1e-4), (alpha, key)
    middle = float(curve[0.5]["eval_ref_heldout_loss"])
    assert history["full"][0]["eval_ref_heldout_loss"] < middle < history["full"][16]["eval_ref_heldout_loss"]
    assert "| 0.5 |" in capsys.readouterr().out and (run / "report" / "wise_ft.png").is_file()
