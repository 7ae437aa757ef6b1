"""A sweep's results: the table (CSV, Markdown), the plot, retention of the other trials' checkpoints and the
export of the best trial, rebuilt at any time from what Tune and ftdist left in storage (`ftdist sweep-report`)."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from matplotlib.figure import Figure
from ray.tune import ExperimentAnalysis

from ftdist.errors import SpecError
from ftdist.spec import JobSpec, spec_from_dict
from ftdist.storage.cache import publish_files
from ftdist.storage import s3
from ftdist.storage.checkpoints import CheckpointStore
from ftdist.storage.store import open_store
from ftdist.storage.uri import is_remote, without_scheme
from ftdist.sweep.space import REPORT_DIR, TRAIN_PREFIX, TRIAL_PREFIX, sweep_dir, trial_overrides
from ftdist.train.driver import run_export_task

def tune_storage(spec: JobSpec) -> tuple[str, str, Any]:
    """(storage path, sweep path, filesystem) as Ray Tune takes them: s3 paths without the scheme, plus our FS."""
    storage = spec.checkpoint.resolved_storage()
    fs = s3.pyarrow_fs() if is_remote(storage) else None
    return without_scheme(storage), f"{without_scheme(storage)}/{spec.name}", fs


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
        return ["trial", *self.param_columns(), "steps", "stopped_early", self.spec.sweep.metric, "wall_s",
                self._hours_column(), "status"]

    def _hours_column(self) -> str:
        return "gpu_hours" if self.spec.resources.use_gpu else "worker_hours"

    def hours(self, t: TrialRecord) -> float:
        """What a trial spent: its wall time (Tune's time_total_s) x its workers (x their GPUs)."""
        r = self.spec.resources
        return t.wall_s * r.num_workers * (r.gpus_per_worker if r.use_gpu else 1) / 3600

    def table(self) -> list[list[Any]]:
        sw, keys, out = self.spec.sweep, self.param_columns(), []
        for t in self.trials:
            params = trial_overrides(self.spec, t.params)
            m = t.last(sw.metric)
            early = t.status == "TERMINATED" and t.steps < (self.spec.optim.max_steps or 0)
            out.append([t.trial_id, *[params.get(k) for k in keys], t.steps, "yes" if early else "no",
                        m, round(t.wall_s, 1), round(self.hours(t), 4),
                        t.status if not t.error else f"{t.status}: {t.error}"])
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
        sw = self.spec.sweep
        keys = list(sw.space)
        x_key = "optim.lr" if "optim.lr" in keys else keys[0]
        series_key = "lora.rank" if "lora.rank" in keys and x_key != "lora.rank" else None
        fig = Figure(figsize=(12, 4.5))  # no pyplot: no GUI backend, no global figure state
        ax1, ax2 = fig.subplots(1, 2)
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

    def write(self, dest: str) -> dict[str, str]:
        """results.csv, results.md and sweep.png into `dest` (local folder or s3:// prefix), replacing it."""
        return publish_files(dest, {"results.csv": self.csv_text(), "results.md": self.markdown() + "\n"},
                             {"sweep.png": self.plot}, replace=True)


def load_report(spec: JobSpec) -> SweepReport:
    """Read the sweep's trials back from Tune's experiment state in storage."""
    _, path, fs = tune_storage(spec)
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
    keep = report.spec.sweep.keep_best_trials
    base = sweep_dir(report.spec)
    return [uri for t in report.trials[keep:] for uri in _delete_checkpoints(f"{base}/{TRAIN_PREFIX}{t.trial_id}")]


def _delete_checkpoints(train_uri: str) -> list[str]:
    """Every checkpoint of one trial's run, each uncommitted first (its manifest), then its data; their URIs."""
    cs = CheckpointStore(train_uri)
    deleted = []
    for c in cs.checkpoints(committed_only=False):
        cs.delete(c.name)
        deleted.append(c.uri)
    return deleted


def prune_orphans(report: SweepReport) -> list[str]:
    """Delete the folders of trials Tune started but never recorded in its experiment state (the driver was killed
    in between): `--resume` runs their configuration again as a new trial, so what they left is only litter, and
    retention, which goes by the recorded trials, would never reach their checkpoints. Only the sweep's driver calls
    this, after Tune has finished, so no trial can still be writing there."""
    known = {t.trial_id for t in report.trials}
    store = open_store(sweep_dir(report.spec))
    deleted = []
    for d in store.list_dirs():
        prefix = next((p for p in (TRIAL_PREFIX, TRAIN_PREFIX) if d.startswith(p)), None)
        if prefix is None or d[len(prefix):] in known:
            continue
        if prefix == TRAIN_PREFIX:  # its checkpoints uncommitted first, as retention does
            _delete_checkpoints(store.child(d))
        store.delete_prefix(d)
        deleted.append(store.child(d))
    return deleted


def export_best(report: SweepReport) -> Optional[dict]:
    best = report.best
    if best is None:
        return None
    ckpt = CheckpointStore(f"{sweep_dir(report.spec)}/{TRAIN_PREFIX}{best.trial_id}").latest_valid()
    if ckpt is None:
        return None
    return run_export_task(ckpt.uri, f"{sweep_dir(report.spec)}/export", report.spec.export.max_shard_size)


@dataclass
class SweepSummary:
    report: SweepReport
    files: dict
    deleted: list
    exported: Optional[dict]
    errors: list
    pruned: list = field(default_factory=list)  # folders of trials Tune never recorded (see prune_orphans)


def finish(spec: JobSpec, retention: bool = True, export: bool = True) -> SweepSummary:
    report = load_report(spec)
    files = report.write(f"{sweep_dir(spec)}/{REPORT_DIR}")
    # Export before retention: with keep_best_trials 0 retention deletes the best trial's checkpoints too.
    exported = export_best(report) if export and spec.sweep.export_best else None
    deleted = apply_retention(report) if retention else []
    pruned = prune_orphans(report) if retention else []
    errors = [t for t in report.trials if t.status == "ERROR"]
    return SweepSummary(report, files, deleted, exported, errors, pruned)


SPEC_FILE = "ftdist_sweep.json"


def save_spec(spec: JobSpec) -> None:
    """The job (with its sweep section) next to Tune's state, for `ftdist sweep-report` and `--resume`."""
    open_store(sweep_dir(spec)).put_bytes(SPEC_FILE, json.dumps(spec.model_dump(mode="json"), indent=1).encode())


def load_saved_spec(uri: str) -> JobSpec:
    raw = open_store(uri.rstrip("/")).get_bytes(SPEC_FILE)
    if raw is None:
        raise SpecError(f"{uri}: not an ftdist sweep folder (no {SPEC_FILE}); give <checkpoint.storage>/<sweep name>")
    return spec_from_dict(json.loads(raw), f"{uri}/{SPEC_FILE}")
