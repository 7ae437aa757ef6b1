"""`ftdist submit|status|logs|stop|jobs`: ftdist jobs on a remote Ray cluster through the Ray Jobs API.

The submission runs `ftdist train|tune <job file>` on the cluster with the job file's folder as the Ray working dir
(local data and tokenizer next to the job file travel with it). Submission ids are derived from the job name:
`ftdist-<name>-<attempt>`; a name with a submission still pending or running is refused, a finished one gets the
next attempt. Because checkpoints live at `<checkpoint.storage>/<name>`, every attempt resumes from the previous
one's latest committed checkpoint.

Secrets never travel in a submission: credentials come from the cluster's own environment (Kubernetes Secrets,
workload identity); only non-secret settings (S3 endpoint, region) are forwarded, and `--env` refuses names that
look like secrets. Ray token auth (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token)
is added by Ray's own client; `--header` and `--ca-cert`/`--insecure` pass through to it.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from ftdist.errors import SpecError
from ftdist.net import http_host_port, unreachable
from ftdist.redact import env_secret_problem, key_hint
from ftdist.remote.k8s_render import entrypoint
from ftdist.remote.portability import check_paths, check_portable, is_under
from ftdist.spec import ENV_NAME_RE, JobSpec, check_local_inputs, load_spec
from ftdist.storage import s3
from ftdist.sweep.space import validate_sweep

PREFIX = "ftdist-"
ACTIVE = ("PENDING", "RUNNING")
META_JOB, META_ATTEMPT, META_KIND = "ftdist_job", "ftdist_attempt", "ftdist_kind"


def dashboard_address(address: Optional[str]) -> str:
    """The Jobs API address: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (as Ray's own CLI)."""
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not addr:
        raise SpecError("--address: give the Ray dashboard address, e.g. http://<head>:8265 "
                        "(or set RAY_API_SERVER_ADDRESS)")
    if "://" not in addr:
        raise SpecError(f"--address {addr}: the Jobs API needs the dashboard's HTTP address, e.g. http://{addr}")
    try:
        u = urlparse(addr)
        u.port  # noqa: B018  (parses the port: a non-number raises here, not deep in the client)
    except ValueError as e:
        raise SpecError(f"--address {addr}: not a valid URL ({e})") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise SpecError(f"--address {addr}: expected http(s)://<head>:8265 (the Ray dashboard), not {u.scheme}://")
    return addr.rstrip("/")


def _check_reachable(addr: str, timeout: float = 5.0) -> None:
    if why := unreachable(*http_host_port(addr), timeout):
        raise SpecError(f"--address {addr}: cannot reach the Ray dashboard there ({why})")


_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")  # an HTTP token (RFC 9110)


def parse_headers(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        k, sep, v = item.partition(":")
        if not sep or not _HEADER_NAME_RE.match(k.strip()):
            # What was typed is never quoted back: a header usually carries a credential (`Authorization=Bearer ..`).
            raise SpecError(f"--header {key_hint(item)}: expected 'Name: value' (the value is not shown)")
        out[k.strip()] = v.strip()
    return out


def client(address: Optional[str], headers: Optional[list[str]] = None, ca_cert: Optional[str] = None,
           insecure: bool = False):
    """A JobSubmissionClient, or a one-line SpecError (bad address, unreachable, auth refused)."""
    addr = dashboard_address(address)
    hdrs = parse_headers(headers or [])
    verify: Any = True
    if ca_cert:
        if not os.path.isfile(ca_cert):
            raise SpecError(f"--ca-cert {ca_cert}: no such file")
        verify = ca_cert
    elif insecure:
        verify = False
    _check_reachable(addr)
    try:
        return JobSubmissionClient(addr, headers=hdrs or None, verify=verify)
    except AuthenticationError as e:
        raise SpecError(f"--address {addr}: {_auth_hint(e)}") from None
    except (ConnectionError, RuntimeError, ValueError, OSError) as e:
        raise SpecError(f"--address {addr}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else e.__class__.__name__)[:300]


def _auth_hint(e: BaseException) -> str:
    text = str(e).lower()
    what = "the cluster refused the Ray auth token" if "failed" in text or "invalid" in text else \
        "the cluster requires a Ray auth token"
    return (f"{what}; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to this cluster's token")


# ---------------------------------------------------------------------------------------------------------------
# submissions


@dataclass
class Submission:
    submission_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "job"


def attempts(jobs: list, name: str) -> list:
    """This job name's submissions (JobDetails), oldest first."""
    mine = [j for j in jobs if (j.metadata or {}).get(META_JOB) == name and j.submission_id]
    return sorted(mine, key=lambda j: int((j.metadata or {}).get(META_ATTEMPT, 0)))


def next_attempt(jobs: list, name: str) -> int:
    """Refuse while an attempt is pending/running (it would write the same checkpoints); else the next number."""
    prev = attempts(jobs, name)
    live = [j for j in prev if _status(j) in ACTIVE]
    if live:
        j = live[-1]
        raise SpecError(f"job {name!r} is already {_status(j)} on this cluster as {j.submission_id}; follow it with "
                        f"`ftdist logs {j.submission_id} --follow`, or `ftdist stop {j.submission_id}` first")
    return 1 + max((int((j.metadata or {}).get(META_ATTEMPT, 0)) for j in prev), default=0)


def _status(j: Any) -> str:
    return str(getattr(j.status, "value", j.status))


def _env_vars(env: Optional[list[str]]) -> dict:
    env_vars = dict(s3.forwarded_env())  # endpoint and region only, never credentials
    for item in env or []:
        k, sep, v = item.partition("=")
        if not sep or not ENV_NAME_RE.match(k):
            raise SpecError(f"--env {key_hint(item)}: expected NAME=VALUE (the value is not shown)")
        if problem := env_secret_problem(k, v):
            raise SpecError(f"--env {k}: {problem}; secrets are never sent in a submission: put it in the cluster's "
                            f"environment (a Kubernetes Secret, see k8s/README.md) and ftdist reads it there")
        env_vars[k] = v
    return env_vars


def build_submission(job_file: str, spec: JobSpec, *, kind: str, attempt: int, overrides: list[str],
                     working_dir: Optional[str] = None, pip: Optional[list[str]] = None,
                     image: Optional[str] = None, env: Optional[list[str]] = None,
                     py_modules: Optional[list[str]] = None) -> Submission:
    """The Jobs API request. Without --image: the job file's folder is the working dir and the entrypoint names the
    file. With --image (Ray runs the image as is: no working dir, pip or py_modules next to it), the validated job
    travels inside the entrypoint (`--job-json`), as in a rendered RayJob."""
    runtime_env: dict = {"env_vars": _env_vars(env), "config": {"setup_timeout_seconds": 1800}}
    sid = f"{PREFIX}{_slug(spec.name)}-{attempt}"
    meta = {META_JOB: spec.name, META_ATTEMPT: str(attempt), META_KIND: kind}
    if image:
        if pip or py_modules or working_dir:
            raise SpecError("--image: Ray runs the image as is and cannot add --pip, --py-module or --working-dir to "
                            "it; install those in the image (cluster/Dockerfile)")
        runtime_env["image_uri"] = image
        return Submission(sid, entrypoint(spec, kind), runtime_env, meta)
    jf = Path(job_file).resolve()
    wd = Path(working_dir).resolve() if working_dir else jf.parent
    if not wd.is_dir():
        raise SpecError(f"--working-dir {working_dir}: no such directory")
    if not is_under(str(jf), wd):
        raise SpecError(f"--working-dir {wd}: the job file {job_file} must be inside it")
    runtime_env["working_dir"] = str(wd)
    if pip:
        runtime_env["pip"] = list(pip)
    if py_modules:  # local packages or wheels shipped to every node, e.g. a development checkout of ftdist itself
        for m in py_modules:
            if not os.path.exists(m):
                raise SpecError(f"--py-module {m}: no such file or directory")
        runtime_env["py_modules"] = [os.path.abspath(m) for m in py_modules]
    args = ["ftdist", kind, jf.relative_to(wd).as_posix()]
    for o in overrides:
        args += ["--set", o]
    return Submission(sid, shlex.join(args), runtime_env, meta)


def submit(job_file: str, overrides: list[str], *, address: Optional[str], kind: str = "train",
           headers: Optional[list[str]] = None, ca_cert: Optional[str] = None, insecure: bool = False,
           working_dir: Optional[str] = None, pip: Optional[list[str]] = None, image: Optional[str] = None,
           env: Optional[list[str]] = None, py_modules: Optional[list[str]] = None, log=None) -> tuple[Any, str]:
    spec = load_spec(job_file, overrides)
    check_local_inputs(spec)
    if kind == "tune":
        validate_sweep(spec, job_file)
    if image:  # nothing is shipped: every input must be reachable from the image's processes
        notes = check_portable(job_file, spec, overrides)
    else:
        wd = Path(working_dir).resolve() if working_dir else Path(job_file).resolve().parent
        notes = check_paths(job_file, spec, wd, overrides)
    # Everything local is checked (the request built with a placeholder attempt) before the cluster is asked,
    # and notes are printed only once the submission went through: an error is then the only line.
    build_submission(job_file, spec, kind=kind, attempt=0, overrides=overrides, working_dir=working_dir, pip=pip,
                     image=image, env=env, py_modules=py_modules)
    c = client(address, headers, ca_cert, insecure)
    attempt = next_attempt(_list(c), spec.name)
    sub = build_submission(job_file, spec, kind=kind, attempt=attempt, overrides=overrides,
                           working_dir=working_dir, pip=pip, image=image, env=env, py_modules=py_modules)
    try:
        sid = c.submit_job(entrypoint=sub.entrypoint, submission_id=sub.submission_id, runtime_env=sub.runtime_env,
                           metadata=sub.metadata, entrypoint_num_cpus=0)
    except RuntimeError as e:
        if "already exists" in str(e):  # a concurrent `ftdist submit` of the same name won the race
            raise SpecError(f"job {spec.name!r}: submission {sub.submission_id} already exists (submitted at the "
                            f"same time from elsewhere?); see `ftdist jobs`") from None
        raise SpecError(f"submit {sub.submission_id}: {_first_line(e)}") from None
    for note in notes:
        (log or _stderr)(f"ftdist: note: {note}")
    return c, sid


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _list(c: Any) -> list:
    try:
        return c.list_jobs()
    except RuntimeError as e:
        raise SpecError(f"listing jobs: {_first_line(e)}") from None


def info(c: Any, sid: str):
    try:
        return c.get_job_info(sid)
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise SpecError(f"{sid}: no such job on this cluster (see `ftdist jobs`)") from None
        raise SpecError(f"{sid}: {_first_line(e)}") from None


def stop(c: Any, sid: str) -> bool:
    info(c, sid)
    try:
        return c.stop_job(sid)
    except RuntimeError as e:
        raise SpecError(f"stop {sid}: {_first_line(e)}") from None


def follow(c: Any, sid: str, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; return its final status."""
    info(c, sid)

    async def tail() -> None:
        async for chunk in c.tail_job_logs(sid):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return wait(c, sid)


def wait(c: Any, sid: str, timeout: float = 60.0) -> str:
    """The final status (the log stream closes a moment before the status turns terminal)."""
    deadline = time.monotonic() + timeout
    while True:
        st = _status(info(c, sid))
        if st not in ACTIVE or time.monotonic() > deadline:
            return st
        time.sleep(0.5)


def exit_code(status: str) -> int:
    return {"SUCCEEDED": 0, "STOPPED": 3}.get(status, 1)


def rows(jobs: list, name: Optional[str] = None) -> Iterator[list[str]]:
    def ts(ms: Optional[int]) -> str:
        return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else ""

    mine = [j for j in jobs if (j.metadata or {}).get(META_JOB) and (name is None or j.metadata[META_JOB] == name)]
    for j in sorted(mine, key=lambda j: j.start_time or 0):
        m = j.metadata
        yield [j.submission_id, m[META_JOB], m.get(META_KIND, ""), m.get(META_ATTEMPT, ""), _status(j),
               ts(j.start_time), ts(j.end_time), (j.message or "").splitlines()[0][:80] if j.message else ""]
