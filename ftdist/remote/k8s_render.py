"""`ftdist k8s render`: a KubeRay RayJob (ray.io/v1) that runs `ftdist train|tune` on the job.

The job travels inside the RayJob as its validated spec (`ftdist train --job-json ...`), so the manifest is the whole
run: no ConfigMap or volume to keep in step. Its name and checkpoint prefix are deterministic, so a RayJob retry
(`backoffLimit`, a fresh cluster each time) resumes from the latest committed checkpoint instead of from scratch.

Pods: a head (no training work: num-cpus 0) and one worker group sized from `resources` (GPU requests = limits,
node selector, tolerations, priority class); every container has requests and limits, runs non-root with no
privilege escalation and all capabilities dropped, and mounts a memory-backed /dev/shm (Kubernetes' 64 MiB default
breaks NCCL). Secrets are referenced by name (secretKeyRef / envFrom); the service account carries the cloud
identity (IRSA / GKE Workload Identity) for S3.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
from typing import Any, Optional

import yaml

from ftdist.errors import SpecError
from ftdist.spec import JobSpec, KubernetesSpec
from ftdist.storage.lease import TTL_ENV, TTL_S, WAIT_ENV
from ftdist.train.contracts import BASE_ENV

MAX_RAYJOB_NAME = 47  # KubeRay: RayJob names are at most 47 characters (derived object names must fit in 63)
CLUSTER_LABEL = "ray.io/cluster"
RAY_CONTAINER_HEAD, RAY_CONTAINER_WORKER = "ray-head", "ray-worker"
SHM_MIN_BYTES = 1 << 30

_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50,
          "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}


def quantity_bytes(q: str) -> int:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    if not m or (m.group(2) and m.group(2) not in _UNITS):
        raise SpecError(f"{q!r}: not a Kubernetes quantity")
    return int(float(m.group(1)) * _UNITS.get(m.group(2), 1))


def gi(n_bytes: int) -> str:
    return f"{max(1, math.ceil(n_bytes / (1 << 30)))}Gi"


def rayjob_name(spec: JobSpec) -> str:
    """ftdist-<job name> as a DNS-1035 label of at most 47 characters (KubeRay's limit)."""
    base = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-")
    name = f"ftdist-{base}"
    if len(name) > MAX_RAYJOB_NAME:
        h = hashlib.sha256(spec.name.encode()).hexdigest()[:6]
        name = f"{name[:MAX_RAYJOB_NAME - 7].rstrip('-')}-{h}"
    return name


def _workers_per_pod(spec: JobSpec, k: KubernetesSpec) -> int:
    r = spec.resources
    if k.workers_per_pod:
        return min(k.workers_per_pod, r.num_workers)
    if r.use_gpu:
        return max(1, min(r.num_workers, int(8 // max(r.gpus_per_worker, 1e-9)) or 1))
    return 1


def _env(k: KubernetesSpec, extra: Optional[dict] = None) -> list[dict]:
    env = [{"name": n, "value": v} for n, v in sorted({**k.env, **(extra or {})}.items())]
    env += [{"name": s.name, "valueFrom": {"secretKeyRef": {"name": s.secret, "key": s.key}}} for s in k.secret_env]
    return env


def _security(k: KubernetesSpec) -> tuple[dict, dict]:
    pod = {"runAsNonRoot": True, "runAsUser": k.run_as_user, "runAsGroup": k.run_as_user, "fsGroup": k.run_as_user,
           "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "privileged": False}
    return pod, container


def _pod(k: KubernetesSpec, name: str, requests: dict, limits: dict, shm: str, gpu: bool, worker: bool,
         extra_env: Optional[dict] = None) -> dict:
    pod_sec, c_sec = _security(k)
    container: dict[str, Any] = {
        "name": name,
        "image": k.image,
        "imagePullPolicy": k.image_pull_policy,
        "resources": {"requests": dict(requests), "limits": dict(limits)},
        "securityContext": c_sec,
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    env = _env(k, extra_env)
    if env:
        container["env"] = env
    if k.secret_env_from:
        container["envFrom"] = [{"secretRef": {"name": s}} for s in k.secret_env_from]
    spec: dict[str, Any] = {
        "securityContext": pod_sec,
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
                    {"name": "tmp", "emptyDir": {}}],
    }
    if k.service_account:
        spec["serviceAccountName"] = k.service_account
    if k.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in k.image_pull_secrets]
    if k.priority_class:
        spec["priorityClassName"] = k.priority_class
    if worker:  # node selection applies to the training pods; the head goes wherever the scheduler likes
        if k.node_selector:
            spec["nodeSelector"] = dict(k.node_selector)
        tol = list(k.tolerations)
        if gpu and not tol:
            tol = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        if tol:
            spec["tolerations"] = tol
    return {"metadata": {"labels": _labels(k)}, "spec": spec}


def _labels(k: KubernetesSpec, job: Optional[str] = None) -> dict:
    out = {"app.kubernetes.io/name": "ftdist", "app.kubernetes.io/managed-by": "ftdist", **k.labels}
    if job:
        out["ftdist.io/job"] = job
    return out


def ray_cluster_spec(spec: JobSpec, k: KubernetesSpec) -> dict:
    r = spec.resources
    per_pod = _workers_per_pod(spec, k)
    pods = math.ceil(r.num_workers / per_pod)
    # Elastic (num_workers {min, max}): the cluster starts with the pods `min` needs; Ray Train asks the in-tree
    # autoscaler for `max`, which adds pods up to maxReplicas as the quota allows (and replaces a lost one).
    fewest = math.ceil(r.min_workers / per_pod) if r.elastic else pods
    mem = quantity_bytes(k.memory_per_worker) * per_pod
    cpu = r.cpus_per_worker * per_pod + 1  # +1 for the raylet, the object store and the dashboard agent
    shm = k.shm_size or gi(max(SHM_MIN_BYTES, mem // 3))
    res = {"cpu": f"{cpu:g}", "memory": gi(mem)}
    if r.use_gpu:
        res["nvidia.com/gpu"] = f"{math.ceil(r.gpus_per_worker * per_pod):d}"
    head_res = {"cpu": f"{k.head_cpu:g}", "memory": k.head_memory}
    head_shm = k.shm_size or gi(max(SHM_MIN_BYTES, quantity_bytes(k.head_memory) // 3))
    out: dict[str, Any] = {
        "rayVersion": k.ray_version,
        "headGroupSpec": {
            # the head runs the job driver, Ray Train's controller and Tune: no training workers on it
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod(k, RAY_CONTAINER_HEAD, head_res, head_res, head_shm, gpu=False, worker=False),
        },
        "workerGroupSpecs": [{
            "groupName": "gpu-workers" if r.use_gpu else "cpu-workers",
            "replicas": fewest, "minReplicas": fewest, "maxReplicas": pods,
            "rayStartParams": {},  # Ray reads CPUs, GPUs, memory and the GPU type (accelerator_type:H100) itself
            "template": _pod(k, RAY_CONTAINER_WORKER, res, res, shm, gpu=r.use_gpu, worker=True,
                             extra_env={"NCCL_DEBUG": "WARN"} if r.use_gpu else None),
        }],
    }
    if r.elastic:
        out["enableInTreeAutoscaling"] = True
    if k.ray_auth:
        out["authOptions"] = {"mode": "token"}
    return out


def _submitter(k: KubernetesSpec) -> dict:
    """The Kubernetes Job that runs `ray job submit` (KubeRay fills in its command): small, limited, non-root."""
    pod_sec, c_sec = _security(k)
    res = {"cpu": "500m", "memory": "512Mi"}
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": pod_sec,
        "containers": [{"name": "ray-job-submitter", "image": k.image, "imagePullPolicy": k.image_pull_policy,
                        "resources": {"requests": dict(res), "limits": dict(res)}, "securityContext": c_sec}],
    }
    if k.service_account:
        spec["serviceAccountName"] = k.service_account
    if k.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in k.image_pull_secrets]
    return {"metadata": {"labels": _labels(k)}, "spec": spec}


def retry_waits_for_lease(env: dict) -> dict:
    """A retried RayJob (backoffLimit) starts on a fresh cluster seconds after the failed attempt's driver died,
    while that driver's run lease still looks live: the retry waits for it to expire (its TTL and 30 s of clock
    skew) instead of being refused and burning a retry."""
    return {WAIT_ENV: f"{float(env.get(TTL_ENV, TTL_S)) + 30:g}"}


def entrypoint(spec: JobSpec, kind: str) -> str:
    body = spec.model_dump(mode="json", exclude={"kubernetes"}, exclude_none=True)
    return shlex.join(["ftdist", kind, "--job-json", json.dumps(body, separators=(",", ":"), sort_keys=True)])


def render(spec: JobSpec, *, cluster: str = "ephemeral", kind: str = "train") -> dict:
    k = spec.kubernetes or KubernetesSpec()
    if not k.image:
        raise SpecError("kubernetes.image: not set; build cluster/Dockerfile, push it, and set it (or "
                        "--set kubernetes.image=registry.example.com/ml/ftdist:0.1.0)")
    name = rayjob_name(spec)
    env_yaml = {"env_vars": {**BASE_ENV, **retry_waits_for_lease(k.env), **k.env}}
    rj: dict[str, Any] = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": k.namespace, "labels": _labels(k, spec.name),
                     "annotations": {"ftdist.io/job-name": spec.name, "ftdist.io/kind": kind,
                                     "ftdist.io/checkpoints": f"{spec.checkpoint.storage.rstrip('/')}/{spec.name}"}},
        "spec": {
            "entrypoint": entrypoint(spec, kind),
            "runtimeEnvYAML": to_yaml(env_yaml),
            "submissionMode": "K8sJobMode",
            "activeDeadlineSeconds": k.active_deadline_seconds,
            "backoffLimit": k.backoff_limit,
            "submitterPodTemplate": _submitter(k),
        },
    }
    s = rj["spec"]
    if cluster == "ephemeral":
        s["rayClusterSpec"] = ray_cluster_spec(spec, k)
        s["shutdownAfterJobFinishes"] = True
        s["ttlSecondsAfterFinished"] = k.ttl_seconds_after_finished
    elif cluster == "existing":
        if not k.ray_cluster:
            raise SpecError("kubernetes.ray_cluster: --cluster existing needs the RayCluster's name (e.g. ftdist-gpu "
                            "from k8s/base)")
        s["clusterSelector"] = {CLUSTER_LABEL: k.ray_cluster}
        s["shutdownAfterJobFinishes"] = False  # the cluster outlives the job; KubeRay then requires TTL 0
        s["ttlSecondsAfterFinished"] = 0
    else:
        raise SpecError(f"--cluster {cluster}: expected ephemeral or existing")
    problems = operator_rules(rj)
    if problems:  # our own rendering broke a KubeRay rule: a bug, say which
        raise SpecError(f"rendered RayJob {name}: {problems[0]}")
    return rj


def to_yaml(obj: Any) -> str:
    class NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump(obj, Dumper=NoAliases, sort_keys=False, width=10**9)


# ---------------------------------------------------------------------------------------------------------------
# KubeRay operator rules ftdist relies on (ray-operator/controllers/ray/utils/validation.go), as plain checks


_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _group_rules(where: str, group: dict) -> list[str]:
    out = []
    containers = (group.get("template") or {}).get("spec", {}).get("containers") or []
    if not containers:
        out.append(f"{where} should have at least one container")
    params = group.get("rayStartParams") or {}
    if any(params.get(x) for x in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
        out.append(f"{where}: resource fields set in both rayStartParams and resources")
    if "labels" in params:
        out.append(f"{where}: rayStartParams['labels'] is not supported; use the labels field")
    return out


def operator_rules(rj: dict) -> list[str]:
    """The KubeRay v1.7 webhook/controller checks that a RayJob must pass (schema checks are the CRD's job)."""
    out = []
    name = rj.get("metadata", {}).get("name", "")
    if len(name) > MAX_RAYJOB_NAME:
        out.append(f"RayJob name should be no more than {MAX_RAYJOB_NAME} characters")
    if not _DNS1035.match(name):
        out.append("RayJob name should be a valid DNS1035 label")
    s = rj.get("spec", {})
    shutdown = bool(s.get("shutdownAfterJobFinishes"))
    if s.get("suspend") and not shutdown:
        out.append("a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended")
    ttl = s.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        out.append("TTLSecondsAfterFinished must be a non-negative integer")
    if ttl > 0 and not shutdown:
        out.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    selector = s.get("clusterSelector") or {}
    if not s.get("rayClusterSpec") and not selector:
        out.append("one of RayClusterSpec or ClusterSelector must be set")
    if selector and not selector.get(CLUSTER_LABEL):
        out.append("cluster name in ClusterSelector should not be empty")
    if selector and s.get("rayClusterSpec"):
        out.append("rayClusterSpec and clusterSelector are both set (the selector wins and the spec is ignored)")
    if s.get("submissionMode", "K8sJobMode") != "InteractiveMode" and not s.get("entrypoint"):
        out.append("entrypoint is empty")
    if s.get("activeDeadlineSeconds") is not None and s["activeDeadlineSeconds"] <= 0:
        out.append("activeDeadlineSeconds must be a positive integer")
    if s.get("backoffLimit") is not None and s["backoffLimit"] < 0:
        out.append("backoffLimit must be a positive integer")
    try:
            yaml.safe_load(s.get("runtimeEnvYAML") or "")
    except yaml.YAMLError:
        out.append("runtimeEnvYAML is not valid YAML")
    rcs = s.get("rayClusterSpec")
    if rcs:
        out += cluster_rules(rcs)
    return out


def cluster_rules(rcs: dict) -> list[str]:
    out = _group_rules("headGroupSpec", rcs.get("headGroupSpec") or {})
    names = set()
    for g in rcs.get("workerGroupSpecs") or []:
        gname = g.get("groupName", "")
        out += _group_rules(f"workerGroupSpec {gname}", g)
        if gname in names:
            out.append(f"worker group name {gname} is not unique")
        names.add(gname)
        lo, hi, n = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1), g.get("replicas", g.get("minReplicas", 0))
        if not lo <= n <= hi:
            out.append(f"workerGroupSpec {gname}: replicas {n} outside [minReplicas {lo}, maxReplicas {hi}]")
    if (rcs.get("authOptions") or {}).get("mode") == "token":
        v = rcs.get("rayVersion")
        if not v:
            out.append("authOptions.mode is 'token' but RayVersion was not specified (Ray 2.52.0 or later)")
        else:
            try:
                parts = tuple(int(x) for x in v.split(".")[:3])
            except ValueError:
                parts = None
            if parts is None:
                out.append(f"authOptions.mode is 'token' but RayVersion format is invalid: {v}")
            elif parts < (2, 52, 0):
                out.append(f"authOptions.mode is 'token' but minimum Ray version is 2.52.0, got {v}")
    return out
