
"""A sweep before any trial: validation (one line), trial jobs, how many trials fit at once, the step budget
across a resumed sweep. No Ray cluster."""

from __future__ import annotations

import pytest
import yaml

from ftdist.cli import main as cli_main
from ftdist.errors import SpecError
from ftdist.spec import spec_from_dict
from ftdist.sweep.space import concurrency, trial_spec, validate_sweep
from tests.conftest import sweep_job_dict as _sweep_job


@pytest.mark.parametrize("change, match", [
    (lambda j: j["sweep"]["space"].update({"optim.lrr": [1e-3]}), r"sweep.space.optim.lrr: unknown job key"),
    (lambda j: (j.update(method="full", lora=None), j["sweep"].pop("alpha_per_rank")),
     r"sweep.space.lora.rank: value 4 makes an invalid job \(.*lora options are set but method is 'full'"),
    (lambda j: j.update(method="full", lora=None), r"sweep.alpha_per_rank: needs method lora"),
    (lambda j: j["sweep"].update(space={}), r"empty search space"),
    (lambda j: j["sweep"].update(metric="accuracy"), r"sweep.metric: 'accuracy' is not reported"),
    (lambda j: (j["data"].pop("eval"), j["eval"].pop("every_n_steps")),
     r"sweep.metric: 'eval_loss' is not reported by the trials \(eval metrics"),
    (lambda j: j["data"].pop("eval"), r"eval.every_n_steps: eval.every_n_steps needs eval data"),
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


REF = "jobs/data/upstream/heldout.jsonl"


def test_sweeps_on_generation_and_forgetting_metrics(tmp_path):
    """eval_gen_* and eval_ref_* are sweep metrics like eval_loss; ASHA needs them measured while trials run."""
    def sweep(metric: str, mode: str, evaluation: dict) -> dict:
        job = _sweep_job(str(tmp_path))
        job["eval"] = {**job["eval"], **evaluation}
        job["sweep"].update(metric=metric, mode=mode)
        return job

    gen = {"generate": {"max_prompts": 8, "every_n_steps": 4}}
    validate_sweep(spec_from_dict(sweep("eval_gen_exact_match", "max", gen)))
    validate_sweep(spec_from_dict(sweep("eval_ref_heldout_loss", "min", {"reference": [REF]})))
    with pytest.raises(SpecError, match=r"asha compares trials on eval_gen_exact_match .*eval\.generate\.every_n"):
        validate_sweep(spec_from_dict(sweep("eval_gen_exact_match", "max", {"generate": {}})))
    no_eval_cadence = sweep("eval_ref_heldout_loss", "min", {"reference": [REF]})
    no_eval_cadence["eval"].pop("every_n_steps")
    with pytest.raises(SpecError, match=r"asha compares trials on eval_ref_heldout_loss while they run"):
        validate_sweep(spec_from_dict(no_eval_cadence))
    tracked = _sweep_job(str(tmp_path), tracking={"mlflow": {"tracking_uri": "http://m:5000"}})
    t = trial_spec(spec_from_dict(tracked), {"optim.lr": 3e-3, "lora.rank": 4}, "abc_00001")
    assert (t.tracking.mlflow.experiment, t.tracking.mlflow.run_name) == ("sweep", "sweep-abc_00001")


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


def test_the_sweep_table_says_what_each_trial_spent(tmp_path):
    """Per trial: wall time (Tune's time_total_s) x workers (x GPUs per worker) in hours, next to the metric."""
    from ftdist.sweep.report import SweepReport, TrialRecord

    spec = spec_from_dict(_sweep_job(str(tmp_path)))
    report = SweepReport(spec, [TrialRecord("a", {}, "TERMINATED", [{"step": 12, "time_total_s": 360.0}])])
    row = dict(zip(report.columns(), report.table()[0]))
    assert row["worker_hours"] == 360.0 * spec.resources.num_workers / 3600
    gpu = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpus_per_worker": 2})})
    assert "gpu_hours" in SweepReport(gpu, []).columns()


def test_folders_of_trials_tune_never_recorded_are_removed(tmp_path):
    """A driver killed between starting a trial and saving Tune's state leaves that trial's folders behind; --resume
    runs its configuration again under a new id. The finished sweep removes the orphan's trial and train folders
    (checkpoint manifest first) and leaves every recorded trial's folders and everything else alone."""
    from ftdist.storage.checkpoints import CheckpointStore
    from ftdist.sweep.report import SweepReport, TrialRecord, prune_orphans
    from ftdist.sweep.space import sweep_dir
    from tests.support.checkpoints import meta

    spec = spec_from_dict(_sweep_job(str(tmp_path)))
    base = tmp_path / spec.name
    for name in ("trial-a", "train-a", "trial-orphan", "report", "trial-a/keep"):
        (base / name).mkdir(parents=True)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.bin").write_bytes(b"x")
    cs = CheckpointStore(f"{sweep_dir(spec)}/train-orphan")
    cs.upload_rank(str(ckpt), "step_00000004", 0)
    cs.commit("step_00000004", 1, meta(4), timeout_s=5)
    assert cs.latest_valid() is not None

    pruned = prune_orphans(SweepReport(spec, [TrialRecord("a", {}, "TERMINATED", [{"step": 8}])]))
    assert sorted(pruned) == [f"{sweep_dir(spec)}/train-orphan", f"{sweep_dir(spec)}/trial-orphan"]
    assert sorted(p.name for p in base.iterdir()) == ["report", "train-a", "trial-a"]
    assert (base / "trial-a" / "keep").is_dir()
