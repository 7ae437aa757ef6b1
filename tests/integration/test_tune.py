"""`ftdist tune`, real sweeps: Ray Tune over 2-worker DeepSpeed LoRA trials with ASHA, results/report/retention/
export, and a killed sweep driver finished with --resume. Validation before any trial: tests/unit/test_sweep_space.py."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from ftdist.spec import with_overrides
from tests.conftest import sweep_job_dict as _sweep_job
from tests.conftest import tiny_job_dict


def _write(tmp_path: Path, job: dict) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(job))
    return p


def _tune(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftdist.cli", *args], capture_output=True, text=True, timeout=timeout)


def _address() -> list[str]:
    """Most sweeps join the session's Ray cluster (`--address`): no Ray start of their own (the ASHA test runs an
    embedded Ray beside it on purpose)."""
    import ray

    return ["--address", ray.get_runtime_context().gcs_address]


def _results(sweep_dir: Path) -> dict:
    """trial id -> rows of Tune's result.json (what Tune recorded, independent of ftdist's report)."""
    out = {}
    for d in sweep_dir.glob("trial-*"):
        f = d / "result.json"
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []
        out[d.name[len("trial-"):]] = rows
    return out


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.slow
def test_sweep_asha_report_retention_export(ray_cluster, mlflow_server, tmp_path):
    """Four trials (lr x rank), one at a time, in an embedded `ftdist tune` (no --address) beside the test session's
    Ray, a second local Ray on this machine: the first trial runs to max_steps, ASHA stops the lr-1e-4 ones at its
    first rung against it, and each trial after a stopped one still gets its workers, because Ray Train's
    placement-group cleaner is pointed at ftdist's own dashboard instead of auto-detecting "the" local Ray (it would
    otherwise leave the stopped trial's placement group in place and the next trial waiting)."""
    job = _sweep_job(str(tmp_path / "store"), tracking={"mlflow": {"tracking_uri": mlflow_server.uri}})
    job["sweep"]["space"]["optim.lr"] = [1e-2, 1e-4]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    r = subprocess.run([sys.executable, "-m", "ftdist.cli", "tune", str(_write(tmp_path, job))], capture_output=True,
                       text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "multiple active Ray instances" not in r.stderr
    sweep = tmp_path / "store" / "sweep"
    tune_rows = _results(sweep)
    assert len(tune_rows) == 4
    # The sweep's driver tokenised the data once (one entry, one attempt); every trial's workers opened it as is.
    (entry,) = (tmp_path / "store" / "_prepared").iterdir()
    assert len([d for d in entry.iterdir() if d.is_dir()]) == 1 and (entry / "manifest.json").is_file()
    assert not list(sweep.glob("*/_prepared"))
    steps = {t: max(row["step"] for row in rows) for t, rows in tune_rows.items()}
    assert sorted(steps.values())[-1] == 12
    early = [t for t, s in steps.items() if s < 12]
    assert early and min(steps.values()) >= 4, steps  # ASHA stopped some trials before max_steps, at a rung
    last = {t: rows[-1]["eval_loss"] for t, rows in tune_rows.items()}
    best = min(last, key=last.get)

    table = list(csv.DictReader((sweep / "report" / "results.csv").open()))
    assert [row["trial"] for row in table][0] == best  # best first, and it is the lowest reported metric
    assert {row["trial"]: float(row["eval_loss"]) for row in table} == pytest.approx(last)
    assert {row["trial"] for row in table if row["stopped_early"] == "yes"} == set(early)
    assert {row["trial"]: int(row["steps"]) for row in table} == steps
    for row in table:  # alpha_per_rank: 2.0
        assert float(row["lora.alpha"]) == 2 * int(row["lora.rank"])
    md = (sweep / "report" / "results.md").read_text()
    header = md.splitlines()[0]
    assert md.count(f"| {best} |") == 1 and header.startswith("| trial |") and "optim.lr" in header
    assert "lora.rank" in header and "stopped_early" in header and "eval_loss" in header
    assert all(float(row["worker_hours"]) > 0 for row in table)  # wall x workers, per trial (CPU: no GPU-hours)
    assert (sweep / "report" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"best trial {best}" in r.stdout

    # MLflow: the sweep is a parent run, each trial a child run with its metric history and swept params.
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    (parent,) = [run for run in runs if run.data.tags.get("ftdist.sweep") == "sweep"]
    children = {run.info.run_name: run for run in runs if run is not parent}
    assert sorted(children) == sorted(f"sweep-{t}" for t in tune_rows)
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children.values())
    best_run = children[f"sweep-{best}"]
    assert best_run.data.metrics["eval_loss"] == pytest.approx(last[best])
    assert best_run.data.params["optim.lr"] == str(float(table[0]["optim.lr"]))
    assert parent.info.status == "FINISHED" and parent.data.tags["ftdist.best_trial"] == best
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {"report/results.csv"}

    # Sweep-wide retention (keep_best_trials 1): only the best trial keeps checkpoints; its model is exported.
    kept = {d.parent.name for d in sweep.glob("train-*/step_*")}
    assert kept == {f"train-{best}"}
    assert (sweep / "export" / "adapter" / "adapter_model.safetensors").is_file()

    # sweep-report rebuilds the same table from storage.
    csv_before = (sweep / "report" / "results.csv").read_text()
    (sweep / "report" / "results.csv").unlink()
    r2 = _tune("sweep-report", str(sweep), timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert (sweep / "report" / "results.csv").read_text() == csv_before

    # keep_best_trials 0 with export_best: the best model is exported before retention deletes every checkpoint
    # (retention used to run first and the export found nothing, silently).
    from ftdist.sweep.report import finish, load_saved_spec

    shutil.rmtree(sweep / "export")
    out = finish(with_overrides(load_saved_spec(str(sweep)), {"sweep.keep_best_trials": 0}))
    assert out.exported == {"adapter": str(sweep / "export" / "adapter")}
    assert (sweep / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(sweep.glob("train-*/step_*/ftdist_manifest.json"))


def _kill_tree(proc: subprocess.Popen) -> None:
    parent = psutil.Process(proc.pid)
    procs = [parent, *parent.children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.slow
def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(ray_cluster, tmp_path):
    job = _sweep_job(str(tmp_path / "store"), name="resume",
                     sweep={"search": "grid", "space": {"optim.lr": [1e-2, 3e-3]},
                            "scheduler": {"type": "fifo"}, "keep_best_trials": 2, "export_best": False},
                     optim={**tiny_job_dict("x")["optim"], "lr": 1e-2, "max_steps": 8})
    path = _write(tmp_path, job)
    sweep = tmp_path / "store" / "resume"
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ftdist.cli", "tune", str(path), *_address()], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            states = list(sweep.glob("experiment_state-*.json"))
            if states and states[0].read_text().count("TERMINATED") >= 1:
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("no trial finished in time")
    finally:
        _kill_tree(proc)
    before = {t: rows for t, rows in _results(sweep).items()}
    finished = {t for t, rows in before.items() if rows and rows[-1].get("step") == 8}
    assert finished and len(finished) < 2

    r = _tune("tune", str(path), "--resume", *_address())
    assert r.returncode == 0, r.stderr[-3000:]
    after = _results(sweep)
    assert len(after) == 2 and all(rows[-1]["step"] == 8 for rows in after.values())
    for t in finished:  # not run again: Tune recorded nothing new for them
        assert after[t] == before[t]
    # A trial the killed driver had started before Tune saved its state ran again under a new id: its folders went.
    assert {d.name[len("train-"):] for d in sweep.glob("train-*")} <= set(after)
    table = list(csv.DictReader((sweep / "report" / "results.csv").open()))
    assert len(table) == 2 and all(row["status"] == "TERMINATED" for row in table)

    # A second plain `ftdist tune` of the same name refuses instead of mixing two sweeps in one folder.
    r3 = _tune("tune", str(path), *_address(), timeout=300)
    assert r3.returncode == 2 and "already exists there; add --resume" in r3.stderr


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.s3
@pytest.mark.slow
def test_optuna_sweep_on_s3_storage(ray_cluster, bucket, s3_server, tmp_path):
    """A model-based search (Optuna) with the sweep on object storage: trials' checkpoints, Tune's state, the report
    and the best model all under s3://; retention deletes the losers' checkpoints there; sweep-report rebuilds the
    table from the s3:// URI."""
    import boto3

    job = _sweep_job(f"s3://{bucket}/sweeps", name="opt",
                     sweep={"search": "optuna", "num_samples": 2, "seed": 5,
                            "space": {"optim.lr": {"loguniform": [1e-3, 3e-2]}, "lora.rank": [4, 8]},
                            "scheduler": {"type": "fifo"}, "keep_best_trials": 1},
                     optim={**tiny_job_dict("x")["optim"], "lr": 1e-2, "max_steps": 4},
                     checkpoint={"every_n_steps": 2, "keep_last": 1})
    path = _write(tmp_path, job)
    r = _tune("tune", str(path), *_address())
    assert r.returncode == 0, r.stderr[-3000:]
    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="sweeps/opt/")
            for o in page.get("Contents", [])]
    trials = sorted({k.split("/")[2][len("train-"):] for k in keys if k.split("/")[2].startswith("train-")})
    assert len(trials) == 2
    prepared = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="sweeps/_prepared/")["Contents"]]
    assert len({k.split("/")[2] for k in prepared}) == 1  # one entry on the S3 server, read by both trials
    assert len({k.split("/")[3] for k in prepared if k.endswith(".arrow")}) == 1  # built once
    report = s3.get_object(Bucket=bucket, Key="sweeps/opt/report/results.csv")["Body"].read().decode()
    table = list(csv.DictReader(report.splitlines()))
    assert sorted(row["trial"] for row in table) == trials and all(row["status"] == "TERMINATED" for row in table)
    lrs = [float(row["optim.lr"]) for row in table]
    assert all(1e-3 <= lr <= 3e-2 for lr in lrs) and len(set(lrs)) == 2  # sampled by Optuna from the range
    best, loser = table[0]["trial"], table[1]["trial"]
    assert any(k.startswith(f"sweeps/opt/train-{best}/step_") for k in keys)
    assert not any(k.startswith(f"sweeps/opt/train-{loser}/step_") for k in keys)  # retention
    assert any(k.startswith("sweeps/opt/export/adapter/") for k in keys)
    assert any(k.startswith("sweeps/opt/report/sweep.png") for k in keys)
    s3.delete_object(Bucket=bucket, Key="sweeps/opt/report/results.csv")
    r2 = _tune("sweep-report", f"s3://{bucket}/sweeps/opt", timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert s3.get_object(Bucket=bucket, Key="sweeps/opt/report/results.csv")["Body"].read().decode() == report
