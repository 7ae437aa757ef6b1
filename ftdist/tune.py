"""`ftdist tune`: Ray Tune over any dotted key of the job file. Every trial is the `ftdist train` run (the same
`driver.build_trainer` and worker loop) on the job spec with the trial's overrides applied; Ray Train runs each trial's
DeepSpeed workers, and a callback forwards their reports to Tune.

Layout under the sweep folder `<checkpoint.storage>/<name>/`:
    experiment_state-*.json, tuner.pkl, trial-<id>/   Ray Tune's own state (what `--resume` restores)
    train-<id>/step_NNNNNNNN/                         each trial's checkpoints (manifest-committed, see storage/)
    report/results.csv, results.md, sweep.png         the results table and plots (`ftdist sweep-report` rebuilds)
    export/                                           the best trial's model
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

from ftdist.config import JobSpec, SearchDim, spec_from_dict, with_overrides
from ftdist.errors import SpecError

TRAIN_PREFIX = "train-"
TRIAL_PREFIX = "trial-"
REPORT_DIR = "report"
TRAIN_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "epoch", "train_time_s")
EVAL_METRICS = ("eval_loss", "eval_perplexity")


def sweep_dir(spec: JobSpec) -> str:
    from ftdist.driver import run_dir

    return run_dir(spec)


# ---------------------------------------------------------------------------------------------------------------
# Trial specs and validation (before any trial starts; no Ray needed)


def trial_overrides(spec: JobSpec, params: dict[str, Any]) -> dict[str, Any]:
    ov = dict(params)
    sw = spec.sweep
    if sw is not None and sw.alpha_per_rank is not None:
        rank = ov.get("lora.rank", spec.lora_spec.rank)
        ov["lora.alpha"] = float(sw.alpha_per_rank * rank)
    return ov


def trial_spec(spec: JobSpec, params: dict[str, Any], trial_id: str) -> JobSpec:
    """The job a trial runs: the sweep's spec + the trial's values, its own run folder inside the sweep folder, no
    per-trial export (the best trial is exported once, at the end)."""
    ov = trial_overrides(spec, params)
    ov.update({"name": f"{TRAIN_PREFIX}{trial_id}", "checkpoint.storage": sweep_dir(spec), "export.enabled": False,
               "sweep": None})
    return with_overrides(spec, ov)


def _key_exists(model: Any, parts: list[str]) -> bool:
    import typing

    from pydantic import BaseModel

    field_ = model.model_fields.get(parts[0])
    if field_ is None:
        return False
    if len(parts) == 1:
        return True
    ann = field_.annotation
    for t in (ann, *typing.get_args(ann)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return _key_exists(t, parts[1:])
        if t is dict or typing.get_origin(t) is dict:
            return True  # free-form section (model.from_config)
    return False


def reported_metrics(spec: JobSpec) -> tuple[str, ...]:
    return TRAIN_METRICS + (EVAL_METRICS if spec.has_eval else ())


def validate_sweep(spec: JobSpec, source: str = "job") -> None:
    """One-line errors for a sweep that cannot work: unknown keys, values that make an invalid job, an empty space,
    a metric the trials do not report, a grid over a continuous range, a scheduler with nothing to act on."""
    sw = spec.sweep
    if sw is None:
        raise SpecError(f"{source}: no sweep section: add sweep.space, e.g. sweep: {{space: {{optim.lr: [1e-4, 3e-4]}}}}")
    if sw.alpha_per_rank is not None and spec.method != "lora" and "method" not in sw.space:
        raise SpecError(f"sweep.alpha_per_rank: needs method lora (this job is {spec.method})")
    for key, dim in sw.space.items():
        if not _key_exists(JobSpec, key.split(".")):
            raise SpecError(f"sweep.space.{key}: unknown job key")
        for value in dim.corners():
            try:
                with_overrides(spec, {**trial_overrides(spec, {key: value}), "sweep": None})
            except SpecError as e:
                why = str(e).split(": ", 1)[-1]
                raise SpecError(f"sweep.space.{key}: value {value!r} makes an invalid job ({why})") from None
        if sw.search == "grid" and dim.values is None:
            raise SpecError(f"sweep.space.{key}: grid search needs a list of values (choice or grid), not {dim.kind}")
        if sw.search == "optuna" and dim.grid is not None:
            raise SpecError(f"sweep.space.{key}: optuna search samples; use choice instead of grid")
    known = reported_metrics(spec)
    if sw.metric not in known:
        hint = " (eval metrics need data.eval or data.eval_fraction)" if sw.metric in EVAL_METRICS else ""
        raise SpecError(f"sweep.metric: {sw.metric!r} is not reported by the trials{hint}; they report {', '.join(known)}")
    if sw.scheduler.type == "asha":
        if sw.metric in EVAL_METRICS and spec.eval.every_n_steps is None:
            raise SpecError(f"sweep.scheduler: asha compares trials on {sw.metric} while they run; set "
                            f"eval.every_n_steps (now eval runs only at the end)")
        if spec.optim.max_steps is None:
            raise SpecError("sweep.scheduler: asha needs optim.max_steps (its time axis is the optimizer step)")
    if sw.max_trials is not None and sw.search == "grid":
        n = grid_size(spec) * sw.num_samples
        if n > sw.max_trials:
            raise SpecError(f"sweep.max_trials: the grid has {n} trials (x num_samples), more than max_trials "
                            f"{sw.max_trials}")
    if sw.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SpecError("sweep.search: optuna is not installed (pip install optuna)") from None


def grid_size(spec: JobSpec) -> int:
    n = 1
    for dim in spec.sweep.space.values():
        if dim.grid is not None or spec.sweep.search == "grid":
            n *= len(dim.values)
    return n


def trial_cost(spec: JobSpec) -> tuple[float, float]:
    r = spec.resources
    return r.num_workers * r.cpus_per_worker, r.num_workers * r.gpus_per_worker


def concurrency(spec: JobSpec, cluster: dict) -> int:
    """Trials at once, so that every running trial's workers fit on the cluster at the same time (a trial whose
    workers cannot be placed would otherwise sit holding its Tune slot while others wait: the starvation of
    `max_concurrent_trials` set by hand). The trial driver and the Train controller take no CPU."""
    cpus, gpus = trial_cost(spec)
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    n = math.floor(have_cpu / cpus + 1e-9) if cpus else 10**6
    if gpus:
        n = min(n, math.floor(have_gpu / gpus + 1e-9))
    if n < 1:
        raise SpecError(f"resources: one trial needs {cpus:g} CPUs and {gpus:g} GPUs ({spec.resources.num_workers} "
                        f"workers); the cluster has {have_cpu:g} CPUs and {have_gpu:g} GPUs")
    cap = spec.sweep.max_concurrent_trials
    return min(n, cap) if cap else n


# ---------------------------------------------------------------------------------------------------------------
# Tune objects


def _domain(dim: SearchDim, search: str):
    from ray import tune

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
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(metric=sw.metric, mode=sw.mode, seed=sw.seed), max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # (TuneConfig.max_concurrent_trials is ignored when a BasicVariantGenerator is passed in: give it here.)
    return BasicVariantGenerator(random_state=sw.seed, max_concurrent=max_concurrent)


def _scheduler(spec: JobSpec):
    sw = spec.sweep
    if sw.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="step", max_t=spec.optim.max_steps, grace_period=sw.scheduler.grace_period,
                             reduction_factor=sw.scheduler.reduction_factor)
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def _stopper(spec: JobSpec):
    from ray.tune import Stopper

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
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportMetric(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ReportMetric()


def run_trial(config: dict, job: Optional[dict] = None) -> None:
    """The Tune trainable: one trial = one Ray Train run of the job with the trial's overrides."""
    import ray.tune

    from ftdist.driver import build_trainer

    spec = spec_from_dict(job, "sweep job")
    tspec = trial_spec(spec, config, ray.tune.get_context().get_trial_id())
    trainer = build_trainer(tspec, callbacks=[_metric_callback(spec.sweep.metric)])
    trainer.fit()


def _trainable(spec: JobSpec):
    from ray import tune

    fn = tune.with_parameters(run_trial, job=spec.model_dump(mode="json"))
    # The trial driver only waits on its Train controller: no CPU (one would be missing from the trial's workers).
    # Ray wants a non-empty bundle, so it asks for 1 MiB of the `memory` resource every node has.
    return tune.with_resources(fn, {"cpu": 0, "memory": 2**20})


def _storage(spec: JobSpec) -> tuple[str, str, Any]:
    """(storage path, sweep path, filesystem) as Ray Tune takes them: s3 paths without the scheme, plus our FS."""
    from ftdist.storage import s3

    storage, fs = spec.checkpoint.resolved_storage(), None
    if s3.is_remote(storage):
        storage, fs = storage[len("s3://"):], s3.pyarrow_fs()
    return storage, f"{storage}/{spec.name}", fs


def build_tuner(spec: JobSpec, max_concurrent: int, resume: bool = False):
    from ray import tune

    storage, path, fs = _storage(spec)
    if resume:
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise SpecError(f"--resume: no sweep state at {sweep_dir(spec)} (run `ftdist tune` without --resume)")
        return tune.Tuner.restore(path, trainable=_trainable(spec), resume_unfinished=True, resume_errored=True,
                                  restart_errored=False, param_space=param_space(spec), storage_filesystem=fs)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        raise SpecError(f"{sweep_dir(spec)}: a sweep named {spec.name} already exists there; add --resume to finish "
                        f"it, or change name")
    sw = spec.sweep
    num_samples = sw.num_samples if sw.max_trials is None or sw.search == "grid" else min(sw.num_samples, sw.max_trials)
    return tune.Tuner(
        _trainable(spec),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=sw.metric, mode=sw.mode, search_alg=_search_alg(spec, max_concurrent), scheduler=_scheduler(spec),
            num_samples=num_samples, time_budget_s=sw.time_budget_s,
            trial_dirname_creator=lambda t: f"{TRIAL_PREFIX}{t.trial_id}",
        ),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage, storage_filesystem=fs, stop=_stopper(spec),
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


# ---------------------------------------------------------------------------------------------------------------
# Results: table, CSV/Markdown, plot; retention and export of the best trial


@dataclass
class TrialRecord:
    trial_id: str
    params: dict
    status: str
    rows: list = field(default_factory=list)  # every result Tune got from the trial (each carries the metric)
    error: Optional[str] = None

    def last(self, key: str) -> Any:
        vals = [r[key] for r in self.rows if r.get(key) is not None]
        return vals[-1] if vals else None

    @property
    def steps(self) -> int:
        return int(self.last("step") or 0)

    @property
    def wall_s(self) -> float:
        return float(self.last("time_total_s") or 0.0)


@dataclass
class SweepReport:
    spec: JobSpec
    trials: list  # TrialRecord, best first (those without a metric last)

    @property
    def best(self) -> Optional[TrialRecord]:
        ok = [t for t in self.trials if t.last(self.spec.sweep.metric) is not None]
        return ok[0] if ok else None

    def param_columns(self) -> list[str]:
        keys = list(self.spec.sweep.space)
        if self.spec.sweep.alpha_per_rank is not None and "lora.alpha" not in keys:
            keys.append("lora.alpha")
        return keys

    def columns(self) -> list[str]:
        return ["trial", *self.param_columns(), "steps", "stopped_early", self.spec.sweep.metric, "wall_s", "status"]

    def table(self) -> list[list[Any]]:
        sw, keys, out = self.spec.sweep, self.param_columns(), []
        for t in self.trials:
            params = trial_overrides(self.spec, t.params)
            m = t.last(sw.metric)
            early = t.status == "TERMINATED" and t.steps < (self.spec.optim.max_steps or 0)
            out.append([t.trial_id, *[params.get(k) for k in keys], t.steps, "yes" if early else "no",
                        m, round(t.wall_s, 1), t.status if not t.error else f"{t.status}: {t.error}"])
        return out

    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(self.columns())
        w.writerows(self.table())
        return buf.getvalue()

    def markdown(self) -> str:
        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:.4g}"
            return "" if v is None else str(v)

        cols = self.columns()
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in self.table()]
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sw = self.spec.sweep
        keys = list(sw.space)
        x_key = "optim.lr" if "optim.lr" in keys else keys[0]
        series_key = "lora.rank" if "lora.rank" in keys and x_key != "lora.rank" else None
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        groups: dict[Any, list] = {}
        for t in self.trials:
            m = t.last(sw.metric)
            p = trial_overrides(self.spec, t.params)
            if m is not None and isinstance(p.get(x_key), (int, float)):
                groups.setdefault(p.get(series_key) if series_key else None, []).append((p[x_key], m))
        for g, pts in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0])):
            pts.sort()
            ax1.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                     label=f"{series_key} {g}" if series_key else sw.metric)
        if x_key == "optim.lr":
            ax1.set_xscale("log")
        ax1.set_xlabel(x_key)
        ax1.set_ylabel(f"{sw.metric} (last reported)")
        ax1.legend()
        ax1.set_title(f"{sw.metric} vs {x_key}")
        for t in self.trials:
            pts = [(r["step"], r[sw.metric]) for r in t.rows if r.get(sw.metric) is not None and "step" in r]
            if pts:
                ax2.plot([s for s, _ in pts], [m for _, m in pts], marker=".", label=t.trial_id)
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel(sw.metric)
        ax2.set_title("learning curves")
        if len(self.trials) <= 12:
            ax2.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def write(self, dest: str) -> dict[str, str]:
        """results.csv, results.md and sweep.png into `dest` (local folder or s3:// prefix)."""
        from ftdist.storage import publish_dir

        with tempfile.TemporaryDirectory(prefix="ftdist-report-") as tmp:
            with open(os.path.join(tmp, "results.csv"), "w") as fh:
                fh.write(self.csv_text())
            with open(os.path.join(tmp, "results.md"), "w") as fh:
                fh.write(self.markdown() + "\n")
            self.plot(os.path.join(tmp, "sweep.png"))
            publish_dir(tmp, dest)
        return {n: f"{dest}/{n}" for n in ("results.csv", "results.md", "sweep.png")}


def load_report(spec: JobSpec) -> SweepReport:
    """Read the sweep's trials back from Tune's experiment state in storage."""
    from ray.tune import ExperimentAnalysis

    _, path, fs = _storage(spec)
    try:
        ea = ExperimentAnalysis(path, storage_filesystem=fs)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SpecError(f"{sweep_dir(spec)}: no Tune sweep state there ({str(e).splitlines()[0][:200]})") from None
    dfs = ea.trial_dataframes
    records = []
    for t in ea.trials:
        df = dfs.get(t.trial_id)
        rows = df.to_dict("records") if df is not None and len(df) else []
        rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
        params = {k: v for k, v in (t.config or {}).items() if k in spec.sweep.space}
        err = _error_line(t) if t.status == "ERROR" else None
        records.append(TrialRecord(t.trial_id, params, t.status, rows, err))
    sign = 1 if spec.sweep.mode == "min" else -1
    records.sort(key=lambda r: (r.last(spec.sweep.metric) is None, sign * (r.last(spec.sweep.metric) or 0.0)))
    return SweepReport(spec, records)


def _error_line(trial: Any) -> str:
    """The last line of a failed trial's error (Ray nests the worker's traceback inside)."""
    try:
        e = trial.get_pickled_error()
    except Exception:  # noqa: BLE001  (the error file may be gone or unreadable: say so, don't fail the report)
        e = None
    if e is None:
        return "failed (see error.txt in the trial folder)"
    lines = [ln for ln in str(e).strip().splitlines() if ln and not ln.startswith((" ", "Traceback"))]
    return (lines[-1] if lines else type(e).__name__)[:300]


def apply_retention(report: SweepReport) -> list[str]:
    """Keep the checkpoints of the best `keep_best_trials` trials; delete every other trial's checkpoints (the
    manifest goes first, so a half-deleted checkpoint is never taken for a valid one)."""
    from ftdist.storage.checkpoints import CheckpointStore

    keep = report.spec.sweep.keep_best_trials
    base = sweep_dir(report.spec)
    deleted = []
    for t in report.trials[keep:]:
        cs = CheckpointStore(f"{base}/{TRAIN_PREFIX}{t.trial_id}")
        for c in cs.checkpoints(committed_only=False):
            cs.delete(c.name)
            deleted.append(c.uri)
    return deleted


def export_best(report: SweepReport) -> Optional[dict]:
    from ftdist.export import export_checkpoint
    from ftdist.storage.checkpoints import CheckpointStore

    best = report.best
    if best is None:
        return None
    ckpt = CheckpointStore(f"{sweep_dir(report.spec)}/{TRAIN_PREFIX}{best.trial_id}").latest_valid()
    if ckpt is None:
        return None
    return export_checkpoint(ckpt.uri, f"{sweep_dir(report.spec)}/export",
                             max_shard_size=report.spec.export.max_shard_size, log=lambda _: None)


@dataclass
class SweepSummary:
    report: SweepReport
    files: dict
    deleted: list
    exported: Optional[dict]
    errors: list


def finish(spec: JobSpec, retention: bool = True, export: bool = True) -> SweepSummary:
    report = load_report(spec)
    files = report.write(f"{sweep_dir(spec)}/{REPORT_DIR}")
    deleted = apply_retention(report) if retention else []
    exported = export_best(report) if export and spec.sweep.export_best else None
    errors = [t for t in report.trials if t.status == "ERROR"]
    return SweepSummary(report, files, deleted, exported, errors)


SPEC_FILE = "ftdist_sweep.json"


def save_spec(spec: JobSpec) -> None:
    """The job (with its sweep section) next to Tune's state, for `ftdist sweep-report` and `--resume`."""
    import json

    from ftdist.storage.store import open_store

    open_store(sweep_dir(spec)).put_bytes(SPEC_FILE, json.dumps(spec.model_dump(mode="json"), indent=1).encode())


def load_saved_spec(uri: str) -> JobSpec:
    import json

    from ftdist.storage.store import open_store

    raw = open_store(uri.rstrip("/")).get_bytes(SPEC_FILE)
    if raw is None:
        raise SpecError(f"{uri}: not an ftdist sweep folder (no {SPEC_FILE}); give <checkpoint.storage>/<sweep name>")
    return spec_from_dict(json.loads(raw), f"{uri}/{SPEC_FILE}")


def run_sweep(spec: JobSpec, *, address: Optional[str] = None, resume: bool = False) -> SweepSummary:
    import ray

    from ftdist.driver import connect_ray, disconnect_ray

    from ftdist.storage.lease import run_lease

    cpus, gpus = trial_cost(spec)
    started = connect_ray(address, int(math.ceil(cpus)) + 1, dashboard=True)  # for the PG cleaner: see connect_ray
    try:
        n = concurrency(spec, ray.cluster_resources())
        with run_lease(sweep_dir(spec)):  # one live driver per sweep (a second would run every trial again)
            print(f"[ftdist] sweep {spec.name}: {n} trial(s) at a time, {cpus:g} CPUs / {gpus:g} GPUs each; "
                  f"folder {sweep_dir(spec)}", flush=True)
            tuner = build_tuner(spec, n, resume=resume)
            save_spec(spec)
            tuner.fit()
    finally:
        disconnect_ray(started)
    return finish(spec)
