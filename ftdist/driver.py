"""`run_training(spec)`: the driver side. Connects to (or starts) Ray, builds a Ray Train TorchTrainer with
DeepSpeed workers, and returns where the checkpoint and exported model are. `ftdist tune` calls this too."""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urlparse

from ftdist.config import JobSpec
from ftdist.errors import SpecError


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


def run_dir(spec: JobSpec) -> str:
    return f"{spec.checkpoint.resolved_storage()}/{spec.name}"


def export_uri(spec: JobSpec) -> str:
    return f"{run_dir(spec)}/export"


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast with one line instead of Ray's minute of retries when a cluster address is wrong."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise SpecError(f"--address {address}: expected host:port (GCS, e.g. 10.0.0.1:6379) or ray://host:10001")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise SpecError(f"--address {address}: cannot reach a Ray cluster there ({e.strerror or e})") from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Ray Train's controller takes a worker's ray.train.report result off a one-slot queue only when it polls the
# workers, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default); a report that comes sooner blocks training until
# then. Measured on the CPU benchmark (a report every ~1.5 s): 29% of a worker's wall time went to that wait. Polling
# every 0.5 s takes each result off before the next one comes, at the price of a few more small RPCs.
TRAIN_POLL_INTERVAL_S = "0.5"


def train_poll_env() -> dict[str, str]:
    """The controller poll interval for this job's actors (a value the user set is kept)."""
    value = os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_INTERVAL_S)
    return {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": value}


# The embedded Ray runs on the same cores as the workers (2 workers on a 2-core laptop is the quickstart), so it
# leaves out what a single-machine job never uses. Every idle Ray worker process wakes 100 times a second (its
# signal check), and each wakeup on a busy core preempts a training thread; measured on 2 cores, the training
# threads were preempted 4x as often under Ray Train as in the bare loop. Left out:
# - prestarted idle workers: Ray starts one per CPU for the first driver; Ray Train's actors, which carry the job's
#   runtime env, never use them;
# - the preemption watcher (RAY_TRAIN_ENABLE_PREEMPTION_WATCHER): it watches for a cloud node being reclaimed;
# - the dashboard (a head process, 9 module processes and more wakeups in the agent), unless asked for
#   (`ftdist train --dashboard`; `ftdist tune` needs it, see below).
EMBEDDED_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
_embedded_env_set: list[str] = []  # the names connect_ray put into os.environ, taken out again by disconnect_ray


def connect_ray(address: Optional[str], num_cpus_hint: int, *, dashboard: bool = False) -> bool:
    """Join `address` / RAY_ADDRESS, or start an embedded local Ray (with its dashboard when `dashboard`). Returns
    True when ftdist started Ray."""
    import ray

    poll = train_poll_env()  # in this process too: Ray Train passes it on to the controller it starts from here
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = {"env_vars": {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **poll}}
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, runtime_env=env, logging_level="WARNING", log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise SpecError(f"--address {address}: {str(e).splitlines()[0][:300]}") from None
        return False
    # Embedded default: a local Ray on this machine's CPUs (enough for the requested workers + the controller).
    cpus = max(os.cpu_count() or 1, num_cpus_hint)
    for name, value in EMBEDDED_TRAIN_ENV.items():  # a value the user exported is kept
        if name not in os.environ:
            os.environ[name] = value
            _embedded_env_set.append(name)
        env["env_vars"][name] = os.environ[name]
    # The dashboard (on 127.0.0.1) serves the State API, which Ray Train's PlacementGroupCleaner polls to free the
    # workers' placement group of a trial that Tune stopped (without it, it warns every second and frees nothing).
    # The cleaner finds the API by auto-detecting "the" local Ray, which fails when another Ray runs on the machine
    # ("Found multiple active Ray instances"); naming our dashboard in RAY_API_SERVER_ADDRESS (driver and every
    # actor) points it at this cluster.
    missing = _dashboard_missing() if dashboard else None
    if missing:  # a minimal Ray (ray[train] without [default]): run without the dashboard rather than fail
        print(f"[ftdist] starting Ray without its dashboard: {missing} (pip install 'ray[default]'); with another "
              "Ray on this machine, trials that Tune stops may keep their placement groups", file=sys.stderr)
    api = None
    if dashboard and not missing:
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        env["env_vars"]["RAY_API_SERVER_ADDRESS"] = api
        os.environ["RAY_API_SERVER_ADDRESS"] = api
        opts: dict = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}
    else:
        opts = {"include_dashboard": False}
        # Ray Train's PlacementGroupCleaner asks the (absent) State API every second and warns each time.
        env["worker_process_setup_hook"] = "ftdist.driver.quiet_state_api_pollers"
    ray.init(num_cpus=cpus, runtime_env=env, logging_level="WARNING", log_to_driver=True,
             _system_config={"prestart_worker_first_driver": False}, **opts)
    if api:
        print(f"[ftdist] Ray dashboard: {api}", file=sys.stderr, flush=True)
    return True


# Loggers of Ray components that poll the State API and warn on every failed poll when Ray runs without its
# dashboard (which serves that API). The cleaner frees the placement group of a controller that died; in an embedded
# Ray, which ends with the job, that matters only for trials that Tune stops (so `ftdist tune` keeps the dashboard,
# and says so when it cannot start one).
_STATE_API_POLLERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_state_api_pollers() -> None:
    """worker_process_setup_hook of a dashboard-less embedded Ray: silence the per-second State API warnings."""
    import logging

    for name in _STATE_API_POLLERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _dashboard_missing() -> Optional[str]:
    """Why Ray's dashboard cannot start here (a package it needs is missing), or None."""
    try:
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError:  # a Ray without this helper: let ray.init decide
        return None
    err = get_dashboard_dependency_error()
    return str(err) if err else None


def disconnect_ray(started: bool) -> None:
    """Shut down the embedded Ray that connect_ray started (a joined cluster is left alone)."""
    if not started:
        return
    import ray

    ray.shutdown()
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    while _embedded_env_set:
        os.environ.pop(_embedded_env_set.pop(), None)


def build_trainer(spec: JobSpec, *, storage_path: Optional[str] = None, name: Optional[str] = None,
                  callbacks: Optional[list] = None) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    from ftdist.worker import train_fn_per_worker

    r, c = spec.resources, spec.checkpoint
    resources: dict = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        resources["GPU"] = r.gpus_per_worker
    from ftdist.storage import s3

    # Endpoint/region (not credentials) travel to workers on other nodes; each node's credential chain does the rest.
    worker_env = {"env_vars": {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **s3.forwarded_env()}}
    if not r.use_gpu:
        worker_env["env_vars"]["DS_ACCELERATOR"] = "cpu"
    storage = storage_path or spec.checkpoint.resolved_storage()
    storage_fs = None
    if s3.is_remote(storage):
        storage_fs = s3.pyarrow_fs()  # Ray's own files (run state, retention) go to the same endpoint
        storage = storage[len("s3://"):]
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "export_uri": export_uri(spec),
                           "started_at": time.time()},
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=r.num_workers,
            use_gpu=r.use_gpu,
            resources_per_worker=resources,
            accelerator_type=r.accelerator_type,
        ),
        run_config=RunConfig(
            name=name or spec.name,
            storage_path=storage,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=r.max_failures),
            # No num_to_keep: ftdist's storage-side retention (after each commit, manifest deleted first) is the one
            # deleter. Two deleters race: Ray's delete of a folder ftdist already removed fails the whole run.
            checkpoint_config=CheckpointConfig(
                checkpoint_score_attribute=c.keep_best_by,
                checkpoint_score_order=c.best_mode,
            ),
            worker_runtime_env=worker_env,
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )


def preflight_data(spec: JobSpec) -> Optional[str]:
    """Read and tokenize local data on the driver before Ray starts, so a bad row, a missing field or too little
    data is a one-line error (exit 2) with nothing written. Remote (s3://, hub) inputs are checked by the workers."""
    from ftdist.storage import is_remote

    tok_path = spec.model.tokenizer_path
    remote = [p for p in (spec.data.train, spec.data.eval, tok_path) if p and is_remote(p)]
    if remote or not os.path.isdir(os.path.expanduser(tok_path)):
        return None
    from ftdist.data import ShardedLoader, build_splits
    from ftdist.modeling import load_tokenizer

    tok = load_tokenizer(tok_path, spec.model.trust_remote_code)
    splits = build_splits(spec.data, tok, spec.optim.seed)
    ShardedLoader.for_job(spec, splits.train, 0, spec.resources.num_workers)  # raises if < one global batch
    return splits.stats.summary()


def preflight_storage(spec: JobSpec) -> None:
    """Before Ray starts: an s3:// checkpoint storage must be reachable with working credentials, an existing bucket
    and write access (one-line error, exit 2, nothing left behind). Also refuses to resume a checkpoint written by a
    different number of workers."""
    from ftdist.storage import s3
    from ftdist.storage.checkpoints import CheckpointStore
    from ftdist.storage.store import TransferOptions

    storage = spec.checkpoint.resolved_storage()
    if s3.is_remote(storage):
        s3.check_access(f"{storage}/{spec.name}", extra_args=spec.checkpoint.encryption.extra_args())
    try:
        latest = CheckpointStore(run_dir(spec), TransferOptions.from_spec(spec.checkpoint)).latest_valid()
    except Exception as e:  # noqa: BLE001  (listing errors surface again, with retries, in the workers)
        if s3.is_remote(storage):
            raise SpecError(s3.describe_error(e, run_dir(spec))) from None
        return
    if latest is not None and latest.manifest["world_size"] != spec.resources.num_workers:
        raise SpecError(f"resources.num_workers: {spec.resources.num_workers}, but {latest.uri} (the checkpoint this "
                        f"job would resume from) was written by {latest.manifest['world_size']} workers; set "
                        f"num_workers={latest.manifest['world_size']}, or use a new job name and start from "
                        f"`ftdist export {latest.uri} --to ...`")


def run_training(spec: JobSpec, *, address: Optional[str] = None, dashboard: bool = False) -> RunSummary:
    """Run one job to the end (resuming from this job name's latest checkpoint if there is one). `dashboard`: start
    the embedded Ray with its dashboard (ignored when joining a cluster)."""
    from ftdist.storage.lease import run_lease

    from ftdist.checkpointing import export_in_workers

    # A bad address fails here, before anything is written.
    started = connect_ray(address, spec.resources.num_workers + 1, dashboard=dashboard)
    try:
        with run_lease(run_dir(spec)) as lease:  # one live attempt per job: a second is refused here, in one line
            try:
                result = build_trainer(spec).fit()
            except KeyboardInterrupt:
                if not lease.lost:
                    raise
                return RunSummary(spec.name, run_dir(spec), None, None, {},
                                  error=RuntimeError("stopped: a newer attempt of this job took over the run lease"))
            except Exception as e:  # Ray raises TrainingFailedError/WorkerGroupError with the worker traceback inside
                return RunSummary(spec.name, run_dir(spec), None, None, {}, error=e)
            ckpt, history = _final_checkpoint(spec, result)
            error = result.error
            if error is None and ckpt and spec.export.enabled and not export_in_workers(spec):
                error = _streamed_export(spec, ckpt)
    finally:
        disconnect_ray(started)
    exp = export_uri(spec) if spec.export.enabled else None
    return RunSummary(spec.name, run_dir(spec), ckpt, exp, dict(result.metrics or {}), error=error, history=history)


def _final_checkpoint(spec: JobSpec, result: Any) -> tuple[Optional[str], list]:
    """(URI of the run's last checkpoint, the logged metrics history stored with it)."""
    if result.checkpoint is None:
        return None, []
    import json

    from ftdist.checkpointing import STATE_FILE
    from ftdist.storage.checkpoints import CheckpointStore

    store = CheckpointStore(run_dir(spec)).store  # read one small file, not the whole checkpoint
    name = os.path.basename(result.checkpoint.path.rstrip("/"))
    raw = store.get_bytes(f"{name}/{STATE_FILE}")
    return store.child(name), (json.loads(raw).get("history", []) if raw else [])


def _export_task(ckpt: str, dest: str, max_shard_size: str) -> dict:
    from ftdist.export import export_checkpoint

    return export_checkpoint(ckpt, dest, max_shard_size=max_shard_size, log=lambda m: print(m, flush=True))


def _streamed_export(spec: JobSpec, ckpt: str) -> Optional[BaseException]:
    """The end-of-job export under ZeRO-3: `ftdist export` of the final checkpoint, run as a 1-CPU Ray task on any
    node (one tensor in memory at a time, shards written as they fill). Returns the error, if any."""
    import ray

    from ftdist.storage import s3

    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", **s3.forwarded_env()}}
    task = ray.remote(num_cpus=1, runtime_env=env, max_retries=1)(_export_task)
    try:
        written = ray.get(task.remote(ckpt, export_uri(spec), spec.export.max_shard_size))
    except Exception as e:  # noqa: BLE001  (the checkpoint is committed: say how to retry the export alone)
        return RuntimeError(f"the export from {ckpt} failed ({str(e).strip().splitlines()[-1][:200]}); the "
                            f"checkpoint is committed: `ftdist export {ckpt} --to {export_uri(spec)}`")
    print(f"[ftdist] exported {', '.join(sorted(written))} to {export_uri(spec)} (streamed from {ckpt})", flush=True)
    return None
