"""`ftdist bench --only elastic`: what losing a node costs an elastic job, beside a same-size restart, on a real Ray
cluster of 1-CPU nodes on 127.0.0.1 (ftdist/bench/local_ray.py), each job driven by `ftdist train --address` as a
user runs it, on the benchmark model (ZeRO-2, fp32):

1. lost node: `num_workers: {min: 1, max: 2}` on two nodes; after the step-4 checkpoint one node is SIGKILLed (its
   raylet and workers: a lost machine or a reclaimed spot pod) and the job goes on with 1 worker from that
   checkpoint, converted to its universal form;
2. same-size restart: a fixed 2-worker job on two nodes; after the step-4 checkpoint rank 0's worker process is
   SIGKILLed (its node stays) and Ray Train restarts the group at 2 workers from that checkpoint.

Each: seconds from the kill to the new group's first step, split into detection (the kill to the new group's worker
processes starting: Ray noticing, the controller's decision, a start attempt that waits for the lost node) and the
new group's own start (worker start-up and imports, data, model, DeepSpeed, then converting and loading the
checkpoint).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import yaml

from ftdist.bench.common import bench_spec
from ftdist.bench.local_ray import start_cluster

_PID = re.compile(r"\(RayTrainWorker pid=(\d+)\)")
_RESTART = re.compile(r"\] (?:resized \d+ -> \d+ workers|resumed on \d+ workers)[^:]*: first step ([0-9.]+) s after "
                      r"this attempt's workers started, ([0-9.]+) s of it converting and loading")
_STEP = re.compile(r"\[ftdist\] step (\d+)/")


def _job_file(folder: str, name: str, workers: object) -> str:
    spec = bench_spec(os.path.join(folder, "store"), 40, stage=2, name=name, log_every=1, workers=2)
    job = spec.model_dump(mode="json", exclude_none=True)
    job["resources"].update(num_workers=workers, max_failures=2, elastic_check_s=3600)  # (no growing back here)
    job["checkpoint"].update(every_n_steps=4, keep_last=2)
    path = os.path.join(folder, f"{name}.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(job, fh)
    return path


def _one(name: str, workers: object, lose_node: bool) -> dict:
    """Run one job on a fresh 2-node cluster, kill after step 4's checkpoint, time the recovery."""
    import psutil

    folder = tempfile.mkdtemp(prefix=f"ftdist-bench-{name}-")
    cluster = start_cluster(head_cpus=0, worker_cpus=())
    try:
        nodes = [cluster.add_node(1, f"node{i}") for i in range(2)]
        proc = subprocess.Popen([sys.executable, "-m", "ftdist.cli", "train", _job_file(folder, name, workers),
                                 "--address", cluster.gcs], env=cluster.client_env(RAY_DEDUP_LOGS="0"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        killed_at, rank0, out = None, None, []
        for line in proc.stdout:
            out.append(line)
            pid = _PID.search(line)
            step = _STEP.search(line)
            if killed_at is None and step and int(step[1]) == 5 and pid:  # step 4's checkpoint is committed
                rank0 = int(pid[1])
                killed_at = time.monotonic()
                if lose_node:
                    cluster.kill_node(nodes[1])
                else:
                    psutil.Process(rank0).kill()
            elif killed_at is not None and pid and int(pid[1]) != rank0 and (m := _RESTART.search(line)):
                total = time.monotonic() - killed_at
                proc.kill()
                attempt, restore = float(m[1]), float(m[2])
                return {"s": total, "detection": total - attempt, "start": attempt - restore, "restore": restore}
        raise RuntimeError(f"bench {name}: no restart seen:\n{''.join(out[-40:])}")
    finally:
        if "proc" in locals() and proc.poll() is None:
            proc.kill()
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def bench_elastic() -> dict:
    return {"lost": _one("lost-node", {"min": 1, "max": 2}, lose_node=True),
            "same": _one("same-size", 2, lose_node=False)}
