"""The WiSE-FT curve (Wortsman et al., 2022): `ftdist export CKPT --interpolate 0,0.25,0.5,0.75,1 --eval` writes
(with --to) and evaluates the weight interpolations (1 - alpha) * base + alpha * fine-tuned, and reports the job's
task metrics beside its reference sets' loss per alpha: the accuracy/robustness trade-off of weight interpolation,
measured. The checkpoint is downloaded once; each alpha's model is written one tensor at a time (LoRA: merged), then
evaluated in this process as the job's evaluations measure it (train/evaluation.py, with the job spec the run left
in its folder)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

from matplotlib.figure import Figure

from ftdist.errors import SpecError
from ftdist.spec import JobSpec, parse_size, spec_from_dict
from ftdist.storage.cache import publish_dir, publish_files
from ftdist.storage.store import open_store
from ftdist.train.contracts import JOB_FILE
from ftdist.progress import progress
from ftdist.train.obs.report import REPORT_DIR



def parse_alphas(text: str) -> list[float]:
    """`0,0.25,0.5` -> [0.0, 0.25, 0.5]; each in [0, 1], no repeats."""
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise SpecError(f"--interpolate {text}: give alphas as numbers, e.g. 0,0.25,0.5,0.75,1") from None
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise SpecError(f"--interpolate {text}: alpha must be between 0 (base) and 1 (fine-tuned)")
    if len(set(alphas)) != len(alphas):
        raise SpecError(f"--interpolate {text}: an alpha is repeated")
    return alphas


def load_job(job_uri: str) -> JobSpec:
    raw = open_store(job_uri).get_bytes(JOB_FILE)
    if raw is None:
        raise SpecError(f"{job_uri}: no {JOB_FILE} (ftdist train writes it when a run starts): the evaluation needs "
                        "the job's eval data, reference sets and generation settings")
    return spec_from_dict(json.loads(raw), f"{job_uri}/{JOB_FILE}")


@dataclass
class WiseFtCurve:
    job: str
    checkpoint: str
    rows: list[dict]
    """One per alpha: {"alpha": a, metric: value, ...}."""
    models: dict[float, str]
    """alpha -> where its model was written (with --to)."""

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(k for r in self.rows for k in r if k != "alpha"))

    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["alpha", *self.metrics], lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        return buf.getvalue()

    def markdown(self) -> str:
        cols = ["alpha", *self.metrics]
        out = [f"WiSE-FT curve of {self.checkpoint}: (1 - alpha) * base + alpha * fine-tuned (0: the base model, "
               "1: the fine-tuned one)", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            out.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                         for c in cols) + " |")
        return "\n".join(out)

    def plot(self, path: str) -> None:
        """Left: the losses against alpha. Right: the trade-off, the task metric against the reference loss."""
        fig = Figure(figsize=(12, 4.5))  # no pyplot: no GUI backend, no global figure state
        ax1, ax2 = fig.subplots(1, 2)
        alphas = [r["alpha"] for r in self.rows]
        for m in (m for m in self.metrics if m.endswith("_loss")):
            ax1.plot(alphas, [r.get(m) for r in self.rows], "o-", label=m)
        ax1.set_xlabel("alpha (0 = base, 1 = fine-tuned)")
        ax1.set_title("losses per interpolation")
        if ax1.has_data():
            ax1.set_yscale("log")
            ax1.legend(fontsize=7)
        refs = [m for m in self.metrics if m.startswith("eval_ref_")]
        task = next((m for m in self.metrics if m.startswith("eval_gen_")), None) or next(
            (m for m in self.metrics if m not in refs), None)
        if refs and task:
            xs, ys = [r.get(refs[0]) for r in self.rows], [r.get(task) for r in self.rows]
            ax2.plot(xs, ys, "o-")
            for a, x, y in zip(alphas, xs, ys):
                ax2.annotate(f"{a:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax2.set_xlabel(f"{refs[0]} (forgetting: lower is better)")
            ax2.set_ylabel(task)
            ax2.set_title("task against upstream: the WiSE-FT trade-off")
        fig.tight_layout()
        fig.savefig(path, dpi=110)

    def write(self, dest: str) -> dict[str, str]:
        """The curve's CSV, Markdown table and plot into `dest` (local folder or s3:// prefix), beside what is
        there (a run's report/ keeps its other files)."""
        return publish_files(dest, {"wise_ft.csv": self.csv_text(), "wise_ft.md": self.markdown() + "\n"},
                             {"wise_ft.png": self.plot})


def _load_model(spec: JobSpec, folder: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if spec.has_score_head else AutoModelForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return cls.from_pretrained(folder, dtype="auto").to(device).eval()


def wise_ft_curve(ckpt_uri: str, alphas: list[float], *, dest: Optional[str] = None, evaluate: bool = True,
                  base_model: Optional[str] = None, max_shard_size: Optional[str] = None) -> WiseFtCurve:
    """Write (to `dest`/alpha_<a>, when given) and evaluate (when `evaluate`) each interpolation."""
    from ftdist.train.evaluation import evaluate_alone
    from ftdist.train.export import FetchedCheckpoint, split_checkpoint_uri
    from ftdist.train.locations import load_tokenizer
    from ftdist.train.objectives import objective_for

    job_uri, _ = split_checkpoint_uri(ckpt_uri)
    spec = load_job(job_uri) if evaluate else None
    rows, models = [], {}
    with FetchedCheckpoint(ckpt_uri) as ck:
        shard_size = max_shard_size or ck.manifest.export_max_shard_size
        parse_size(shard_size)
        base = ck.base(base_model)
        if evaluate:
            tokenizer = load_tokenizer(ck.hf_dir, spec.model.trust_remote_code)
            objective = objective_for(spec)
        for alpha in progress(alphas, len(alphas), "WiSE-FT interpolations"):
            folder = os.path.join(ck.work, f"alpha_{alpha:g}")
            ck.write(ck.model_weights(alpha, base), folder, shard_size)
            if dest:
                models[alpha] = publish_dir(folder, f"{dest.rstrip('/')}/alpha_{alpha:g}")
            if evaluate:
                metrics = evaluate_alone(spec, objective, _load_model(spec, folder), tokenizer)
                rows.append({"alpha": alpha, **metrics})
                print(f"[ftdist] alpha {alpha:g}: " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                      flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    return WiseFtCurve(job_uri.rsplit("/", 1)[-1], ckpt_uri, rows, models)


def curve_destination(ckpt_uri: str) -> str:
    """Where the curve's table and plot go: the run's report/ folder."""
    from ftdist.train.export import split_checkpoint_uri

    return f"{split_checkpoint_uri(ckpt_uri)[0]}/{REPORT_DIR}"
