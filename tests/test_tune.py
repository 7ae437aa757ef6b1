"""`ftdist tune`: sweep validation (fast), and real sweeps: Ray Tune over 2-worker DeepSpeed LoRA trials with ASHA,
results/report/retention/export, and a killed sweep driver finished with --resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from ftdist.cli import main as cli_main
from ftdist.spec import spec_from_dict
from ftdist.errors import SpecError
from ftdist.sweep.space import concurrency, trial_spec, validate_sweep
from tests.conftest import tiny_job_dict


def _sweep_job(storage: str, name: str = "sweep", sweep: dict | None = None, **sections) -> dict:
    defaults = {"method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
                "optim": {**tiny_job_dict("x")["optim"], "lr": 1e-2, "max_steps": 12},
                "eval": {"every_n_steps": 2, "max_batches": 4}, "logging": {"every_n_steps": 2},
                "checkpoint": {"every_n_steps": 4, "keep_last": 2}}
    job = tiny_job_dict(storage, name=name, **{**defaults, **sections})
    job["sweep"] = sweep or {"search": "grid", "space": {"optim.lr": [1e-2, 3e-3, 1e-4], "lora.rank": [4, 8]},
                             "alpha_per_rank": 2.0, "scheduler": {"type": "asha", "grace_period": 4,
                                                                  "reduction_factor": 2}}
    return job


# ---------------------------------------------------------------------------------------------------------------
# validation: one line before any trial starts


@pytest.mark.parametrize("change, match", [
    (lambda j: j["sweep"]["space"].update({"optim.lrr": [1e-3]}), r"sweep.space.optim.lrr: unknown job key"),
    (lambda j: (j.update(method="full", lora=None), j["sweep"].pop("alpha_per_rank")),
     r"sweep.space.lora.rank: value 4 makes an invalid job \(.*lora options are set but method is 'full'"),
    (lambda j: j.update(method="full", lora=None), r"sweep.alpha_per_rank: needs method lora"),
    (lambda j: j["sweep"].update(space={}), r"empty search space"),
    (lambda j: j["sweep"].update(metric="accuracy"), r"sweep.metric: 'accuracy' is not reported"),
    (lambda j: j["data"].pop("eval"), r"sweep.metric: 'eval_loss' is not reported by the trials \(eval metrics"),
    (lambda j: j["sweep"]["space"].update({"optim.lr": {"loguniform": [1e-4, 1e-2]}}),
     r"sweep.space.optim.lr: grid search needs a list of values"),
    (lambda j: j["eval"].pop("every_n_steps"), r"sweep.scheduler: asha compares trials on eval_loss while they run"),
    (lambda j: j["sweep"]["space"].update({"optim.micro_batch_size": [3]}),
     r"sweep.space.optim.micro_batch_size: value 3 makes an invalid job .*global_batch_size"),
    (lambda j: j["sweep"].update(max_trials=4), r"sweep.max_trials: the grid has 6 trials"),
])
def test_bad_sweeps_fail_before_any_trial(tmp_path, change, match):
    job = _sweep_job(str(tmp_path))
    change(job)
    with pytest.raises(SpecError, match=match):
        validate_sweep(spec_from_dict(job))


def test_bad_space_values_are_rejected_by_the_schema(tmp_path):
    job = _sweep_job(str(tmp_path))
    job["sweep"]["space"]["optim.lr"] = {"loguniform": [1e-2, 1e-4]}
    with pytest.raises(SpecError, match="low must be below high"):
        spec_from_dict(job)


def test_cli_tune_bad_sweep_is_one_line_exit_2(tmp_path, capsys):
    job = _sweep_job(str(tmp_path / "store"))
    job["sweep"]["space"]["optim.lrr"] = [1e-3]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert cli_main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ftdist: error: sweep.space.optim.lrr: unknown job key"]
    assert not (tmp_path / "store").exists()  # nothing written


def test_trial_spec_and_concurrency(tmp_path):
    spec = spec_from_dict(_sweep_job(str(tmp_path)))
    t = trial_spec(spec, {"optim.lr": 3e-3, "lora.rank": 4}, "abc_00001")
    assert (t.name, t.optim.lr, t.lora.rank, t.lora.alpha) == ("train-abc_00001", 3e-3, 4, 8.0)  # alpha_per_rank 2
    assert t.sweep is None and not t.export.enabled
    assert t.checkpoint.storage == f"{tmp_path}/sweep"
    # 2 workers x 1 CPU per trial: a 7-CPU cluster holds 3 trials' workers at once; the user's cap wins if lower.
    assert concurrency(spec, {"CPU": 7.0}) == 3
    capped = spec_from_dict({**_sweep_job(str(tmp_path)), "sweep": {**spec.sweep.model_dump(), "max_concurrent_trials": 2}})
    assert concurrency(capped, {"CPU": 16.0}) == 2
    gpu = spec_from_dict({**_sweep_job(str(tmp_path)), "resources": {"num_workers": 2, "gpus_per_worker": 1}})
    assert concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    with pytest.raises(SpecError, match="one trial needs 2 CPUs"):
        concurrency(spec, {"CPU": 1.0})


# ---------------------------------------------------------------------------------------------------------------
# real sweeps


def _write(tmp_path: Path, job: dict) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(job))
    return p


def _tune(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftdist.cli", *args], capture_output=True, text=True, timeout=timeout)


def _address() -> list[str]:
    """The sweeps join the session's Ray cluster (`--address`): a second Ray on the same machine would leave Ray
    Train's placement-group cleaner unable to tell the two apart (see the issue note)."""
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
def test_sweep_asha_report_retention_export(ray_cluster, tmp_path):
    job = _sweep_job(str(tmp_path / "store"))
    r = _tune("tune", str(_write(tmp_path, job)), *_address())
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = tmp_path / "store" / "sweep"
    tune_rows = _results(sweep)
    assert len(tune_rows) == 6
    steps = {t: max(row["step"] for row in rows) for t, rows in tune_rows.items()}
    assert sorted(steps.values())[-1] == 12
    early = [t for t, s in steps.items() if s < 12]
    assert early, steps  # ASHA stopped some trials before max_steps
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
    assert (sweep / "report" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"best trial {best}" in r.stdout

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
                     sweep={"search": "grid", "space": {"optim.lr": [1e-2, 3e-3], "lora.rank": [4, 8]},
                            "scheduler": {"type": "fifo"}, "keep_best_trials": 4, "export_best": False},
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
    assert finished and len(finished) < 4

    r = _tune("tune", str(path), "--resume", *_address())
    assert r.returncode == 0, r.stderr[-3000:]
    after = _results(sweep)
    assert len(after) == 4 and all(rows[-1]["step"] == 8 for rows in after.values())
    for t in finished:  # not run again: Tune recorded nothing new for them
        assert after[t] == before[t]
    table = list(csv.DictReader((sweep / "report" / "results.csv").open()))
    assert len(table) == 4 and all(row["status"] == "TERMINATED" for row in table)

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


def test_total_steps_budget_spans_a_resumed_sweep(tmp_path, monkeypatch):
    import ftdist.sweep.tune as tune_mod
    from ftdist.sweep.report import SweepReport, TrialRecord
    from ftdist.sweep.tune import _stopper

    job = _sweep_job(str(tmp_path), sweep={"search": "grid", "space": {"optim.lr": [1e-2, 3e-3]},
                                           "scheduler": {"type": "fifo"}, "max_total_steps": 20})
    spec = spec_from_dict(job)
    fresh = _stopper(spec)  # no sweep state yet: counting starts at zero
    fresh("a", {"step": 8})
    assert not fresh.stop_all()
    fresh("b", {"step": 12})
    assert fresh.stop_all()
    # after --resume Tune hands back the stopper as pickled at the start (empty): it reads the earlier steps back
    earlier = SweepReport(spec, [TrialRecord("a", {}, "TERMINATED", [{"step": 12}]),
                                 TrialRecord("b", {}, "RUNNING", [{"step": 4}])])
    monkeypatch.setattr(tune_mod, "load_report", lambda s: earlier)
    resumed = _stopper(spec)
    resumed("b", {"step": 6})
    assert resumed.steps == {"a": 12, "b": 6} and not resumed.stop_all()
    resumed("b", {"step": 8})
    assert resumed.stop_all()


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.slow
def test_embedded_sweep_beside_another_local_ray(ray_cluster, tmp_path):
    """The test session's Ray is a second local Ray on this machine. An embedded `ftdist tune` (no --address) must
    still free the placement group of a trial that ASHA stopped, so the next trial gets its workers: Ray Train's
    placement-group cleaner is pointed at ftdist's own dashboard instead of auto-detecting "the" local Ray."""
    job = _sweep_job(str(tmp_path / "store"), name="beside",
                     sweep={"search": "grid", "space": {"optim.lr": [1e-2, 1e-6, 3e-3]},
                            "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
                            "keep_best_trials": 3, "export_best": False},
                     optim={**tiny_job_dict("x")["optim"], "lr": 1e-2, "max_steps": 6},
                     method="lora", lora={"rank": 4, "alpha": 8, "dropout": 0.0},
                     checkpoint={"every_n_steps": None, "keep_last": 1})
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    r = subprocess.run([sys.executable, "-m", "ftdist.cli", "tune", str(_write(tmp_path, job))], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = sorted(max(row["step"] for row in rows) for rows in _results(tmp_path / "store" / "beside").values())
    # all three ran (the third after ASHA stopped the second: its workers were freed), one of them stopped early
    assert len(steps) == 3 and 2 <= steps[0] < 6 and steps[-1] == 6, steps
    assert "multiple active Ray instances" not in r.stderr
