"""Ray on the driver side: join a cluster or start the embedded local Ray, and the one runtime environment that
every ftdist process on Ray gets (Train workers, the export task, sweep trials)."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from typing import Optional
from urllib.parse import urlparse

import ray
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR  # the name Ray's job manager uses

from ftdist.errors import SpecError
from ftdist.net import unreachable
from ftdist.spec import ResourcesSpec
from ftdist.storage import s3
from ftdist.train.contracts import BASE_ENV

log = logging.getLogger("ftdist")



def runtime_env_vars(*, use_gpu: Optional[bool] = None) -> dict[str, str]:
    """Environment for ftdist's processes on Ray. Endpoint and region of S3 travel (never credentials: each node's
    own chain supplies those). With `use_gpu` given, DeepSpeed's accelerator is named before DeepSpeed is imported
    (auto-detection would pick CUDA on a GPU node for a CPU job, and an inherited DS_ACCELERATOR=cpu would keep a
    GPU job on the CPU)."""
    env = {**BASE_ENV, **s3.forwarded_env()}
    if use_gpu is not None:
        env["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"
    return env


def _job_env_vars() -> dict:
    """The environment variables of the Ray job this driver runs in (`ftdist submit`, a RayJob), as Ray hands the
    job's config to its entrypoint; {} outside one."""
    try:
        config = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR, "{}"))
        return dict((config.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast with one line instead of Ray's minute of retries when a cluster address is wrong."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:  # a port that is not a number
        host, port = None, None
    if not host or not port:
        raise SpecError(f"--address {address}: expected host:port (GCS, e.g. 10.0.0.1:6379) or ray://host:10001")
    if why := unreachable(host, port, timeout):
        raise SpecError(f"--address {address}: cannot reach a Ray cluster there ({why})")


def check_local_gpus(resources: ResourcesSpec) -> None:
    """Before an embedded Ray starts: it has this machine's GPUs, and a job asking for more would wait for them
    forever (Ray queues a placement it cannot make). CPUs are not checked: the embedded Ray is sized to the job."""
    if not resources.use_gpu:
        return
    import torch  # the driver's preflight has it loaded already (the data check)

    have = torch.cuda.device_count()
    if resources.gpus > have:
        raise SpecError(f"resources.gpus_per_worker: {resources.num_workers} workers x {resources.gpus_per_worker:g} "
                        f"GPUs need {resources.gpus:g} GPUs and this machine has {have}; give --address of a Ray "
                        f"cluster with GPUs, or set resources.gpus_per_worker: 0 to train on CPU")


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
_TOKEN_AUTH_NOTICE = "ray._private.authentication.authentication_token_setup"
_embedded_env_set: list[str] = []  # the names connect_ray put into os.environ, taken out again by disconnect_ray


def connect_ray(address: Optional[str], num_cpus_hint: int, *, dashboard: bool = False) -> bool:
    """Join `address` / RAY_ADDRESS, or start an embedded local Ray (with its dashboard when `dashboard`). Returns
    True when ftdist started Ray."""
    poll = train_poll_env()  # in this process too: Ray Train passes it on to the controller it starts from here
    if not sys.stdout.isatty():  # log files, CI and pod logs: plain worker-line prefixes, no colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    # The S3 endpoint and region travel with the job, so Tune's trial drivers (Ray workers) reach the same store.
    # Inside a submitted Ray job, ray.init refuses to set a variable the job's runtime env already sets (even to the
    # same value): those are left to the job.
    already = _job_env_vars()
    env = {"env_vars": {k: v for k, v in {**runtime_env_vars(), **poll}.items() if k not in already}}
    if address:
        check_reachable(address)
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
        env["worker_process_setup_hook"] = f"{__name__}.quiet_state_api_pollers"
    # Ray says at every start that token auth is on by default: true, and nothing to act on for a Ray that lives and
    # dies with this one command.
    logging.getLogger(_TOKEN_AUTH_NOTICE).setLevel(logging.ERROR)
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
    for name in _STATE_API_POLLERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _dashboard_missing() -> Optional[str]:
    """Why Ray's dashboard cannot start here (a package it needs is missing), or None."""
    try:  # a private helper: a Ray without it lets ray.init decide
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError:
        return None
    err = get_dashboard_dependency_error()
    return str(err) if err else None


def disconnect_ray(started: bool) -> None:
    """Shut down the embedded Ray that connect_ray started (a joined cluster is left alone)."""
    if not started:
        return
    ray.shutdown()
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    while _embedded_env_set:
        os.environ.pop(_embedded_env_set.pop(), None)
