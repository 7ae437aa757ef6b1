"""A collective among as many workers as the job has, placed with the job's per-worker resources and spread over
the nodes (the cross-node path is the one that fails in practice: a wrong network interface, a firewall between
nodes, NCCL unable to use the fabric). Each member joins one torch.distributed process group (NCCL on GPUs, gloo on
CPUs, as the job's workers will), then all-reduces a buffer a few times; the bus bandwidth is reported as
nccl-tests defines it. A member that fails to join is named by its node; so are members still waiting when the
timeout ends (a hung rendezvous)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Optional

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

_PEER_LOST = re.compile(r"connection (was likely )?closed|connection reset|closed by peer|broken pipe|failed to recv|"
                        r"timed? ?out|timeout", re.IGNORECASE)
"""How a member's error reads when another member went away, not when its own node is at fault."""
BUFFER_BYTES = {"gloo": 16 << 20, "nccl": 256 << 20}
ITERATIONS = 5


@dataclass
class CollectiveResult:
    backend: str
    world: int
    nodes: int
    bus_gbps: Optional[float] = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (node id, one line)
    gpu_memory: list[tuple[str, int, int]] = field(default_factory=list)  # (node id, free, total) per GPU member


class _Member:
    """One rank of the check. torch is imported here, on the node, never on the driver."""

    def where(self) -> tuple[str, str, int]:
        import socket

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:  # the rendezvous port on rank 0's node
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return ray.get_runtime_context().get_node_id(), ip, port

    def join(self, master: str, rank: int, world: int, backend: str, timeout_s: float) -> Optional[tuple[int, int]]:
        """Join the group; (free, total) bytes of this member's GPU, or None on CPU."""
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        memory = None
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray shows each GPU member only its own device
            memory = torch.cuda.mem_get_info()
        dist.init_process_group(backend, init_method=f"tcp://{master}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        return memory

    def allreduce(self, nbytes: int, iterations: int) -> float:
        """Seconds per all-reduce of `nbytes` (after one warm-up)."""
        import torch
        import torch.distributed as dist

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        dist.all_reduce(buf)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iterations):
            dist.all_reduce(buf)
        sync()
        seconds = (time.perf_counter() - start) / iterations
        dist.destroy_process_group()
        return seconds


def run_collective(num_workers: int, bundle: dict, use_gpu: bool, runtime_env: dict,
                   timeout_s: float) -> CollectiveResult:
    backend = "nccl" if use_gpu else "gloo"
    pg = placement_group([dict(bundle)] * num_workers, strategy="SPREAD")
    result = CollectiveResult(backend, num_workers, 0)
    members = []
    try:
        if not _ready(pg, timeout_s):
            result.failures.append(("", f"{num_workers} workers with {_fmt(bundle)} each could not be placed in "
                                        f"{timeout_s:.0f} s"))
            return result
        actor = ray.remote(_Member)
        for i in range(num_workers):
            members.append(actor.options(
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), runtime_env=runtime_env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)).remote())
        places = ray.get([m.where.remote() for m in members], timeout=timeout_s)
        result.nodes = len({node for node, _, _ in places})
        master = f"{places[0][1]}:{places[0][2]}"
        joins = {m.join.remote(master, rank, num_workers, backend, timeout_s): places[rank][0]
                 for rank, m in enumerate(members)}
        joined = _gather(joins, timeout_s, result)
        if not joined:
            return result
        result.gpu_memory = [(node, *memory) for node, memory in joined if memory]
        nbytes = BUFFER_BYTES[backend]
        runs = {m.allreduce.remote(nbytes, ITERATIONS): places[r][0] for r, m in enumerate(members)}
        seconds = _gather(runs, timeout_s, result)
        if seconds:
            t = max(s for _, s in seconds)  # the slowest rank's view is the collective's time
            result.bus_gbps = nbytes / t * 2 * (num_workers - 1) / num_workers / 1e9
        return result
    except ray.exceptions.GetTimeoutError:
        result.failures.append(("", f"the workers did not start in {timeout_s:.0f} s"))
        return result
    finally:
        for m in members:
            ray.kill(m)
        remove_placement_group(pg)


def _gather(refs: dict, timeout_s: float, result: CollectiveResult) -> list[tuple[str, object]]:
    """(node id, value) of every ref in time; else records who failed (their error's last line) or, if nobody
    failed, who was still waiting, and returns []. The first failure ends the wait: the other members would only
    sit in the rendezvous until their timeout (they are killed by the caller)."""
    deadline = time.monotonic() + timeout_s
    pending, values, failed = list(refs), [], []

    def collect(done: list) -> None:
        for ref in done:
            try:
                values.append((refs[ref], ray.get(ref)))
            except ray.exceptions.RayError as e:
                failed.append((refs[ref], _last_line(e)))

    while pending and not failed:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            break
        collect(done)
    if failed and pending:  # a moment for failures that happen together (two nodes with the same fault) ...
        first = list(failed)
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=2.0)
        collect(done)
        # ... but not the members that only lost the failed one (their peer went away: effect, not cause)
        failed = first + [f for f in failed[len(first):] if not _PEER_LOST.search(f[1])]
    if failed:
        result.failures.extend(failed)
    elif pending:
        result.failures.extend((refs[r], f"still waiting after {timeout_s:.0f} s (a hung rendezvous or collective)")
                               for r in pending)
    return [] if result.failures else values


def _ready(pg, timeout_s: float) -> bool:
    done, _ = ray.wait([pg.ready()], timeout=timeout_s)
    return bool(done)


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(getattr(e, "cause", None) or e).splitlines() if ln.strip()]
    # c10d/gloo prefix their messages with the C++ source location: "[enforce fail at .../device.cc:84] ifa != ..."
    return _SOURCE_PREFIX.sub("", lines[-1])[:300] if lines else type(e).__name__


_SOURCE_PREFIX = re.compile(r"^\[enforce fail at [^\]]*\]\s*(\S+ != nullptr\.\s*)?")


def _fmt(bundle: dict) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in bundle.items())
