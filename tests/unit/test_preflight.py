"""`ftdist preflight` without a cluster: the planner's checkpoint size, worker slots, each per-node rule on facts
built by hand, the storage probe and its cleanup on a local folder, how collective failures are told from their
victims, the checklist's lines, and the command's one-line errors. The cluster itself: tests/integration/
test_preflight.py."""

from __future__ import annotations

import os

import pytest

from ftdist.cli import main
from ftdist.plan.gpus import GiB
from ftdist.plan.memory import checkpoint_size, trainable_params
from ftdist.plan.shape import ModelShape
from ftdist.preflight.collective import _PEER_LOST
from ftdist.preflight.node import NodeFacts, NodeRequest, inspect_node, location_problem, memory_limit, versions
from ftdist.preflight.report import Check, Checklist, render, to_json
from ftdist.preflight.run import Needs, check_nodes, check_resources, nodes_of, worker_slots
from ftdist.spec import spec_from_dict
from ftdist.storage.probe import no_new_folders, roundtrip
from tests.conftest import TINY_LLAMA, tiny_job_dict


def _spec(tmp_path, **sections):
    return spec_from_dict(tiny_job_dict(str(tmp_path / "runs"), **sections))


def _ray_node(i: int, cpus: float, gpus: float = 0, alive: bool = True, **extra) -> dict:
    res = {"CPU": cpus, "memory": 8 * GiB, **({"GPU": gpus} if gpus else {}), **extra}
    return {"NodeID": f"{i:056x}", "NodeManagerAddress": "10.0.0.%d" % i, "NodeManagerPort": 6380 + i,
            "Alive": alive, "Resources": res}


def _facts(**kw) -> NodeFacts:
    base = dict(hostname="h", python="3.11.7", versions=versions(), shm_bytes=2 * GiB, staging_dir="/tmp",
                staging_free=100 * GiB, memory_bytes=64 * GiB, storage_problem=None, location_problems=[])
    import platform

    base["python"] = platform.python_version()
    return NodeFacts(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------------------
# the planner's checkpoint size


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_checkpoint_size_follows_what_deepspeed_writes(tmp_path, stage):
    spec = _spec(tmp_path, zero={"stage": stage})
    shape = ModelShape.from_config(TINY_LLAMA)
    size = checkpoint_size(spec, shape, world=2)
    total, weights = shape.params(), shape.params() * 4  # fp32
    if stage == 0:  # rank 0: the module and the whole optimizer (plain AdamW: 8 bytes per parameter)
        assert (size.module, size.per_rank) == (weights + total * 8, 0)
    elif stage < 3:  # rank 0 the module; every rank its optimizer partition (fp32 master + 2 moments)
        assert (size.module, size.per_rank) == (weights, total * 12 / 2)
    else:  # ZeRO-3: partitions only
        assert (size.module, size.per_rank) == (0, total * 12 / 2)
    assert size.total(2) == size.module + 2 * size.per_rank
    assert size.node_bytes(1, with_rank0=False) == size.per_rank


def test_lora_checkpoints_still_carry_the_whole_module(tmp_path):
    spec = _spec(tmp_path, method="lora")
    shape = ModelShape.from_config(TINY_LLAMA)
    size = checkpoint_size(spec, shape, world=2)
    lora = trainable_params(spec, shape, "lora")
    assert size.module == shape.params() * 4 and size.per_rank == lora * 12 / 2 and lora < shape.params() / 5


# ---------------------------------------------------------------------------------------------------------------
# resources


def test_worker_slots_take_the_scarcest_resource():
    assert worker_slots({"CPU": 16, "GPU": 4}, {"CPU": 2, "GPU": 1}) == 4
    assert worker_slots({"CPU": 3, "GPU": 8}, {"CPU": 2, "GPU": 1}) == 1
    assert worker_slots({"CPU": 64}, {"CPU": 1, "GPU": 1}) == 0
    assert worker_slots({"CPU": 8, "GPU": 8, "accelerator_type:A100": 1},
                        {"CPU": 1, "GPU": 1, "accelerator_type:H100": 0.001}) == 0
    assert worker_slots({"CPU": 0.3}, {"CPU": 0.1}) == 3  # no float drift


def test_resources_pass_with_room_and_count_sweep_trials(tmp_path):
    spec = _spec(tmp_path)
    cl = Checklist("t")
    assert check_resources(spec, nodes_of([_ray_node(1, 2), _ray_node(2, 3), _ray_node(3, 8, alive=False)], spec), cl)
    assert cl.ok and "room for 5 on 2 of 2 nodes" in cl.checks[0].detail
    sweep = spec_from_dict({**tiny_job_dict(str(tmp_path), method="lora"),
                            "sweep": {"search": "grid", "space": {"optim.lr": [1e-3, 1e-2]}}})
    cl = Checklist("t")
    check_resources(sweep, nodes_of([_ray_node(1, 5)], sweep), cl)
    assert "sweep: 2 trials at once" in cl.checks[0].detail


def test_resources_fail_when_a_worker_fits_no_single_node(tmp_path):
    spec = _spec(tmp_path, resources={"num_workers": 2, "cpus_per_worker": 3})
    cl = Checklist("t")
    assert not check_resources(spec, nodes_of([_ray_node(1, 2), _ray_node(2, 2)], spec), cl)
    (c,) = cl.failed
    assert c.name == "resources" and "room for 0" in c.detail and "one node" in c.detail and c.fix


# ---------------------------------------------------------------------------------------------------------------
# per-node rules


def _check(spec, facts: list[NodeFacts], needs: Needs = Needs(why_not="no plan"), cpus: float = 2):
    nodes = nodes_of([_ray_node(i + 1, cpus, gpus=8 if spec.resources.use_gpu else 0) for i in range(len(facts))],
                     spec)
    for n, f in zip(nodes, facts):
        n.facts = f
    cl = Checklist("t")
    check_nodes(spec, nodes, needs, cl)
    return cl


def test_healthy_nodes_give_one_ok_line_per_check(tmp_path):
    cl = _check(_spec(tmp_path), [_facts(), _facts()])
    assert cl.ok and [c.name for c in cl.checks] == ["versions", "storage", "locations", "/dev/shm", "disk"]
    assert cl.checks[-1].skipped  # no plan: disk and memory are not judged


def test_each_node_problem_is_its_own_line_naming_the_node(tmp_path):
    mine = versions()
    facts = [_facts(),
             _facts(versions={**mine, "deepspeed": "0.14.0"}),
             _facts(storage_problem="writing: s3://b/r: access denied"),
             _facts(location_problems=[("data.train", "/data/t.jsonl: no such file or directory on this node")])]
    cl = _check(_spec(tmp_path), facts)
    lines = {c.name: c for c in cl.failed}
    assert set(lines) == {"versions", "storage", "locations"} and len(cl.failed) == 3
    assert lines["versions"].node.startswith("10.0.0.2:6382") and "deepspeed 0.14.0 (driver" in lines["versions"].detail
    assert lines["storage"].node.startswith("10.0.0.3:") and lines["locations"].node.startswith("10.0.0.4:")
    assert all(c.fix for c in cl.failed)


def test_a_missing_package_and_another_python_are_named(tmp_path):
    cl = _check(_spec(tmp_path), [_facts(python="3.9.1", versions={**versions(), "peft": None})])
    (c,) = cl.failed
    assert "python 3.9.1 (driver" in c.detail and "peft missing" in c.detail


def test_dev_shm_matters_for_gpu_jobs_only(tmp_path):
    small = _facts(shm_bytes=64 * 2**20)
    assert _check(_spec(tmp_path), [small]).ok
    gpu = _spec(tmp_path, resources={"num_workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 1})
    (c,) = _check(gpu, [_facts(), small]).failed
    assert c.name == "/dev/shm" and "64 MiB" in c.detail and "emptyDir" in c.fix and c.node.startswith("10.0.0.2")


def test_disk_and_memory_are_held_against_the_plan(tmp_path):
    from ftdist.plan.memory import CheckpointSize

    needs = Needs(CheckpointSize(module=10 * GiB, per_rank=5 * GiB), host_per_worker=20 * GiB, gpu_peak=0)
    spec = _spec(tmp_path)  # 2 workers; each node has 2 CPUs, so both could land on one node
    cl = _check(spec, [_facts(staging_free=19 * GiB, memory_bytes=39 * GiB), _facts(staging_free=21 * GiB)], needs)
    disk = [c for c in cl.failed if c.name == "disk"]
    memory = [c for c in cl.failed if c.name == "memory"]
    assert len(disk) == 1 and "needs 20.0 GiB" in disk[0].detail and disk[0].node.startswith("10.0.0.1")
    assert len(memory) == 1 and "need 40.0 GiB" in memory[0].detail


# ---------------------------------------------------------------------------------------------------------------
# on the node itself (this machine)


def test_inspect_node_here(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    facts = inspect_node(NodeRequest(str(tmp_path / "runs" / "job"), {},
                                     [("data.train", str(data)), ("data.eval", str(tmp_path / "nope.jsonl"))]))
    assert facts.storage_problem is None and facts.versions["ftdist"] and facts.memory_bytes > 0
    assert facts.location_problems == [("data.eval", f"{tmp_path / 'nope.jsonl'}: no such file or directory on "
                                                     f"this node")]
    assert not (tmp_path / "runs").exists()  # the round trip leaves nothing, not even the folders it made
    assert 0 < memory_limit() and location_problem(str(data)) is None


def test_local_roundtrip_names_the_step_that_failed(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    problem = roundtrip(str(blocker / "runs" / "job"))
    assert problem.startswith(f"writing: {blocker}/runs/job: ") and blocker.read_text() == "x"


def test_no_new_folders_keeps_what_was_there(tmp_path):
    (tmp_path / "kept").mkdir()
    with no_new_folders(str(tmp_path / "kept" / "a" / "b")):
        os.makedirs(tmp_path / "kept" / "a" / "b" / "c")
        (tmp_path / "kept" / "a" / "b" / "c" / "f").write_text("x")
    assert os.listdir(tmp_path / "kept") == []
    with no_new_folders(str(tmp_path / "kept")):
        (tmp_path / "kept" / "mine").write_text("x")
    assert os.listdir(tmp_path / "kept") == ["mine"]  # an existing folder is never removed


# ---------------------------------------------------------------------------------------------------------------
# collective failures: the cause, not its victims


@pytest.mark.parametrize("line, victim", [
    ("Failed to recv, got 0 bytes. Connection was likely closed. Did the remote server shutdown or crash?", True),
    ("Connection reset by peer", True),
    ("wait timeout after 60000ms, keys: /default_pg/0//cpu//0/1", True),
    ("[enforce fail at device.cc:84] ifa != nullptr. Unable to find address for: bogus0", False),
    ("NCCL error: unhandled system error (run with NCCL_DEBUG=INFO for details)", False),
])
def test_peer_lost_errors_are_told_from_causes(line, victim):
    assert bool(_PEER_LOST.search(line)) is victim


# ---------------------------------------------------------------------------------------------------------------
# the checklist and the command


def test_checklist_lines():
    cl = Checklist("job on 10.0.0.1:6379: 2 nodes")
    cl.add(Check("resources", True, "2 workers"))
    cl.add(Check("storage", False, "writing: s3://b/r: access denied", node="10.0.0.2:6380 (w1)", fix="credentials"))
    cl.add(Check("step", True, "not run", skipped=True))
    lines = render(cl).splitlines()
    assert lines[0] == "ftdist preflight: job on 10.0.0.1:6379: 2 nodes"
    assert lines[1].split() == ["ok", "resources", "2", "workers"]
    assert lines[2].split(None, 2)[:2] == ["FAIL", "storage"]
    assert lines[2].endswith("node 10.0.0.2:6380 (w1): writing: s3://b/r: access denied; fix: credentials")
    assert lines[3].split()[0] == "skip"
    j = to_json(cl)
    assert j["ok"] is False and j["checks"][1]["node"] == "10.0.0.2:6380 (w1)"


@pytest.mark.parametrize("args, expect", [
    (["--address", "127.0.0.1:1"], "--address 127.0.0.1:1: cannot reach a Ray cluster there"),
    (["--address", "nohost"], "--address nohost: expected host:port"),
    (["--timeout", "0"], "--timeout 0.0: must be a number of seconds above 0"),
])
def test_bad_arguments_are_one_line(tmp_path, write_job, capsys, args, expect):
    job = write_job(tiny_job_dict(str(tmp_path / "runs")))
    assert main(["preflight", str(job), *args]) == 2
    out = capsys.readouterr()
    (line,) = out.err.strip().splitlines()
    assert out.out == "" and line.startswith(f"ftdist: error: {expect}")
    assert not (tmp_path / "runs").exists()


def test_an_unknown_skip_is_refused(tmp_path, write_job, capsys):
    job = write_job(tiny_job_dict(str(tmp_path / "runs")))
    with pytest.raises(SystemExit) as e:
        main(["preflight", str(job), "--skip", "storage"])
    assert e.value.code == 2 and "invalid choice: 'storage'" in capsys.readouterr().err


def test_node_errors_pass_the_secret_guard():
    token = "hf_Zq8XkP2vLm4Rt7Ws9Yb3Nc6Jd1Ge5Hf0"
    cl = Checklist("t")
    cl.add(Check("node", False, f"the check task failed: HTTPError 401 for token {token}", node="10.0.0.2:1"))
    assert token not in render(cl) and token not in str(to_json(cl))


def test_a_driver_without_credentials_tidies_nothing_and_does_not_fail(monkeypatch):
    from ftdist.storage.probe import leaves_no_folders

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never reached: no credentials to sign with
    ran = []
    with leaves_no_folders("s3://bucket/runs/job"):
        ran.append(True)
    assert ran == [True]


def test_a_node_that_does_not_share_local_storage_is_told(tmp_path):
    run = tmp_path / "runs" / "job"
    marker = tmp_path / "runs" / "marker"  # what the driver wrote; here, a file the "node" cannot see
    facts = inspect_node(NodeRequest(str(run), {}, [], str(marker)))
    assert "does not see what the driver wrote there" in facts.storage_problem and "shared filesystem" in \
        facts.storage_problem
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    assert inspect_node(NodeRequest(str(run), {}, [], str(marker))).storage_problem is None


def test_a_bad_address_is_refused_even_inside_a_running_ray(tmp_path, write_job, capsys, monkeypatch):
    """The address is checked before anything else, so a process that already runs Ray (a notebook, the test
    session) does not quietly check that Ray instead."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    job = write_job(tiny_job_dict(str(tmp_path / "runs")))
    assert main(["preflight", str(job), "--address", "127.0.0.1:1"]) == 2
    assert "cannot reach a Ray cluster there" in capsys.readouterr().err
