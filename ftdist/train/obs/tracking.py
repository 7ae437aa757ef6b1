"""The driver's side of tracking: check the MLflow server before Ray starts, plan where the attempt logs (no
request: rank 0 creates the run, or reopens the one an earlier attempt created, and logs the job's parameters once,
in its logging thread: obs/sinks.py), and at the end attach what the run produced (the run report while the export
runs, then the checkpoint and export URIs) and close it.

The run folder keeps `tracking.json`: the MLflow run id per tracking URI and the W&B run id, so a re-run of the job,
a RayJob retry or a worker restart continues the same tracking run. No torch, no Ray.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import ftdist
from ftdist.environ import temporary_environ
from ftdist.errors import SpecError, last_line
from ftdist.redact import redact
from ftdist.spec import JobSpec
from ftdist.spec.tracking import MLFLOW_URI_ENV, mlflow_uri_problem
from ftdist.storage.store import open_store
from ftdist.train.contracts import TrackingTarget

TRACKING_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a sweep's trials under the sweep's run
RUN_NAME_TAG = "mlflow.runName"
PROBE_TIMEOUT_S = 5


def mlflow_uri(spec: JobSpec) -> Optional[str]:
    """The tracking URI the job logs to: tracking.mlflow.tracking_uri, else MLFLOW_TRACKING_URI (None: no MLflow)."""
    m = spec.tracking.mlflow
    if m is None:
        return None
    uri = m.tracking_uri or os.environ.get(MLFLOW_URI_ENV)
    if not uri:
        raise SpecError(f"tracking.mlflow: no tracking URI: set tracking.mlflow.tracking_uri or {MLFLOW_URI_ENV}")
    if m.tracking_uri is None and (problem := mlflow_uri_problem(uri)):
        raise SpecError(f"{MLFLOW_URI_ENV}: {problem}")
    return uri


def experiment_name(spec: JobSpec) -> str:
    return spec.tracking.mlflow.experiment or spec.name


def _mlflow_http(retries: int, timeout_s: int) -> contextlib.AbstractContextManager:
    """MLflow's REST client retries a refused connection 7 times with backoff (minutes) by default: fine inside a
    long run, wrong for a check that must answer in seconds. Its settings are read from the environment per call."""
    return temporary_environ({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
                              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
                              # and no "🏃 View run ..." line from the client when a run ends: ftdist's output
                              # stays its own lines
                              "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"})


def describe_mlflow_error(e: BaseException, uri: str) -> str:
    """One line for an MLflow failure, without the client's stack of wrapped exceptions (or a credential)."""
    text = str(e)
    if re.search(r"\b(401|403)\b|Unauthorized|PERMISSION_DENIED|UNAUTHENTICATED", text):
        why = ("the server refused the credentials (MLflow reads MLFLOW_TRACKING_USERNAME + "
               "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN from the environment)")
    elif "NameResolution" in text or "Name or service not known" in text or "nodename nor servname" in text:
        why = "the host name does not resolve"
    elif "Connection refused" in text or "NewConnectionError" in text:
        why = "nothing accepts connections there"
    elif "timed out" in text.lower() or "Timeout" in text:
        why = f"no answer in {PROBE_TIMEOUT_S} s"
    elif re.search(r"error code (404|405)\b", text):
        why = "that is not an MLflow tracking server (its REST API answers 404)"
    else:
        why = last_line(e)
    return redact(f"tracking.mlflow: {uri}: {why}")


def _client(uri: str) -> Any:
    from mlflow import MlflowClient  # seconds of imports: only for jobs that track to MLflow

    return MlflowClient(tracking_uri=uri)


def check_tracking(spec: JobSpec) -> None:
    """Before Ray starts: the tracking server answers and takes this user's credentials, and the W&B client is
    installed (one-line SpecError otherwise; nothing is created)."""
    t = spec.tracking
    if t.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise SpecError("tracking.wandb: the wandb package is not installed here (pip install wandb)")
    uri = mlflow_uri(spec)
    if uri is None:
        return
    with _mlflow_http(retries=0, timeout_s=PROBE_TIMEOUT_S):
        try:
            exp = _client(uri).get_experiment_by_name(experiment_name(spec))
        except Exception as e:  # noqa: BLE001  (any client failure here is the user's server or credentials)
            raise SpecError(describe_mlflow_error(e, uri)) from None
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise SpecError(_deleted(exp.name))


def _deleted(name: str) -> str:
    return f"tracking.mlflow.experiment: {name} is deleted on the server (restore it, or choose another name)"


def flat_params(spec: JobSpec) -> dict[str, str]:
    """The resolved job spec as MLflow params: dotted keys, unset (None) values left out, lists as JSON, every value
    within MLflow's 6000 characters. A job spec holds no secrets (the schema refuses them); the redaction is a last
    guard."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif value is not None:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            out[prefix[:250]] = redact(text)[:6000]

    walk("", spec.model_dump(mode="json"))
    return out


def _read_saved(store: Any) -> dict:
    raw = store.get_bytes(TRACKING_FILE)
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise SpecError(_deleted(name))
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001  (another job created it a moment ago)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _mlflow_run(client: Any, target: TrackingTarget, saved_id: Optional[str]) -> tuple[str, bool]:
    """(run id, created): the run an earlier attempt created, reopened, or a new one with the job's params."""
    from mlflow.entities import Param, RunTag

    if saved_id:
        try:
            run = client.get_run(saved_id)
        except Exception:  # noqa: BLE001  (deleted or purged on the server: start a new one)
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            client.update_run(saved_id, status="RUNNING")
            client.log_batch(saved_id, tags=[RunTag(k, v) for k, v in target.mlflow_tags.items()])
            return saved_id, False
    tags = dict(target.mlflow_tags)
    if target.mlflow_parent_run_id:
        tags[PARENT_TAG] = target.mlflow_parent_run_id
    run = client.create_run(_experiment_id(client, target.mlflow_experiment), tags=tags,
                            run_name=target.mlflow_run_name)
    params = [Param(k, v) for k, v in target.params.items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per request
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id, True


def plan_tracking(spec: JobSpec, *, attempt: int, parent_run_id: Optional[str] = None,
                  group: Optional[str] = None, sweep: bool = False) -> TrackingTarget:
    """Where the job's attempt logs, decided without a request to any tracking server (after the run lease is held,
    so a refused second attempt creates nothing): rank 0 opens the MLflow run in its logging thread, while the
    workers load data and model, instead of the driver doing it on the path to the first step. `attempt`: the run
    lease's generation, tagged on the run. `sweep`: the sweep's own MLflow run, the parent of its trials' runs
    (TensorBoard and W&B get the trials' runs only: the sweep folder holds each trial's events, W&B groups the
    trials by the sweep's name)."""
    t = spec.tracking
    target: dict[str, Any] = {}
    if t.tensorboard and not sweep:
        target["tensorboard_dir"] = f"{spec.run_dir}/{TENSORBOARD_DIR}"
    uri = mlflow_uri(spec)
    if uri is not None:
        tags = {"ftdist.job": spec.name, "ftdist.attempt": str(attempt), "ftdist.version": ftdist.__version__,
                "ftdist.world_size": str(spec.resources.num_workers), "ftdist.run_dir": spec.run_dir,
                "ftdist.objective": spec.objective, "ftdist.method": spec.method}
        if sweep:
            tags["ftdist.sweep"] = spec.name
        target.update(mlflow_uri=uri, mlflow_experiment=experiment_name(spec), mlflow_tags=tags,
                      mlflow_run_name=t.mlflow.run_name or spec.name, mlflow_parent_run_id=parent_run_id)
    if t.wandb is not None and not sweep:
        store = open_store(spec.run_dir)
        saved = _read_saved(store)
        if "wandb_id" not in saved:
            saved["wandb_id"] = uuid.uuid4().hex[:16]
            store.put_bytes(TRACKING_FILE, json.dumps(saved, indent=1).encode())
        target.update(wandb_project=t.wandb.project, wandb_entity=t.wandb.entity, wandb_mode=t.wandb.mode,
                      wandb_id=saved["wandb_id"], wandb_name=spec.name, wandb_group=group)
    if uri is not None or "wandb_project" in target:
        target["params"] = flat_params(spec)
    return TrackingTarget(**target)


def open_mlflow_run(target: TrackingTarget, run_dir: str) -> tuple[str, bool]:
    """(run id, created): reopen the MLflow run tracking.json names for this server (an earlier attempt's or an
    earlier worker's), or create it with the job's params and record its id there. SpecError with one line if the
    server refuses."""
    uri = target.mlflow_uri
    store = open_store(run_dir)
    saved = _read_saved(store)
    runs = saved.setdefault("mlflow", {})
    with _mlflow_http(retries=2, timeout_s=30):
        try:
            run_id, created = _mlflow_run(_client(uri), target, runs.get(uri))
        except SpecError:
            raise
        except Exception as e:  # noqa: BLE001
            raise SpecError(describe_mlflow_error(e, uri)) from None
    if runs.get(uri) != run_id:
        runs[uri] = run_id
        store.put_bytes(TRACKING_FILE, json.dumps(saved, indent=1).encode())
    return run_id, created


def start_tracking(spec: JobSpec, *, attempt: int) -> TrackingTarget:
    """A sweep's own MLflow run, opened by its driver now: its trials' runs are its children."""
    target = plan_tracking(spec, attempt=attempt, sweep=True)
    if target.mlflow_uri is None:
        return target
    return target.model_copy(update={"mlflow_run_id": open_mlflow_run(target, spec.run_dir)[0]})


def _run_id(target: TrackingTarget, run_dir: str) -> str:
    """The run this attempt logged to: known (a sweep's), recorded by rank 0, or, when the attempt failed before rank 0
    opened it, opened now so the failure is on record."""
    if target.mlflow_run_id:
        return target.mlflow_run_id
    saved = _read_saved(open_store(run_dir)).get("mlflow", {}).get(target.mlflow_uri)
    return saved or open_mlflow_run(target, run_dir)[0]


def _upload(client: Any, run_id: str, files: list[tuple[str, str]]) -> None:
    """[(local file, artifact folder)], a few at a time (one request each)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        for f in [pool.submit(client.log_artifact, run_id, path, folder) for path, folder in files]:
            f.result()


def attach_report(target: TrackingTarget, run_dir: str, report_dir: str) -> Optional[str]:
    """Upload the run report's files to the MLflow run (while the export runs). A failure is a warning (returned)."""
    if not target.mlflow_uri or not os.path.isdir(report_dir):
        return None
    with _mlflow_http(retries=3, timeout_s=60):
        try:
            files = [(os.path.join(report_dir, n), "report") for n in sorted(os.listdir(report_dir))]
            _upload(_client(target.mlflow_uri), _run_id(target, run_dir), files)
        except Exception as e:  # noqa: BLE001
            return describe_mlflow_error(e, target.mlflow_uri)
    return None


def finish_tracking(target: TrackingTarget, run_dir: str, *, failed: bool,
                    outputs: dict[str, Optional[str]]) -> Optional[str]:
    """Attach the run's outputs (checkpoint and export URIs as tags and as ftdist/outputs.json) and close the MLflow
    run as FINISHED or FAILED. A tracking failure here is a warning (returned), never the run's failure: the run's
    results are in its folder either way."""
    if not target.mlflow_uri:
        return None
    import tempfile

    with _mlflow_http(retries=3, timeout_s=60):
        try:
            from mlflow.entities import RunTag

            client = _client(target.mlflow_uri)
            run_id = _run_id(target, run_dir)
            done = {k: v for k, v in outputs.items() if v}
            with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=1) as pool:
                path = os.path.join(tmp, "outputs.json")
                with open(path, "w") as fh:
                    json.dump(done, fh, indent=1)
                upload = pool.submit(client.log_artifact, run_id, path, "ftdist")  # beside the tags' request
                client.log_batch(run_id, tags=[RunTag(f"ftdist.{k}", v) for k, v in done.items()])
                upload.result()
            client.set_terminated(run_id, status="FAILED" if failed else "FINISHED",
                                  end_time=int(time.time() * 1000))
        except Exception as e:  # noqa: BLE001
            return describe_mlflow_error(e, target.mlflow_uri)
    return None
