"""`ftdist k8s render --apply [--wait]`: create the rendered RayJob through the Kubernetes API (kubernetes client,
field validation Strict), one attempt at a time, and follow its status.

Attempts: the RayJob of a job is `ftdist-<name>`, then `ftdist-<name>-2`, ... (label ftdist.io/job). While an
attempt is still active a new one is refused: both would write the same checkpoint prefix. A new attempt after a
finished one resumes from the latest committed checkpoint, since the job name and storage are the same.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Optional

from ftdist.errors import SpecError

# The Kubernetes client is the optional `k8s` extra: its imports stay inside the functions, so a missing package is
# the one-line error of _api() instead of an ImportError when the module loads.

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
FINISHED = ("Complete", "Failed")  # RayJob .status.jobDeploymentStatus when KubeRay is done with it


def _api(context: Optional[str], kubeconfig: Optional[str] = None):
    try:
        from kubernetes import client, config
    except ImportError:
        raise SpecError("--apply needs the Kubernetes client: pip install 'ftdist[k8s]'") from None
    try:
        config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG") or None, context=context)
    except Exception as e:  # noqa: BLE001  (kubeconfig problems come as several exception types)
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise SpecError(f"kubeconfig: {str(e).splitlines()[0][:200]} (and not running in a pod)") from None
    return client.CustomObjectsApi()


def _why(e: Any) -> str:
    """The API server's one-line reason from an ApiException."""
    try:
        body = json.loads(e.body or "{}")
    except (TypeError, ValueError):
        body = {}
    causes = (body.get("details") or {}).get("causes") or []
    msg = body.get("message") or getattr(e, "reason", "") or str(e)
    if causes:
        c = causes[0]
        msg = f"{c.get('field', '')}: {c.get('message', msg)}".strip(": ")
    return " ".join(str(msg).split())[:300]


def _error(what: str, e: Exception) -> SpecError:
    """One line for an API or connection error."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(e, ApiException):
        if e.status in (401, 403):
            return SpecError(f"{what}: the Kubernetes API refused ({e.status} {e.reason}): {_why(e)}; the "
                             f"ftdist-submitter Role in k8s/base grants what --apply needs")
        return SpecError(f"{what}: {e.status} {e.reason}: {_why(e)}")
    return SpecError(f"{what}: cannot reach the Kubernetes API ({str(e).splitlines()[0][:200]})")


def _call(what: str, fn: Callable[[], Any]) -> Any:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn()
    except (ApiException, HTTPError, OSError) as e:
        raise _error(what, e) from None


def attempt_name(base: str, n: int) -> str:
    return base if n == 1 else f"{base[:47 - len(str(n)) - 1].rstrip('-')}-{n}"


def apply(rj: dict, *, wait: bool = False, context: Optional[str] = None, kubeconfig: Optional[str] = None,
          api: Any = None, poll_s: float = 5.0, out=sys.stdout) -> int:
    api = api or _api(context, kubeconfig)
    ns, base = rj["metadata"]["namespace"], rj["metadata"]["name"]
    job = rj["metadata"]["labels"]["ftdist.io/job"]
    where = f"rayjobs in namespace {ns}"
    existing = _call(where, lambda: api.list_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, label_selector=f"ftdist.io/job={job}"))["items"]
    live = [o for o in existing if (o.get("status") or {}).get("jobDeploymentStatus") not in FINISHED]
    if live:
        name = live[0]["metadata"]["name"]
        state = (live[0].get("status") or {}).get("jobDeploymentStatus") or "New"
        raise SpecError(f"RayJob {ns}/{name} for job {job!r} is still {state}; a second attempt would write over its "
                        f"checkpoints: wait for it, or `kubectl -n {ns} delete rayjob {name}`")
    n = 1 + len(existing)
    body = json.loads(json.dumps(rj))
    body["metadata"]["name"] = attempt_name(base, n)
    body["metadata"]["labels"]["ftdist.io/attempt"] = str(n)
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    what = f"create RayJob {ns}/{body['metadata']['name']}"
    try:
        created = api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body, field_validation="Strict")
    except ApiException as e:
        if e.status == 409:  # created by someone else between our list and create
            raise SpecError(f"RayJob {ns}/{body['metadata']['name']} already exists (created concurrently?); see "
                            f"`kubectl -n {ns} get rayjobs -l ftdist.io/job={job}`") from None
        if e.status == 422:
            raise SpecError(f"RayJob {ns}/{body['metadata']['name']} rejected by the API server: {_why(e)}") from None
        raise _error(what, e) from None
    except (HTTPError, OSError) as e:
        raise _error(what, e) from None
    name = created["metadata"]["name"]
    out.write(f"ftdist: created RayJob {ns}/{name} (attempt {n}; checkpoints "
              f"{rj['metadata']['annotations'].get('ftdist.io/checkpoints')})\n")
    out.flush()
    if not wait:
        out.write(f"ftdist: follow it with `kubectl -n {ns} get rayjob {name} -w`\n")
        return 0
    return follow(api, ns, name, poll_s=poll_s, out=out)


def follow(api: Any, ns: str, name: str, *, poll_s: float = 5.0, out=sys.stdout) -> int:
    last = None
    while True:
        obj = _call(f"RayJob {ns}/{name}", lambda: api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name))
        st = obj.get("status") or {}
        now = (st.get("jobDeploymentStatus"), st.get("jobStatus"))
        if now != last:
            out.write(f"ftdist: {ns}/{name}: deployment {now[0] or 'New'}, job {now[1] or '-'}"
                      + (f" ({st['message']})" if st.get("message") else "") + "\n")
            out.flush()
            last = now
        if now[0] in FINISHED:
            return 0 if now[1] == "SUCCEEDED" else 1
        time.sleep(poll_s)
