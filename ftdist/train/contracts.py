"""What crosses a process boundary between the driver and the Ray Train workers, typed and validated where it is
read: the worker's config, the trainer state saved with each checkpoint, and the names of the reported metrics."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from ftdist.spec import JobSpec

BASE_ENV = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
"""Environment of every ftdist process on Ray (and in a rendered RayJob): line-buffered output through Ray's log
forwarding; no fork warnings from the Rust tokenizers in Ray workers."""

# Reported by every worker at each log interval (and at eval/checkpoint steps); the sweep metric and
# checkpoint.keep_best_by name one of these.
TRAIN_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "epoch", "train_time_s",
                 "host_mem_peak_gib")
GPU_METRICS = ("gpu_mem_peak_gib",)
"""Reported besides TRAIN_METRICS when the workers have GPUs. The memory peaks are rank 0's process since its start
(GPU: what torch allocated; host: its resident set): what a memory plan is checked against."""
PREFERENCE_METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy")
CLASSIFICATION_METRICS = ("accuracy",)
OBJECTIVE_TRAIN_METRICS = {"sft": (), "dpo": PREFERENCE_METRICS, "reward": PREFERENCE_METRICS,
                           "classification": CLASSIFICATION_METRICS}
"""What each objective reports at every log interval besides TRAIN_METRICS (a reward model's rewards are its head's
scores, a DPO policy's are beta x its log-ratios to the reference: the same names, so sweeps and dashboards read
both alike)."""
OBJECTIVE_EVAL_METRICS = {"sft": ("eval_loss", "eval_perplexity"),
                          "dpo": ("eval_loss",) + tuple(f"eval_{m}" for m in PREFERENCE_METRICS),
                          "reward": ("eval_loss",) + tuple(f"eval_{m}" for m in PREFERENCE_METRICS),
                          "classification": ("eval_loss", "eval_accuracy", "eval_macro_f1")}
"""What each objective reports at every evaluation."""
EVAL_METRICS = tuple(dict.fromkeys(m for names in OBJECTIVE_EVAL_METRICS.values() for m in names))
STARTUP_KEY = "startup"
"""Sent once, with the first report after the first step: where the time to the first step went."""


def reported_metrics(spec: JobSpec) -> tuple[str, ...]:
    """The metric names a run of this job reports."""
    evals = OBJECTIVE_EVAL_METRICS[spec.objective] if spec.has_eval else ()
    references = tuple(r.metric for r in spec.eval.reference)
    generated = spec.eval.generate.metric_names if spec.eval.generate else ()
    return (TRAIN_METRICS + (GPU_METRICS if spec.resources.use_gpu else ())
            + OBJECTIVE_TRAIN_METRICS[spec.objective] + evals + references + generated
            + spec.data.source_metrics(spec.has_eval))


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrackingTarget(_Contract):
    """Where rank 0 logs a run's metrics, planned by the driver without a request to any server: rank 0 creates or
    reopens the MLflow run itself (obs/sinks.py, in its logging thread, while the workers load data and model), and
    `<run folder>/tracking.json` keeps its id, so every attempt and every restarted worker logs into the same run.
    No credentials: the logging process reads them from its environment."""

    mlflow_uri: Optional[str] = None
    mlflow_run_id: Optional[str] = None
    """Known in advance only for a sweep's own run; a training run's id is in tracking.json once rank 0 opened it."""
    mlflow_experiment: Optional[str] = None
    mlflow_run_name: Optional[str] = None
    mlflow_parent_run_id: Optional[str] = None
    """A sweep trial's parent: the sweep's run."""
    mlflow_tags: dict[str, str] = {}
    """Set on the run when it is created or reopened (job, attempt, world size, version, ...)."""
    tensorboard_dir: Optional[str] = None
    """<run folder>/tensorboard: a local folder, or an s3:// prefix the events are uploaded to."""
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_mode: Optional[str] = None
    wandb_id: Optional[str] = None
    wandb_name: Optional[str] = None
    wandb_group: Optional[str] = None
    """A sweep's name: W&B groups its trials' runs."""
    params: dict[str, str] = {}
    """The flattened job spec: MLflow's params (logged once, when the run is created) and W&B's config."""

    @property
    def any(self) -> bool:
        return bool(self.mlflow_uri or self.tensorboard_dir or self.wandb_project)


class WorkerConfig(_Contract):
    """Ray Train's `train_loop_config` for `train_fn_per_worker` (travels as a dict; validated in the worker)."""

    spec: JobSpec
    started_at: float
    """Wall-clock time the driver called fit(): the start of the startup breakdown."""
    tracking: TrackingTarget = TrackingTarget()
    lease_generation: int = 0
    """The driver's run-lease generation: rank 0 commits and deletes checkpoints only while it is the newest (0: no
    fencing)."""


JOB_FILE = "ftdist_job.json"
"""In the run folder: the resolved job spec of the latest attempt (what `ftdist export --eval` evaluates with)."""
STATE_FILE = "ftdist_state.json"
FROZEN_FILE = "frozen.json"
"""In a checkpoint's hf/ folder when it leaves its frozen parameters out: {name: shape} of each, which the export
takes from the base model."""


class TrainState(_Contract):
    """ftdist_state.json, written by rank 0 into each checkpoint: where training resumes."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # checkpoints from before this model carry no more keys

    step: int = Field(ge=0)
    tag: str
    """DeepSpeed's checkpoint tag (the step folder inside the checkpoint)."""
    world_size: int = Field(ge=1)
    metrics: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    """Every logged metrics row up to this step."""
    resumes: list[int] = []
    """Steps at which this run resumed (a restart after a crash, or a re-run of the job)."""
    worker_seconds: float = 0.0
    """Wall seconds x workers that every attempt up to this checkpoint spent (start-up, training, evaluation,
    checkpoint saves). An attempt's work after its last checkpoint, which the next attempt redoes, is not counted."""
    gpu_seconds: float = 0.0
    """The same in GPU-seconds (wall seconds x workers x GPUs per worker)."""
    wall_seconds: float = 0.0
    """The same in wall seconds (every attempt's, from its start to this checkpoint)."""
