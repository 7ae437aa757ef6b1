"""`run_training(spec)`: the one driver. `ftdist train`, every sweep trial and a submitted job all run a job
through here: connect to (or start) Ray, hold the run lease, run a Ray Train TorchTrainer with DeepSpeed workers,
then export the final checkpoint."""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2.api.config import LoggingConfig

from ftdist.errors import SpecError, last_line
from ftdist.spec import JobSpec
from ftdist.storage import s3
from ftdist.storage.checkpoints import CheckpointStore
from ftdist.storage.lease import run_lease
from ftdist.storage.store import TransferOptions, check_local_folder, open_store
from ftdist.storage.uri import is_remote, without_scheme
from ftdist.train.contracts import JOB_FILE, STATE_FILE, TrackingTarget, TrainState, WorkerConfig
from ftdist.train.obs.report import RunReport, load_run_report
from ftdist.train.obs.tracking import attach_report, finish_tracking, plan_tracking
from ftdist.train.ray_runtime import connect_ray, disconnect_ray, runtime_env_vars

if TYPE_CHECKING:  # the data module imports torch; the driver imports it only inside preflight_data
    from ftdist.train.data import DataStats

EXPORT_DIR = "export"
ELASTIC_START_TIMEOUT_S = "5"
"""How long an elastic job's restart waits for its workers' placement group before Ray Train decides the size
again. The elastic policy sizes the group from resources it has seen reserved, which are placed at once; what does
not place within seconds counted a lost node that still looked free (measured: 24.2 s of a 40.4 s recovery at 20 s)."""


@dataclass
class RunSummary:
    name: str
    run_dir: str
    checkpoint: Optional[str]
    export_dir: Optional[str]
    metrics: dict
    error: Optional[BaseException] = None
    history: list = field(default_factory=list)
    """Every logged metrics row (step, loss, lr, eval_loss, ...) up to the final checkpoint."""
    state: Optional[TrainState] = None
    """The final checkpoint's trainer state (step, resumes, worker- and GPU-seconds spent)."""


def export_uri(spec: JobSpec) -> str:
    return f"{spec.run_dir}/{EXPORT_DIR}"


# The driver names the code that runs on Ray but does not import it: worker.py and export.py import torch, DeepSpeed,
# peft and transformers at their top. On the driver (a laptop, a CPU-only head node) that is seconds of imports for
# nothing, and inside a Ray job whose working dir was removed under it torch._dynamo fails at import (it calls
# os.getcwd()). These two trampolines import them where they run.
def _train_fn_per_worker(config: dict) -> None:
    from ftdist.train.worker import train_fn_per_worker

    train_fn_per_worker(config)


def _export_task(ckpt: str, dest: str, max_shard_size: Optional[str]) -> dict:
    from ftdist.train.export import export_checkpoint

    return export_checkpoint(ckpt, dest, max_shard_size=max_shard_size)


def run_export_task(ckpt: str, dest: str, max_shard_size: Optional[str] = None) -> dict:
    """An export (train/export.py) of a committed checkpoint as a 1-CPU Ray task on any node, after the workers
    released their memory: the end of `ftdist train` and a sweep's best trial. Raises a RuntimeError that says how
    to retry the export alone."""
    env = {"env_vars": runtime_env_vars(use_gpu=False)}  # reads checkpoint files: no accelerator needed
    task = ray.remote(num_cpus=1, runtime_env=env, max_retries=1)(_export_task)
    try:
        return ray.get(task.remote(ckpt, dest, max_shard_size))
    except Exception as e:  # noqa: BLE001  (the checkpoint is committed: say how to retry the export alone)
        raise RuntimeError(f"the export from {ckpt} failed ({last_line(e)}); the "
                           f"checkpoint is committed: `ftdist export {ckpt} --to {dest}`") from None


def build_trainer(spec: JobSpec, *, callbacks: Optional[list] = None,
                  tracking: TrackingTarget = TrackingTarget(), lease_generation: int = 0) -> TorchTrainer:
    r, c = spec.resources, spec.checkpoint
    resources: dict = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        resources["GPU"] = r.gpus_per_worker
    storage = spec.checkpoint.resolved_storage()
    # Ray's own files (run state) go to the same endpoint as ftdist's checkpoints.
    storage_fs = s3.pyarrow_fs() if is_remote(storage) else None
    config = WorkerConfig(spec=spec, started_at=time.time(), tracking=tracking, lease_generation=lease_generation)
    return TorchTrainer(
        _train_fn_per_worker,
        train_loop_config=config.model_dump(mode="json"),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            # Elastic: Ray Train starts at any size in the range that fits and resizes by restarting the workers,
            # which resume from the latest committed checkpoint at the new size (train/universal.py).
            num_workers=(r.min_workers, r.num_workers) if r.elastic else r.num_workers,
            **({"elastic_resize_monitor_interval_s": r.elastic_check_s} if r.elastic else {}),
            use_gpu=r.use_gpu,
            resources_per_worker=resources,
            accelerator_type=r.accelerator_type,
        ),
        run_config=RunConfig(
            name=spec.name,
            storage_path=without_scheme(storage),
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=r.max_failures),
            # No num_to_keep: ftdist's storage-side retention (after each commit, manifest deleted first) is the one
            # deleter. Two deleters race: Ray's delete of a folder ftdist already removed fails the whole run.
            checkpoint_config=CheckpointConfig(
                checkpoint_score_attribute=c.keep_best_by,
                checkpoint_score_order=c.best_mode,
            ),
            worker_runtime_env={"env_vars": runtime_env_vars(use_gpu=r.use_gpu)},
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )


@dataclass
class DataCheck:
    stats: "DataStats"
    how: str
    """What the check did: "prepared in 12.3 s", "prepared data reused", "tokenised in 3.1 s (data.cache off)"."""

    def line(self) -> str:
        return f"{self.stats.summary()} ({self.how})"


def preflight_data(spec: JobSpec) -> Optional[DataCheck]:
    """Before Ray starts: the job's data tokenised once into its prepared entry (train/prepare.py), or the entry found
    and verified, so a bad row, a missing field or too little data is a one-line error (exit 2) with nothing written,
    and the workers only open what is there. Returns the statistics (rows, tokens, skipped bad rows). The tokenizer
    comes from its folder or the hub (a hub id that does not exist is an error here; no connection to the hub, or an
    s3:// tokenizer, leaves the preparation to the workers). data.cache off: the data is tokenised here as a check,
    and again by every worker."""
    # transformers and the tokenizer stay off the path of `ftdist validate`.
    from ftdist.train.data import DataStats, build_splits
    from ftdist.train.evaluation import load_references
    from ftdist.train.generation import load_metric_function, load_prompts
    from ftdist.train.locations import preflight_tokenizer
    from ftdist.train.model_config import check_from_config
    from ftdist.train.objectives import objective_for
    from ftdist.train.prepare import Runner, check_prepared_root, plan_processes, prepare_sources, source_specs
    from ftdist.train.sampling import raise_too_few

    check_from_config(spec.model)
    gen = spec.eval.generate
    if gen is not None:
        load_metric_function(gen)  # an unknown function or module is one line now
    if is_remote(spec.model.tokenizer_path):
        return None
    tok = preflight_tokenizer(spec.model)
    if tok is None:
        return None
    # The small inputs first: their mistakes are found before the data is prepared (and stored).
    if not any(is_remote(r.path) for r in spec.eval.reference):
        load_references(spec, tok)  # a bad reference row is a file:line error now, not in every worker
    if gen is not None and not is_remote(gen.data or spec.data.eval):
        load_prompts(spec, tok)  # a row without a prompt or reference is a file:line error now
    objective = objective_for(spec)

    def one_global_batch(n_train: int) -> None:  # raises if fewer examples than one global batch
        if n_train < spec.optim.global_batch_size:
            raise_too_few(n_train, spec.optim.global_batch_size)

    t0 = time.perf_counter()
    stats = DataStats()
    if spec.prepared_root is None:
        n_train = 0
        for src, alone in source_specs(spec):
            splits = build_splits(alone.data, tok, spec.optim.seed, objective_for(alone).encoder(tok), show=True)
            stats.merge(splits.stats)
            n_train += len(splits.train) if src.weight > 0 else 0
        one_global_batch(n_train)
        return DataCheck(stats, f"tokenised in {time.perf_counter() - t0:.1f} s; data.cache off: every worker "
                                f"tokenises it again")
    check_prepared_root(spec)
    prepared = prepare_sources(spec, tok, objective, Runner(plan_processes(spec)), show=True,
                               accept=one_global_batch)
    for _, manifest, _ in prepared:
        stats.merge(manifest.data_stats())
    built = sum(b for *_, b in prepared)
    how = (f"prepared in {time.perf_counter() - t0:.1f} s" + (f", {built} of {len(prepared)} sources" if
                                                               len(prepared) > 1 and built < len(prepared) else "")
           if built else f"prepared data reused, checked in {time.perf_counter() - t0:.1f} s")
    return DataCheck(stats, how)


def preflight_storage(spec: JobSpec) -> Optional[str]:
    """Before Ray starts: an s3:// checkpoint storage must be reachable with working credentials, an existing bucket
    and write access (one-line error, exit 2, nothing left behind). Also refuses a second live attempt of the job
    (the run lease, read only). Returns a note when the checkpoint it resumes from was written by another number of
    workers."""
    storage = spec.checkpoint.resolved_storage()
    if is_remote(storage):
        s3.check_access(f"{storage}/{spec.name}", extra_args=spec.checkpoint.encryption.extra_args())
    else:
        check_local_folder(storage, "checkpoint.storage")
    try:
        latest = CheckpointStore(spec.run_dir, TransferOptions.from_spec(spec.checkpoint)).latest_valid()
    except Exception as e:  # noqa: BLE001  (listing errors surface again, with retries, in the workers)
        if is_remote(storage):
            raise SpecError(s3.describe_error(e, spec.run_dir)) from None
        return None
    run_lease(spec.run_dir).refuse_if_held()  # read only: a live attempt is refused before Ray starts
    if latest is not None and latest.manifest.world_size != spec.resources.num_workers and not spec.resources.elastic:
        # Resumable at any world size (train/universal.py); the global batch still divides (validated already).
        return (f"{latest.uri} was written by {latest.manifest.world_size} workers and this run has "
                f"{spec.resources.num_workers}: it resumes from the checkpoint's universal form (converted once, "
                "then stored beside it)")
    return None


def run_training(spec: JobSpec, *, address: Optional[str] = None, dashboard: bool = False,
                 callbacks: Optional[list] = None, tracking_parent: Optional[str] = None,
                 tracking_group: Optional[str] = None) -> RunSummary:
    """Run one job to the end (resuming from this job name's latest checkpoint if there is one), then export its
    final checkpoint when export.enabled. `dashboard`: start the embedded Ray with its dashboard (ignored when
    joining a cluster or inside a running Ray, as in a sweep trial). `callbacks`: Ray Train callbacks (a sweep
    trial forwards reports to Tune with one). `tracking_parent`, `tracking_group`: a sweep trial's MLflow parent
    run and W&B group. A failure comes back in RunSummary.error, never as an exception."""
    # A bad address fails here, before anything is written.
    if spec.resources.elastic:
        # A lost node can still count as free for a while: Ray Train's first restart then waits for a placement group
        # that never places, 60 s by default, before it decides the size again. An elastic job gives up sooner (a
        # value the user set is kept; Ray Train passes it from here to its controller).
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", ELASTIC_START_TIMEOUT_S)
    started = connect_ray(address, math.ceil(spec.resources.cpus) + 1, dashboard=dashboard)
    ckpt, state, metrics, error = None, None, {}, None
    try:
        with run_lease(spec.run_dir) as lease:  # one live attempt per job: a second is refused here, in one line
            open_store(spec.run_dir).put_bytes(JOB_FILE, spec.model_dump_json(indent=1).encode())
            tracking = plan_tracking(spec, attempt=lease.generation, parent_run_id=tracking_parent,
                                     group=tracking_group)
            try:
                result = build_trainer(spec, callbacks=callbacks, tracking=tracking,
                                       lease_generation=lease.generation).fit()
            except KeyboardInterrupt:
                if not lease.lost:
                    raise
                error = RuntimeError("stopped: a newer attempt of this job took over the run lease")
            except Exception as e:  # Ray raises TrainingFailedError/WorkerGroupError with the worker traceback inside
                error = e
            else:
                ckpt, state = _final_checkpoint(spec, result)
                metrics, error = dict(result.metrics or {}), result.error
            with RunReporting(spec, state, tracking) as reporting:  # the report, and its upload beside the export
                if error is None and ckpt and spec.export.enabled:
                    try:
                        written = run_export_task(ckpt, export_uri(spec))
                        print(f"[ftdist] exported {', '.join(sorted(written))} to {export_uri(spec)} (from {ckpt})",
                              flush=True)
                    except RuntimeError as e:
                        error = e
                exp = export_uri(spec) if spec.export.enabled and error is None else None
                reporting.close(failed=error is not None, outputs={"checkpoint_uri": ckpt, "export_uri": exp})
    finally:
        disconnect_ray(started)
    return RunSummary(spec.name, spec.run_dir, ckpt, exp, metrics, error=error,
                      history=state.history if state else [], state=state)


class RunReporting:
    """The run report into the run folder (also after a failure: what the last checkpoint recorded) and its upload
    to the tracking run, in a thread while the export runs; then the tracking runs closed with the outputs. Neither
    can fail the run."""

    def __init__(self, spec: JobSpec, state: Optional[TrainState], tracking: TrackingTarget) -> None:
        self.spec, self.state, self.tracking = spec, state, tracking
        self.tmp = tempfile.TemporaryDirectory(prefix="ftdist-report-")
        self.warnings: list[str] = []
        self.thread = threading.Thread(target=self._report, name="ftdist-report", daemon=True)

    def __enter__(self) -> "RunReporting":
        self.thread.start()
        return self

    def _report(self) -> None:
        spec = self.spec
        try:
            report = RunReport(spec.name, spec.run_dir, self.state) if self.state else load_run_report(spec.run_dir)
            files = report.write(self.tmp.name)
            print(f"[ftdist] run report: {files['report.md']}", flush=True)
        except Exception as e:  # noqa: BLE001  (no checkpoint yet, or storage trouble: the run's result stands)
            print(f"[ftdist] no run report: {last_line(e, 300)}", flush=True)
            return
        self.warnings.append(attach_report(self.tracking, spec.run_dir, self.tmp.name))

    def close(self, *, failed: bool, outputs: dict) -> None:
        self.thread.join()
        self.warnings.append(finish_tracking(self.tracking, self.spec.run_dir, failed=failed, outputs=outputs))
        for warning in dict.fromkeys(w for w in self.warnings if w):
            print(f"[ftdist] {warning} (the run's results are in {self.spec.run_dir})", flush=True)

    def __exit__(self, *exc: Any) -> None:
        self.thread.join()
        self.tmp.cleanup()


def _final_checkpoint(spec: JobSpec, result: Any) -> tuple[Optional[str], Optional[TrainState]]:
    """(URI of the run's last checkpoint, the trainer state stored with it)."""
    if result.checkpoint is None:
        return None, None
    store = CheckpointStore(spec.run_dir).store  # read one small file, not the whole checkpoint
    name = os.path.basename(result.checkpoint.path.rstrip("/"))
    raw = store.get_bytes(f"{name}/{STATE_FILE}")
    return store.child(name), (TrainState.model_validate_json(raw) if raw else None)
