"""Validation of Kubernetes objects without an API server: KubeRay custom resources against the real CRD's
openAPIV3Schema in strict mode (unknown fields rejected, as `kubectl apply --validate=strict` / field_validation
Strict does), core objects with kubernetes-validate (strict)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional

import yaml

CRD_DIR = Path(os.environ.get("FTDIST_KUBERAY_CRDS", Path(__file__).resolve().parents[3] / "shared" / "kuberay-crds"
                              / "v1.7.0"))
K8S_VERSION = "1.32.0"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


def crd_dir() -> Optional[Path]:
    return CRD_DIR if all((CRD_DIR / f).is_file() for f in CRD_FILES.values()) else None


def _strict(schema: Any) -> Any:
    """Structural schema -> JSON schema that rejects unknown fields (what the API server prunes or, in Strict field
    validation, refuses), except where the CRD preserves unknown fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        if out.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


_validators: dict[str, Any] = {}


def crd_validator(kind: str):
    if kind not in _validators:
        import jsonschema

        crd = yaml.safe_load((CRD_DIR / CRD_FILES[kind]).read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
        schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by the API server itself
        _validators[kind] = jsonschema.Draft7Validator(schema)
    return _validators[kind]


def crd_errors(obj: dict) -> list[str]:
    """Schema violations of a RayJob/RayCluster (apiVersion ray.io/v1), as 'path: message' lines."""
    if obj.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion {obj.get('apiVersion')!r} is not ray.io/v1"]
    v = crd_validator(obj["kind"])
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
            for e in sorted(v.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


def core_errors(obj: dict) -> list[str]:
    """kubernetes-validate, strict (unknown fields are errors)."""
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except ValidationError as e:
        return [f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}: {e.message}"]
    return []


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """Every PodTemplateSpec inside a RayJob/RayCluster, as a Pod object kubernetes-validate can check."""
    spec = obj.get("spec", {})
    rcs = spec.get("rayClusterSpec", spec) if obj.get("kind") == "RayJob" else spec
    found = []
    if obj.get("kind") == "RayJob" and spec.get("submitterPodTemplate"):
        found.append(("submitter", spec["submitterPodTemplate"]))
    if rcs.get("headGroupSpec"):
        found.append(("head", rcs["headGroupSpec"]["template"]))
    for g in rcs.get("workerGroupSpecs") or []:
        found.append((g["groupName"], g["template"]))
    return [(name, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **t.get("metadata", {})},
                    "spec": t["spec"]}) for name, t in found]
