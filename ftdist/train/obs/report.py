"""The run report every `ftdist train` leaves in `<run folder>/report/`, rebuilt at any time from storage by
`ftdist report <run>`: the metric history as CSV, the loss and eval curves as a PNG, and a Markdown summary (held-out
metrics at step 0 and at the end, forgetting on the reference sets next to the in-task gain, wall time,
worker-hours and GPU-hours, resumes). Everything comes from the latest committed checkpoint's trainer state, which
carries the whole history of every attempt. No torch, no Ray.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Optional

from matplotlib.figure import Figure

from ftdist.errors import SpecError
from ftdist.storage.cache import publish_files
from ftdist.storage.checkpoints import CheckpointStore
from ftdist.train.contracts import STATE_FILE, TrainState
from ftdist.train.obs.sinks import numeric_metrics

REPORT_DIR = "report"
REFERENCE_PREFIX = "eval_ref_"
"""Reference sets (eval.reference) report `eval_ref_<name>_loss`: the forgetting measure."""
FILES = ("metrics.csv", "curves.png", "report.md")
SHARE_PREFIX = "data_share_"
"""A mixture's metrics: data_share_<source>, the realised share of the samples up to that step."""


def reference_names(rows: list[dict]) -> list[str]:
    names = {k[len(REFERENCE_PREFIX):-len("_loss")] for r in rows for k in r
             if k.startswith(REFERENCE_PREFIX) and k.endswith("_loss")}
    return sorted(names)


def _fmt(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.4g}"


def _change(first: Optional[float], last: Optional[float]) -> str:
    if first is None or last is None:
        return ""
    rel = f" ({(last - first) / abs(first):+.1%})" if first else ""
    return f"{last - first:+.4g}{rel}"


@dataclass
class RunReport:
    name: str
    run_dir: str
    state: TrainState

    @property
    def rows(self) -> list[dict]:
        return self.state.history

    def first_last(self, key: str) -> tuple[Optional[float], Optional[float]]:
        vals = [r[key] for r in self.rows if isinstance(r.get(key), (int, float))]
        return (vals[0], vals[-1]) if vals else (None, None)

    def _first_step(self, key: str) -> Optional[int]:
        return next((r["step"] for r in self.rows if key in r), None)

    def csv_text(self) -> str:
        flat = [{"step": r["step"], **numeric_metrics(r)} for r in self.rows]
        columns = list(dict.fromkeys(k for r in flat for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(flat)
        return buf.getvalue()

    def _time_lines(self) -> list[str]:
        st = self.state
        lines = [f"- steps: {st.step}; resumed at: {', '.join(map(str, st.resumes)) or 'never'}",
                 f"- wall time: {st.wall_seconds / 60:.1f} min ({st.wall_seconds:.0f} s) over every attempt, up to "
                 f"the last checkpoint"]
        hours = f"{st.worker_seconds / 3600:.3g} worker-hours ({st.world_size} workers)"
        if st.gpu_seconds:
            hours = f"{st.gpu_seconds / 3600:.3g} GPU-hours, " + hours
        lines.append(f"- spent: {hours}")
        return lines

    def markdown(self) -> str:
        out = [f"# Run {self.name}", "", f"Run folder: `{self.run_dir}`", "", *self._time_lines(), ""]
        evals = [k for k in dict.fromkeys(k for r in self.rows for k in r)
                 if k.startswith("eval_") and not k.startswith(REFERENCE_PREFIX)]
        if evals:
            first = self._first_step("eval_loss")
            out += ["## Held-out metrics", "", f"At step {first} and at step {self.state.step}.", "",
                    "| metric | first | last | change |", "|---|---|---|---|"]
            for k in evals:
                a, b = self.first_last(k)
                out.append(f"| {k} | {_fmt(a)} | {_fmt(b)} | {_change(a, b)} |")
            out.append("")
        shares = {k.removeprefix(SHARE_PREFIX): v for k, v in (self.rows[-1] if self.rows else {}).items()
                  if k.startswith(SHARE_PREFIX)}
        if shares:
            out += ["## Data mixture", "", f"The share of the training samples each source gave over the "
                    f"{self.state.step} steps (data.train weights, normalised; the sample order realises them within "
                    f"1/1024 over every 1024 samples).", "", "| source | realised share |", "|---|---|"]
            out += [f"| {name} | {share:.4f} |" for name, share in shares.items()] + [""]
        refs = reference_names(self.rows)
        if refs:
            task_a, task_b = self.first_last("eval_loss")
            out += ["## Forgetting", "",
                    "Loss on the reference sets (held-out data of the upstream distribution) beside the in-task gain: "
                    "a rise is what the fine-tune cost the model's earlier knowledge.", "",
                    "| reference set | loss first | loss last | change (forgetting) | in-task eval_loss change |",
                    "|---|---|---|---|---|"]
            for name in refs:
                a, b = self.first_last(f"{REFERENCE_PREFIX}{name}_loss")
                out.append(f"| {name} | {_fmt(a)} | {_fmt(b)} | {_change(a, b)} | {_change(task_a, task_b)} |")
            out.append("")
        return "\n".join(out)

    def plot(self, path: str) -> None:
        fig = Figure(figsize=(12, 4.5))  # no pyplot: no GUI backend, no global figure state
        ax1, ax2 = fig.subplots(1, 2)
        for key, style in (("loss", "-"), ("eval_loss", "o-")):
            pts = [(r["step"], r[key]) for r in self.rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax1.plot([s for s, _ in pts], [v for _, v in pts], style, label=key, markersize=3)
        ax1.set_xlabel("optimizer step")
        ax1.set_ylabel("loss")
        ax1.set_title(f"{self.name}: training and held-out loss")
        if ax1.has_data():
            ax1.set_yscale("log")
            ax1.legend()
        refs = reference_names(self.rows)
        if refs:
            for name in refs:
                key = f"{REFERENCE_PREFIX}{name}_loss"
                pts = [(r["step"], r[key]) for r in self.rows if isinstance(r.get(key), (int, float))]
                ax2.plot([s for s, _ in pts], [v for _, v in pts], "o-", label=name, markersize=3)
            ax2.set_ylabel("reference loss")
            ax2.set_title("forgetting: loss on the reference sets")
        else:
            pts = [(r["step"], r["lr"]) for r in self.rows if isinstance(r.get("lr"), (int, float))]
            ax2.plot([s for s, _ in pts], [v for _, v in pts], "-", label="lr")
            ax2.set_ylabel("learning rate")
            ax2.set_title("learning rate")
        ax2.set_xlabel("optimizer step")
        if ax2.has_data():
            ax2.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)

    def write(self, local: Optional[str] = None) -> dict[str, str]:
        """metrics.csv, curves.png and report.md into <run folder>/report (local or s3://; beside the WiSE-FT
        curve's files), built in `local` when given (kept, for the tracking server's copy)."""
        return publish_files(f"{self.run_dir}/{REPORT_DIR}",
                             {"metrics.csv": self.csv_text(), "report.md": self.markdown() + "\n"},
                             {"curves.png": self.plot}, local=local)


def load_run_report(run_uri: str) -> RunReport:
    """The report of the run at `run_uri` (<checkpoint.storage>/<name>) from its latest committed checkpoint."""
    run_uri = run_uri.rstrip("/")
    cs = CheckpointStore(run_uri)
    latest = cs.latest_valid()
    if latest is None:
        raise SpecError(f"{run_uri}: no committed checkpoint there (a run folder is <checkpoint.storage>/<name>, "
                        "and a report needs at least one checkpoint)")
    raw = cs.store.get_bytes(f"{latest.name}/{STATE_FILE}")
    if raw is None:
        raise SpecError(f"{latest.uri}: no {STATE_FILE} (not written by ftdist train)")
    return RunReport(latest.manifest.job_name, run_uri, TrainState.model_validate_json(raw))
