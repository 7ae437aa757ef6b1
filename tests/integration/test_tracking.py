"""Tracking and forgetting on real Ray Train + DeepSpeed runs: a refused MLflow credential, the reference sets'
forgetting measure for full fine-tuning against LoRA, the WiSE-FT curve. (A resumed run continuing its MLflow run
with every step once, TensorBoard's own reader, the run report and the secret scan: test_train.py's resume test.)"""

from __future__ import annotations

import csv

import pytest

from ftdist.cli import main
from ftdist.spec import spec_from_dict
from ftdist.train.driver import run_training
from tests.conftest import REPO, tiny_job_dict

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed]

REFERENCE = str(REPO / "jobs" / "data" / "upstream" / "heldout.jsonl")


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
    """The upstream model (pre-trained on Python's docs) fine-tuned on the number-spelling task, 8 steps at the
    same constant lr 3e-3: the reference set's loss (its held-out docs) rises under full fine-tuning and much less
    under LoRA. The WiSE-FT curve of the full run: alpha 0 is the base model (its step-0 losses), alpha 1 the
    fine-tuned one (its last eval)."""
    upstream = str(REPO / "jobs" / "data" / "upstream" / "model")
    change, history = {}, {}
    for method in ("full", "lora"):
        job = tiny_job_dict(str(tmp_path / "store"), name=f"forget-{method}", method=method,
                            model={"name_or_path": upstream, "from_config": None, "tokenizer": None,
                                   "dtype": "fp32"},
                            optim={"lr": 3e-3, "max_steps": 8, "schedule": "constant"},
                            eval={"reference": [REFERENCE], "max_batches": None},
                            checkpoint={"every_n_steps": 8}, export={"enabled": False})
        s = run_training(spec_from_dict(job))
        assert s.error is None, s.error
        history[method] = {h["step"]: h for h in s.history if "eval_ref_heldout_loss" in h}
        assert sorted(history[method]) == [0, 8]
        change[method] = history[method][8]["eval_ref_heldout_loss"] - history[method][0]["eval_ref_heldout_loss"]
    assert change["full"] > 1.0 and 0 <= change["lora"] < 0.5 * change["full"], change

    run = tmp_path / "store" / "forget-full"
    capsys.readouterr()
    assert main(["export", str(run / "step_00000008"), "--interpolate", "0,0.5,1", "--eval"]) == 0
    curve = {float(r["alpha"]): r for r in csv.DictReader((run / "report" / "wise_ft.csv").open())}
    for alpha, step in ((0.0, 0), (1.0, 8)):
        for key in ("eval_ref_heldout_loss", "eval_loss"):
            assert float(curve[alpha][key]) == pytest.approx(history["full"][step][key], rel=1e-4), (alpha, key)
    middle = float(curve[0.5]["eval_ref_heldout_loss"])
    assert history["full"][0]["eval_ref_heldout_loss"] < middle < history["full"][8]["eval_ref_heldout_loss"]
    assert "| 0.5 |" in capsys.readouterr().out and (run / "report" / "wise_ft.png").is_file()
