"""`kubernetes:` (read only by `ftdist k8s render`): image, namespace, identity, pod placement, Secret references.
Pure: no torch, ray or I/O."""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from ftdist.redact import env_secret_problem, looks_like_secret
from ftdist.spec.base import FrozenSpec


_QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def _quantity(v: Optional[str]) -> Optional[str]:
    if v is not None and not _QUANTITY_RE.match(str(v)):
        raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. 64Gi, 512Mi)")
    return v


class SecretEnvSpec(FrozenSpec):
    """An environment variable taken from a Kubernetes Secret on the cluster (the value never leaves it)."""

    name: str
    """the environment variable, e.g. AWS_SECRET_ACCESS_KEY"""
    secret: str
    """the Secret's name"""
    key: str
    """the key inside the Secret"""

    @field_validator("name")
    @classmethod
    def _env(cls, v: str) -> str:
        if not ENV_NAME_RE.match(v):
            raise ValueError("not an environment variable name (letters, digits and '_'; the value is not shown)")
        return v

    @field_validator("secret", "key")
    @classmethod
    def _secret(cls, v: str, info) -> str:
        # These name a Secret and a key in it; a pasted credential here must not be echoed back.
        if looks_like_secret(v):
            raise ValueError(f"looks like a credential, not the name of one: give the Kubernetes Secret's "
                             f"{'name' if info.field_name == 'secret' else 'key'} (the value is not shown)")
        if info.field_name == "secret" and not _DNS_LABEL_RE.match(v.replace(".", "-")):
            raise ValueError("not a Kubernetes object name (lowercase letters, digits, '-' and '.'; the value is not "
                             "shown)")
        return v


class KubernetesSpec(FrozenSpec):
    """How `ftdist k8s render` runs this job on a KubeRay cluster (ignored by train/tune)."""

    namespace: str = "ftdist"
    image: Optional[str] = None
    """the runtime image (cluster/Dockerfile), e.g. registry.example.com/ml/ftdist:0.1.0"""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = []
    service_account: Optional[str] = "ftdist-job"
    """pods run as this service account: bind it to a cloud role (IRSA / GKE Workload Identity) for S3 access"""
    ray_cluster: Optional[str] = None
    """existing RayCluster (for `--cluster existing`), e.g. ftdist-gpu from k8s/base"""
    ray_version: str = "2.60.0"
    workers_per_pod: Optional[int] = Field(None, ge=1)
    """Ray Train workers per worker pod (default: all of a node's GPUs, up to 8 // gpus_per_worker; 1 on CPU)"""
    memory_per_worker: str = "32Gi"
    head_cpu: float = Field(2, gt=0)
    head_memory: str = "8Gi"
    shm_size: Optional[str] = None
    """memory-backed /dev/shm per pod (NCCL and Ray's object store; K8s gives 64Mi by default, which breaks NCCL);
    default: a third of the pod's memory"""
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    priority_class: Optional[str] = None
    secret_env: list[SecretEnvSpec] = []
    secret_env_from: list[str] = []
    """Secrets whose every key becomes an environment variable (envFrom)"""
    env: dict[str, str] = {}
    """non-secret environment, e.g. AWS_ENDPOINT_URL, AWS_REGION"""
    ray_auth: bool = True
    """Ray token auth on the ephemeral cluster (KubeRay authOptions: the operator makes the token Secret)"""
    run_as_user: int = Field(1000, ge=1)
    active_deadline_seconds: int = Field(7 * 24 * 3600, gt=0)
    ttl_seconds_after_finished: int = Field(3600, ge=0)
    backoff_limit: int = Field(2, ge=0)
    """RayJob retries (each on a fresh cluster); every retry resumes from the latest committed checkpoint"""
    labels: dict[str, str] = {}

    @field_validator("memory_per_worker", "head_memory", "shm_size")
    @classmethod
    def _q(cls, v: Optional[str]) -> Optional[str]:
        return _quantity(v)

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, v: list[str]) -> list[str]:
        for name in v:
            if looks_like_secret(name) or not _DNS_SUBDOMAIN_RE.match(name):
                raise ValueError("an entry is not a Kubernetes Secret name (lowercase letters, digits, '-' and '.'; "
                                 "the value is not shown)")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            prefix, _, name = key.rpartition("/")
            if (prefix and not _DNS_SUBDOMAIN_RE.match(prefix)) or not _LABEL_RE.match(name):
                raise ValueError(f"{key[:80]!r} is not a Kubernetes label key ([prefix/]name: letters, digits, '-', "
                                 f"'_', '.', at most 63, alphanumeric at both ends)")
            if value and not _LABEL_RE.match(value):
                raise ValueError(f"the value of {key[:80]} is not a Kubernetes label value (letters, digits, '-', "
                                 f"'_', '.', at most 63, alphanumeric at both ends)")
        return v

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        if not _DNS_LABEL_RE.match(v):
            raise ValueError(f"{v!r} is not a valid namespace name")
        return v

    @field_validator("env")
    @classmethod
    def _plain_env(cls, v: dict[str, str]) -> dict[str, str]:
        for k, value in v.items():
            if not ENV_NAME_RE.match(k):
                raise ValueError("a name is not an environment variable name (letters, digits and '_')")
            if problem := env_secret_problem(k, str(value)):
                raise ValueError(f"{k} {problem}: reference it with kubernetes.secret_env (a Kubernetes Secret), "
                                 f"never as a value in the job file")
        return v
