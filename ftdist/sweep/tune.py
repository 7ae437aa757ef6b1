"""`ftdist tune`: Ray Tune over any dotted key of the job file. Every trial is `run_training` (the one driver, the
same worker loop as `ftdist train`) on the job spec with the trial's overrides; a Ray Train callback forwards the
reports that carry the sweep metric to Tune.

Layout under the sweep folder `<checkpoint.storage>/<name>/`:
    experiment_state-*.json, tuner.pkl, trial-<id>/   Ray Tune's own state (what `--resume` restores)
    train-<id>/step_NNNNNNNN/                         each trial's checkpoints (manifest-committed, see storage/)
    report/results.csv, results.md, sweep.png         the results table and plots (`ftdist sweep-report` rebuilds)
    export/                                           the best trial's model
"""

from __future__ import annotations

import math
import tempfile
from typing import Optional

import ray
from ray import tune
from ray.tune import Stopper
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from ftdist.errors import SpecError
from ftdist.spec import JobSpec, SearchDim, spec_from_dict
from ftdist.storage.lease import run_lease
from ftdist.sweep.report import SweepSummary, finish, load_report, save_spec, tune_storage
from ftdist.sweep.space import TRIAL_PREFIX, concurrency, num_samples, sweep_dir, trial_cost, trial_spec
from ftdist.train.contracts import TrackingTarget
from ftdist.train.driver import run_training
from ftdist.train.obs.tracking import attach_report, finish_tracking, start_tracking
from ftdist.train.ray_runtime import connect_ray, disconnect_ray


def _domain(dim: SearchDim, search: str):
    if dim.grid is not None or (search == "grid"):
        return tune.grid_search(list(dim.values))
    if dim.choice is not None:
        return tune.choice(list(dim.choice))
    if dim.uniform is not None:
        return tune.uniform(*dim.uniform)
    if dim.loguniform is not None:
        return tune.loguniform(*dim.loguniform)
    return tune.randint(*dim.randint)


def param_space(spec: JobSpec) -> dict:
    return {key: _domain(dim, spec.sweep.search) for key, dim in spec.sweep.space.items()}


def _search_alg(spec: JobSpec, max_concurrent: int):
    sw = spec.sweep
    if sw.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # optuna is optional: only optuna sweeps import it

        return ConcurrencyLimiter(OptunaSearch(metric=sw.metric, mode=sw.mode, seed=sw.seed), max_concurrent)
    # (TuneConfig.max_concurrent_trials is ignored when a BasicVariantGenerator is passed in: give it here.)
    return BasicVariantGenerator(random_state=sw.seed, max_concurrent=max_concurrent)


def _scheduler(spec: JobSpec):
    sw = spec.sweep
    if sw.scheduler.type == "asha":
        return ASHAScheduler(time_attr="step", max_t=spec.optim.max_steps, grace_period=sw.scheduler.grace_period,
                             reduction_factor=sw.scheduler.reduction_factor)
    return FIFOScheduler()


def _stopper(spec: JobSpec):
    budget = spec.sweep.max_total_steps
    if budget is None:
        return None

    class TotalSteps(Stopper):
        """Ends the sweep once the trials together ran `max_total_steps` optimizer steps. After `--resume` (Tune
        restores this object as it was pickled at the start) the steps of the earlier run are read back from the
        sweep's results on first use, so the budget spans both runs."""

        def __init__(self) -> None:
            self.steps: Optional[dict[str, int]] = None

        def _load(self) -> dict[str, int]:
            try:
                report = load_report(spec)
            except SpecError:  # a fresh sweep: nothing recorded yet
                return {}
            return {t.trial_id: t.steps for t in report.trials}

        def __call__(self, trial_id: str, result: dict) -> bool:
            if self.steps is None:
                self.steps = self._load()
            self.steps[trial_id] = max(self.steps.get(trial_id, 0), int(result.get("step", 0)))
            return False

        def stop_all(self) -> bool:
            return sum((self.steps or {}).values()) >= budget

    return TotalSteps()


def _metric_callback(metric: str):
    """Ray Train -> Tune: forward the reports that carry the sweep metric (log-only reports would make Tune's
    strict metric check fail, and ASHA only acts on the metric)."""
    class ReportMetric(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ReportMetric()


def run_trial(config: dict, job: Optional[dict] = None, tracking_parent: Optional[str] = None) -> None:
    """The Tune trainable: one trial = `run_training` of the job with the trial's overrides (inside the sweep's Ray,
    so no second Ray starts). A failed trial raises, so Tune records it as errored. `tracking_parent`: the sweep's
    MLflow run, which the trial's run is a child of."""
    spec = spec_from_dict(job, "sweep job")
    tspec = trial_spec(spec, config, tune.get_context().get_trial_id())
    summary = run_training(tspec, callbacks=[_metric_callback(spec.sweep.metric)], tracking_parent=tracking_parent,
                           tracking_group=spec.name)
    if summary.error is not None:
        raise summary.error


def _trainable(spec: JobSpec, tracking_parent: Optional[str] = None):
    fn = tune.with_parameters(run_trial, job=spec.model_dump(mode="json"), tracking_parent=tracking_parent)
    # The trial driver only waits on its Train controller: no CPU (one would be missing from the trial's workers).
    # Ray wants a non-empty bundle, so it asks for 1 MiB of the `memory` resource every node has.
    return tune.with_resources(fn, {"cpu": 0, "memory": 2**20})


def build_tuner(spec: JobSpec, max_concurrent: int, resume: bool = False, tracking_parent: Optional[str] = None):
    storage, path, fs = tune_storage(spec)
    if resume:
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise SpecError(f"--resume: no sweep state at {sweep_dir(spec)} (run `ftdist tune` without --resume)")
        return tune.Tuner.restore(path, trainable=_trainable(spec, tracking_parent), resume_unfinished=True, resume_errored=True,
                                  restart_errored=False, param_space=param_space(spec), storage_filesystem=fs)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        raise SpecError(f"{sweep_dir(spec)}: a sweep named {spec.name} already exists there; add --resume to finish "
                        f"it, or change name")
    sw = spec.sweep
    return tune.Tuner(
        _trainable(spec, tracking_parent),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=sw.metric, mode=sw.mode, search_alg=_search_alg(spec, max_concurrent), scheduler=_scheduler(spec),
            num_samples=num_samples(spec), time_budget_s=sw.time_budget_s,
            trial_dirname_creator=lambda t: f"{TRIAL_PREFIX}{t.trial_id}",
        ),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage, storage_filesystem=fs, stop=_stopper(spec),
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def _finish_sweep_tracking(tracking: TrackingTarget, out: SweepSummary) -> None:
    """The sweep's parent run gets the results table and plot, the best trial and its export."""
    best = out.report.best
    outputs = {"report_uri": out.files.get("results.csv"), "best_trial": best.trial_id if best else None,
               **{f"export_uri_{k}": v for k, v in (out.exported or {}).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        out.report.write(tmp)
        warnings = [attach_report(tracking, sweep_dir(out.report.spec), tmp),
                    finish_tracking(tracking, sweep_dir(out.report.spec), failed=bool(out.errors) or best is None,
                                    outputs=outputs)]
    for warning in dict.fromkeys(w for w in warnings if w):
        print(f"[ftdist] {warning}", flush=True)


def run_sweep(spec: JobSpec, *, address: Optional[str] = None, resume: bool = False) -> SweepSummary:
    cpus, gpus = trial_cost(spec)
    started = connect_ray(address, int(math.ceil(cpus)) + 1, dashboard=True)  # for the PG cleaner: see connect_ray
    try:
        n = concurrency(spec, ray.cluster_resources())
        with run_lease(sweep_dir(spec)) as lease:  # one live driver per sweep (a second would run every trial again)
            print(f"[ftdist] sweep {spec.name}: {n} trial(s) at a time, {cpus:g} CPUs / {gpus:g} GPUs each; "
                  f"folder {sweep_dir(spec)}", flush=True)
            tracking = start_tracking(spec, attempt=lease.generation)
            tuner = build_tuner(spec, n, resume=resume, tracking_parent=tracking.mlflow_run_id)
            save_spec(spec)
            tuner.fit()
            # Report, best-trial export (a Ray task) and retention while this driver still holds Ray and the lease.
            out = finish(spec)
            _finish_sweep_tracking(tracking, out)
            return out
    finally:
        disconnect_ray(started)
