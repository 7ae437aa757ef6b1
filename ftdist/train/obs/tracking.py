"""The driver's side of tracking: check the MLflow server before Ray starts, create the run (or find the one an
earlier attempt of the job created), log the job's parameters once, and at the end attach what the run produced
(checkpoint and export URIs, the run report) and close it. Rank 0 logs the metrics (obs/sinks.py).

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
                              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)})


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
            _client(uri).search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001  (any client failure here is the user's server or credentials)
            raise SpecError(describe_mlflow_error(e, uri)) from None


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
            raise SpecError(f"tracking.mlflow.experiment: {name} is deleted on the server (restore it, or choose "
                            "another name)")
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001  (another job created it a moment ago)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _mlflow_run(client: Any, spec: JobSpec, saved_id: Optional[str], tags: dict[str, str],
                parent_run_id: Optional[str]) -> str:
    """The run an earlier attempt created (reopened), or a new one with the job's params."""
    from mlflow.entities import Param, RunTag

    if saved_id:
        try:
            run = client.get_run(saved_id)
        except Exception:  # noqa: BLE001  (deleted or purged on the server: start a new one)
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            client.update_run(saved_id, status="RUNNING")
            client.log_batch(saved_id, tags=[RunTag(k, v) for k, v in tags.items()])
            return saved_id
    run_tags = dict(tags)
    if parent_run_id:
        run_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(_experiment_id(client, experiment_name(spec)), tags=run_tags,
                            run_name=spec.tracking.mlflow.run_name or spec.name)
    params = [Param(k, v) for k, v in flat_params(spec).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per request
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


def start_tracking(spec: JobSpec, *, attempt: int, parent_run_id: Optional[str] = None,
                   group: Optional[str] = None, sweep: bool = False) -> TrackingTarget:
    """Create or reopen the job's tracking runs (after the run lease is held, so a refused second attempt creates
    nothing) and say where rank 0 logs. `attempt`: the run lease's generation, tagged on the run. `sweep`: the
    sweep's own MLflow run, the parent of its trials' runs (TensorBoard and W&B get the trials' runs only: the sweep
    folder holds each trial's events, W&B groups the trials by the sweep's name)."""
    t = spec.tracking
    store = open_store(spec.run_dir)
    saved = _read_saved(store)
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
        runs = saved.setdefault("mlflow", {})
        with _mlflow_http(retries=2, timeout_s=30):
            try:
                runs[uri] = _mlflow_run(_client(uri), spec, runs.get(uri), tags, parent_run_id)
            except SpecError:
                raise
            except Exception as e:  # noqa: BLE001
                raise SpecError(describe_mlflow_error(e, uri)) from None
        target.update(mlflow_uri=uri, mlflow_run_id=runs[uri])
    if t.wandb is not None and not sweep:
        saved.setdefault("wandb_id", uuid.uuid4().hex[:16])
        target.update(wandb_project=t.wandb.project, wandb_entity=t.wandb.entity, wandb_mode=t.wandb.mode,
                      wandb_id=saved["wandb_id"], wandb_name=spec.name, wandb_group=group, params=flat_params(spec))
    if saved:
        store.put_bytes(TRACKING_FILE, json.dumps(saved, indent=1).encode())
    return TrackingTarget(**target)


def finish_tracking(target: TrackingTarget, *, failed: bool, outputs: dict[str, Optional[str]],
                    report_dir: Optional[str] = None) -> Optional[str]:
    """Attach the run's outputs (checkpoint and export URIs as tags and as outputs.json, the run report's files)
    and close the MLflow run as FINISHED or FAILED. A tracking failure here is a warning (returned), never the
    run's failure: the run's results are in its folder either way."""
    if not target.mlflow_run_id:
        return None
    import tempfile

    with _mlflow_http(retries=3, timeout_s=60):
        try:
            from mlflow.entities import RunTag

            client = _client(target.mlflow_uri)
            run_id = target.mlflow_run_id
            client.log_batch(run_id, tags=[RunTag(f"ftdist.{k}", v) for k, v in outputs.items() if v])
            with tempfile.TemporaryDirectory() as tmp:
                with open(os.path.join(tmp, "outputs.json"), "w") as fh:
                    json.dump({k: v for k, v in outputs.items() if v}, fh, indent=1)
                client.log_artifacts(run_id, tmp, "ftdist")
            if report_dir and os.path.isdir(report_dir):
                client.log_artifacts(run_id, report_dir, "report")
            client.set_terminated(run_id, status="FAILED" if failed else "FINISHED",
                                  end_time=int(time.time() * 1000))
        except Exception as e:  # noqa: BLE001
            return describe_mlflow_error(e, target.mlflow_uri or "")
    return None
