"""`ftdist preflight`: the checks, in the order a failure is cheapest to find, on the cluster the job will run on.

1. resources: the job's workers (and its sweep's trials) fit on the alive nodes, each worker on one node;
2. on every node (a zero-CPU task pinned there, with the job's runtime environment): package versions against the
   driver's, a write/read/multipart/delete round trip under the run folder with that node's credentials, the data
   and model locations readable, /dev/shm, staging disk and memory against what the planner says the job needs;
3. a collective among the job's workers, spread over the nodes (bandwidth, or the node that cannot join);
4. one training step and one checkpoint commit, end to end, as a scratch run of the same job that is removed after.
Every problem is one line naming its node. Nothing is left behind in storage."""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import time
from dataclasses import dataclass
from typing import Optional

import ray
from botocore.exceptions import BotoCoreError, ClientError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ftdist.errors import SpecError
from ftdist.plan.gpus import GiB, gpu, size_text
from ftdist.plan.memory import CheckpointSize, checkpoint_size, job_shape, plan_memory
from ftdist.plan.source import model_config
from ftdist.preflight.collective import run_collective
from ftdist.preflight.node import NodeFacts, NodeRequest, inspect_node, versions
from ftdist.preflight.report import Check, Checklist
from ftdist.spec import JobSpec
from ftdist.spec.load import with_overrides
from ftdist.storage import s3
from ftdist.storage.probe import leaves_no_folders
from ftdist.storage.uri import is_remote, local_path
from ftdist.train.ray_runtime import connect_ray, disconnect_ray, runtime_env_vars

CHECKS = ("collective", "step")
"""Checks that `--skip` may leave out (the slow ones: the step loads the model on every worker)."""
NCCL_SHM = 1 * GiB
"""/dev/shm a node with GPU workers needs: NCCL's shared-memory transport between GPUs of one node fails with
"unhandled system error" in Docker's default 64 MB; NCCL's troubleshooting guide and Ray's KubeRay GPU guide both
ask for a larger /dev/shm (`--shm-size=1g`, an emptyDir of medium Memory)."""


@dataclass
class Node:
    node_id: str
    label: str
    """ip:port of the node's raylet (unique even for several nodes on one host), then its hostname once known"""
    resources: dict
    slots: int
    """how many of the job's workers fit on it"""
    facts: Optional[NodeFacts] = None


@dataclass
class Needs:
    """What the planner says the job needs, where it could read the model's config."""

    checkpoint: Optional[CheckpointSize] = None
    host_per_worker: Optional[int] = None
    gpu_peak: Optional[int] = None
    why_not: Optional[str] = None


def run_preflight(spec: JobSpec, address: Optional[str], skip: tuple[str, ...] = (),
                  timeout_s: float = 120.0) -> Checklist:
    start = time.monotonic()
    started = connect_ray(address, math.ceil(spec.resources.cpus) + 1)
    try:
        # The run folder (and any folder above it) that only the checks created goes again at the end.
        with leaves_no_folders(spec.run_dir):
            cl = _run_checks(spec, address, skip, timeout_s)
    finally:
        disconnect_ray(started)
    cl.seconds = time.monotonic() - start
    return cl


def _run_checks(spec: JobSpec, address: Optional[str], skip: tuple[str, ...], timeout_s: float) -> Checklist:
    nodes = nodes_of(ray.nodes(), spec)
    gpus = sum(n.resources.get("GPU", 0) for n in nodes)
    cpus = sum(n.resources.get("CPU", 0) for n in nodes)
    where = address or "an embedded local Ray (this machine)"
    cl = Checklist(f"{spec.name} on {where}: {_nodes(len(nodes))}, {cpus:g} CPUs, {gpus:g} GPUs")
    fits = check_resources(spec, nodes, cl)
    needs = _needs(spec)
    _inspect_nodes(spec, nodes, timeout_s, cl)
    check_nodes(spec, nodes, needs, cl)
    if "collective" in skip:
        cl.add(Check("collective", True, "skipped (--skip collective)", skipped=True))
    elif fits:
        _check_collective(spec, nodes, needs, timeout_s, cl)
    if "step" in skip:
        cl.add(Check("step", True, "skipped (--skip step)", skipped=True))
    elif cl.ok:
        _check_step(spec, needs, cl)
    else:
        cl.add(Check("step", True, "not run: fix the problems above first", skipped=True))
    return cl


# ---------------------------------------------------------------------------------------------------------------
# Resources


def _bundle(spec: JobSpec) -> dict:
    """One worker's resources, as Ray Train asks for them."""
    r = spec.resources
    out = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        out["GPU"] = r.gpus_per_worker
    if r.accelerator_type:
        out[f"accelerator_type:{r.accelerator_type}"] = 0.001
    return out


def worker_slots(resources: dict, bundle: dict) -> int:
    """How many workers of `bundle` a node with `resources` (Ray's totals) can host."""
    return min(math.floor(resources.get(k, 0) / v + 1e-9) for k, v in bundle.items())


def nodes_of(ray_nodes: list[dict], spec: JobSpec) -> list[Node]:
    """The alive nodes of `ray.nodes()`, each with the job's worker slots."""
    bundle = _bundle(spec)
    out = [Node(n["NodeID"], f"{n['NodeManagerAddress']}:{n['NodeManagerPort']}", n.get("Resources", {}),
                worker_slots(n.get("Resources", {}), bundle)) for n in ray_nodes if n.get("Alive")]
    return sorted(out, key=lambda n: n.label)


def check_resources(spec: JobSpec, nodes: list[Node], cl: Checklist) -> bool:
    r = spec.resources
    want = ", ".join(f"{v:g} {k}" for k, v in _bundle(spec).items())
    slots = sum(n.slots for n in nodes)
    hosts = sum(1 for n in nodes if n.slots)
    need = r.min_workers if r.elastic else r.num_workers  # an elastic job starts at its minimum
    if slots < need:
        cl.add(Check("resources", False, f"{_count(need, 'worker')} of {want} each: the cluster has room "
                                         f"for {slots} (a worker must fit on one node)",
                     fix="more or larger nodes, fewer resources.num_workers, or smaller resources.*_per_worker"))
        return False
    detail = (f"{_count(r.num_workers, 'worker')}" + (f" (elastic, from {r.min_workers})" if r.elastic else "")
              + f" of {want} each: room for {slots} on {hosts} of {_nodes(len(nodes))}")
    if spec.sweep is not None:
        trials = slots // r.num_workers
        cap = spec.sweep.max_concurrent_trials
        detail += f"; sweep: {min(trials, cap) if cap else trials} trials at once"
    cl.add(Check("resources", True, detail))
    return True


def _needs(spec: JobSpec) -> Needs:
    try:
        shape = job_shape(spec, model_config(spec.model))
    except SpecError as e:
        return Needs(why_not=str(e))
    except (KeyError, TypeError, ValueError) as e:
        return Needs(why_not=f"the planner cannot read the model's config ({e})")
    world = spec.resources.num_workers
    card = gpu(None, spec.resources.accelerator_type)
    per_worker = plan_memory(spec, shape, card, world, gpus_per_node=1)
    return Needs(checkpoint_size(spec, shape, world), sum(b for _, b in per_worker.host), per_worker.peak)


# ---------------------------------------------------------------------------------------------------------------
# Every node


def _inspect_nodes(spec: JobSpec, nodes: list[Node], timeout_s: float, cl: Checklist) -> None:
    marker = _shared_marker(spec.run_dir)
    try:
        _gather_facts(spec, nodes, NodeRequest(spec.run_dir, spec.checkpoint.encryption.extra_args(),
                                               _read_locations(spec), marker), timeout_s, cl)
    finally:
        if marker:
            with contextlib.suppress(OSError):
                os.remove(marker)


def _gather_facts(spec: JobSpec, nodes: list[Node], req: NodeRequest, timeout_s: float, cl: Checklist) -> None:
    env = {"env_vars": runtime_env_vars(use_gpu=spec.resources.use_gpu)}
    task = ray.remote(num_cpus=0, max_retries=0)(inspect_node)
    refs = {task.options(runtime_env=env, scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False))
            .remote(req): n for n in nodes}
    done, waiting = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in done:
        node = refs[ref]
        try:
            node.facts = ray.get(ref)
            if node.facts.hostname not in node.label:
                node.label += f" ({node.facts.hostname})"
        except ray.exceptions.RayError as e:
            cl.add(Check("node", False, f"the check task failed: {str(e).strip().splitlines()[-1][:300]}",
                         node=node.label, fix="see the node's Ray logs"))
    for ref in waiting:
        cl.add(Check("node", False, f"the check task did not finish in {timeout_s:.0f} s", node=refs[ref].label,
                     fix="is the node overloaded, or its runtime environment still installing?"))
        ray.cancel(ref, force=True)


def _shared_marker(run_dir: str) -> Optional[str]:
    """A file written from here into a local run folder, for the nodes to look for (inside the run folder, which
    the caller removes with everything in it if the checks created it); None for s3:// or when this machine cannot
    write there (the path may exist on the nodes only: their own round trip says whether they can)."""
    if is_remote(run_dir):
        return None
    marker = os.path.join(local_path(run_dir), f".ftdist-preflight-shared-{secrets.token_hex(4)}")
    try:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w"):
            pass
    except OSError:
        return None
    return marker


def _read_locations(spec: JobSpec) -> list[tuple[str, str]]:
    """Inputs the workers read on their nodes: data files, and model/tokenizer folders given as paths or s3:// (a
    hub id is fetched from the hub by each node; the step check covers it)."""
    m = spec.model
    out = [*spec.data.inputs(), ("model.name_or_path", m.name_or_path), ("model.tokenizer", m.tokenizer)]
    return [(k, v) for k, v in out if v and (is_remote(v) or v.startswith("/"))]


def check_nodes(spec: JobSpec, nodes: list[Node], needs: Needs, cl: Checklist) -> None:
    seen = [n for n in nodes if n.facts is not None]
    if not seen:
        return
    hosts = [n for n in seen if n.slots]  # the nodes a worker can land on
    _check_versions(seen, cl)
    _each(seen, cl, "storage", lambda n: n.facts.storage_problem, f"{spec.run_dir}: write, read back, multipart "
          f"upload and delete", fix="give this node's pods/instances credentials that may write the checkpoint prefix")
    read = [k for k, _ in _read_locations(spec)]
    _each(seen, cl, "locations", lambda n: "; ".join(f"{k}: {p}" for k, p in n.facts.location_problems) or None,
          ", ".join(read) + " readable" if read else "",
          fix="the same data and model locations must be readable from every node")
    _check_shm(spec, hosts, cl)
    if needs.why_not:
        cl.add(Check("disk", True, f"not checked: {needs.why_not}", skipped=True))
        return
    _check_disk(spec, hosts, needs.checkpoint, cl)
    _check_memory(spec, hosts, needs.host_per_worker, cl)


def _each(nodes: list[Node], cl: Checklist, name: str, problem, ok_detail: str, fix: str) -> None:
    """One line per node with a problem, or one ok line."""
    bad = [(n, p) for n in nodes if (p := problem(n))]
    for n, p in bad:
        cl.add(Check(name, False, p, node=n.label, fix=fix))
    if not bad and ok_detail:
        cl.add(Check(name, True, f"{ok_detail} on {_nodes(len(nodes))}"))


def _check_versions(nodes: list[Node], cl: Checklist) -> None:
    import platform

    mine, py = versions(), platform.python_version()

    def differ(n: Node) -> Optional[str]:
        out = [f"python {n.facts.python} (driver {py})"] if n.facts.python.split(".")[:2] != py.split(".")[:2] else []
        out += [f"{k} {n.facts.versions.get(k) or 'missing'} (driver {v or 'missing'})"
                for k, v in mine.items() if n.facts.versions.get(k) != v]
        return ", ".join(out) or None

    shown = ", ".join(f"{k} {v}" for k, v in mine.items() if v)
    _each(nodes, cl, "versions", differ, f"python {py}, {shown}",
          fix="install the driver's versions on every node (one image for head and workers)")


def _workers_on(n: Node, spec: JobSpec) -> int:
    """The most of the job's workers that Ray may place on node `n`."""
    return min(n.slots, spec.resources.num_workers)


def _check_shm(spec: JobSpec, hosts: list[Node], cl: Checklist) -> None:
    if not spec.resources.use_gpu:  # gloo between CPU workers does not use /dev/shm
        least = min((n.facts.shm_bytes or 0 for n in hosts), default=0)
        cl.add(Check("/dev/shm", True, f"{least / GiB:.2f} GiB at least (CPU job: gloo does not use it)"))
        return
    _each(hosts, cl, "/dev/shm",
          lambda n: None if (n.facts.shm_bytes or 0) >= NCCL_SHM else
          f"{(n.facts.shm_bytes or 0) / 2**20:.0f} MiB; NCCL between this node's GPUs needs {NCCL_SHM / GiB:g} GiB",
          f"at least {NCCL_SHM / GiB:g} GiB (NCCL)",
          fix="a larger /dev/shm (docker --shm-size=1g; on Kubernetes an emptyDir volume with medium: Memory at "
              "/dev/shm, as `ftdist k8s render` writes)")


def _check_disk(spec: JobSpec, hosts: list[Node], ckpt: CheckpointSize, cl: Checklist) -> None:
    def short(n: Node) -> Optional[str]:
        need = ckpt.node_bytes(_workers_on(n, spec))
        if n.facts.staging_free >= need:
            return None
        return (f"{n.facts.staging_dir} has {size_text(n.facts.staging_free)} free; staging a checkpoint of its "
                f"{_workers_on(n, spec)} workers needs {size_text(need)} (planned)")

    total = ckpt.total(spec.resources.num_workers)
    _each(hosts, cl, "disk", short, f"checkpoint staging: {size_text(total)} per checkpoint (planned), "
          f"{size_text(min((n.facts.staging_free for n in hosts), default=0))} free at least",
          fix="more local disk for the temp folder (TMPDIR), or a higher ZeRO stage (smaller per-rank shards)")


def _check_memory(spec: JobSpec, hosts: list[Node], per_worker: int, cl: Checklist) -> None:
    def short(n: Node) -> Optional[str]:
        need = per_worker * _workers_on(n, spec)
        if n.facts.memory_bytes >= need:
            return None
        return (f"{size_text(n.facts.memory_bytes)} of memory; {_workers_on(n, spec)} workers need "
                f"{size_text(need)} of host memory (planned: loading, offload)")

    _each(hosts, cl, "memory", short, f"host memory: {size_text(per_worker)} per worker (planned)",
          fix="nodes with more memory, fewer workers per node, or no offload")


# ---------------------------------------------------------------------------------------------------------------
# Collective and one step


def _check_collective(spec: JobSpec, nodes: list[Node], needs: Needs, timeout_s: float, cl: Checklist) -> None:
    r = spec.resources
    if r.num_workers < 2:
        cl.add(Check("collective", True, "one worker: no collective", skipped=True))
        return
    env = {"env_vars": runtime_env_vars(use_gpu=r.use_gpu)}
    res = run_collective(r.num_workers, _bundle(spec), r.use_gpu, env, timeout_s)
    labels = {n.node_id: n.label for n in nodes}
    for node, line in res.failures:
        cl.add(Check("collective", False, f"{res.backend}: {line}", node=labels.get(node),
                     fix="the workers must reach each other on every port (check NCCL_SOCKET_IFNAME/"
                         "GLOO_SOCKET_IFNAME and firewalls between nodes)"))
    if res.failures:
        return
    cl.add(Check("collective", True, f"{res.backend} all-reduce among {res.world} workers on {_nodes(res.nodes)}: "
                                     f"{res.bus_gbps:.2f} GB/s bus bandwidth"))
    if res.gpu_memory and needs.gpu_peak:
        for node, free, total in res.gpu_memory:
            if total < needs.gpu_peak:
                cl.add(Check("gpu memory", False, f"{size_text(total)} per GPU; the job's planned peak is "
                                                  f"{size_text(needs.gpu_peak)}", node=labels.get(node),
                             fix="`ftdist plan` names the smallest change that fits"))


def _check_step(spec: JobSpec, needs: Needs, cl: Checklist) -> None:
    """The job itself for one optimizer step, under a scratch name beside it, then removed."""
    from ftdist.storage.checkpoints import CheckpointStore
    from ftdist.train.driver import run_training

    name = f"{spec.name[:44]}-preflight-{secrets.token_hex(3)}"
    scratch = with_overrides(spec, {"name": name, "optim.max_steps": 1, "optim.epochs": None,
                                    "optim.warmup_steps": 0, "checkpoint.every_n_steps": None,
                                    "checkpoint.keep_last": 1, "checkpoint.keep_best_by": None,
                                    "eval.every_n_steps": None, "eval.max_batches": 1, "export.enabled": False,
                                    "sweep": None})
    if scratch.prepared_root is not None:  # the step's prepared data goes with the scratch run: nothing stays
        scratch = with_overrides(scratch, {"data.cache": f"{scratch.run_dir}/_prepared"})
    start = time.monotonic()
    try:
        with leaves_no_folders(scratch.run_dir):
            store = CheckpointStore(scratch.run_dir)
            try:
                summary = run_training(scratch)
                seconds = time.monotonic() - start
                latest = store.latest_valid() if summary.error is None else None
            finally:
                store.store.delete_prefix("")
    except (SpecError, ClientError, BotoCoreError, OSError) as e:  # the driver's own access to the run folder
        message = s3.describe_error(e, scratch.run_dir) if isinstance(e, (ClientError, BotoCoreError)) else str(e)
        cl.add(Check("step", False, f"from this machine (the driver): {message}",
                     fix="the driver reads and writes the run folder too (its lease, the final state)"))
        return
    if summary.error is not None or latest is None:
        why = str(summary.error).strip().splitlines()[-1][:300] if summary.error else "no committed checkpoint"
        cl.add(Check("step", False, f"one training step and checkpoint: {why}",
                     fix="the worker logs above show the first error"))
        return
    size = f"{size_text(latest.size)} written"
    if needs.checkpoint is not None:
        size += f", {latest.size / needs.checkpoint.total(spec.resources.num_workers):.2f} x planned"
    cl.add(Check("step", True, f"one training step and a committed checkpoint in {seconds:.0f} s ({size}); "
                               f"scratch run {scratch.run_dir} removed"))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _nodes(n: int) -> str:
    return _count(n, "node")


