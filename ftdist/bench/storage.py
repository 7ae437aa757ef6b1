"""`ftdist bench --only checkpoint`: checkpoint storage, ftdist against what Ray and boto3 do by default, side by
side in one run against the same S3-compatible server (a local SeaweedFS unless AWS_ENDPOINT_URL + --s3-bucket
point elsewhere):

1. upload throughput of one rank's checkpoint folder: ftdist's uploader (s3transfer, all files at once, parts in
   parallel, BLAKE3 manifest) / Ray's default upload (pyarrow.fs.copy_files, what Ray Train does without a
   checkpoint_upload_fn) and / a plain single-stream boto3 upload_file per file;
2. step blocking time per checkpoint in a 2-worker Ray Train run: ftdist (async upload) / Ray's default
   synchronous upload of the same files. Both include the same local save;
3. wall-time overhead of a real `ftdist train` run checkpointing every k steps to S3 vs. only at the end.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from typing import Optional

import boto3.s3.transfer as s3t
import ray.train
from pyarrow import fs as pafs
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ftdist.bench.common import bench_spec
from ftdist.bench.local_s3 import start_seaweedfs
from ftdist.spec import spec_from_dict, with_overrides
from ftdist.storage import s3
from ftdist.storage.checkpoints import CheckpointStore
from ftdist.storage.store import TransferOptions
from ftdist.train.checkpointing import RankCheckpointer
from ftdist.train.driver import run_training
from ftdist.train.ray_runtime import connect_ray, disconnect_ray

WORLD = 2


def make_checkpoint_dir(root: str, rank: int, mb: int) -> str:
    """A folder shaped like one rank's DeepSpeed checkpoint: a large optimizer shard, a model-state file, small
    metadata. Random bytes (incompressible)."""
    d = os.path.join(root, f"rank{rank}")
    tag = os.path.join(d, "step_00000010")
    os.makedirs(tag, exist_ok=True)
    sizes = {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt": int(mb * 0.75) << 20,
             f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt": int(mb * 0.25) << 20,
             f"rng_state_rank{rank}.pt": 14 << 10}
    block = os.urandom(1 << 20)
    for name, size in sizes.items():
        with open(os.path.join(tag, name), "wb") as fh:
            left = size
            while left > 0:
                n = min(left, len(block))
                fh.write(block[:n])
                left -= n
            fh.write(os.urandom(64))  # distinct content per file
    if rank == 0:
        with open(os.path.join(d, "ftdist_state.json"), "w") as fh:
            fh.write('{"step": 10}')
    return d

def _dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)

def _cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) used so far by the processes of one process group (the local S3 server)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:  # fields: state, ppid, pgrp, ..., utime (11), stime (12)
            total += (int(fields[11]) + int(fields[12])) / tick
    return total

def bench_transfer(bucket: str, src: str, reps: int = 5, server_pgid: Optional[int] = None) -> dict:


    size = _dir_bytes(src)
    client = s3.client()
    arrow = s3.pyarrow_fs()
    files = [(os.path.join(r, f), os.path.relpath(os.path.join(r, f), src)) for r, _, fs in os.walk(src) for f in fs]

    def ftdist(i: int) -> None:
        CheckpointStore(f"s3://{bucket}/xfer/ftdist{i}", TransferOptions()).upload_rank(src, "step_00000010", 0)

    def ray_default(i: int) -> None:
        # ray.train's StorageContext.persist_current_checkpoint -> _pyarrow_fs_copy_files -> pyarrow.fs.copy_files
        pafs.copy_files(src, f"{bucket}/xfer/pyarrow{i}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=arrow)

    def boto_single(i: int) -> None:
        cfg = s3t.TransferConfig(use_threads=False)
        for p, rel in files:
            client.upload_file(p, bucket, f"xfer/boto{i}/{rel}", Config=cfg)

    # One untimed upload first: a fresh SeaweedFS allocates its volumes on the first writes, and whichever method
    # went first paid for that. Then the methods take turns, so drift on a shared machine hits all of them alike.
    ray_default(reps)
    # The median over the repetitions: on a small machine a single upload swings by 50% with the server's state.
    times: dict[str, list[float]] = {"ftdist": [], "pyarrow": [], "boto3": []}
    server_cpu: dict[str, list[float]] = {name: [] for name in times}
    for i in range(reps):
        for name, fn in (("ftdist", ftdist), ("pyarrow", ray_default), ("boto3", boto_single)):
            c0 = _cpu_seconds(server_pgid) if server_pgid else 0.0
            t0 = time.perf_counter()
            fn(i)
            times[name].append(time.perf_counter() - t0)
            if server_pgid:
                server_cpu[name].append(_cpu_seconds(server_pgid) - c0)
    out: dict = {name: size / statistics.median(t) for name, t in times.items()}
    out["bytes"], out["reps"] = size, reps
    if server_pgid:  # CPU the S3 server spent per upload: on loopback it, not the client, sets the pace
        out["server_cpu"] = {name: statistics.median(c) for name, c in server_cpu.items()}
    return out

def _blocking_fn(config: dict) -> None:
    """Ray Train worker: n checkpoints of the same files, `gap_s` of (simulated) compute between them."""

    spec = spec_from_dict(config["spec"], "bench spec")
    rank = ray.train.get_context().get_world_rank()
    src = config["src"][rank]
    ck = RankCheckpointer(spec, rank, WORLD)
    blocked = []
    for i in range(config["n"]):
        time.sleep(config["gap_s"])  # the training steps between two checkpoints
        t0 = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix=f"ftdist-bench-r{rank}-")
        shutil.copytree(src, tmp, dirs_exist_ok=True)  # the local save
        if config["mode"] == "ftdist":
            ck.publish(tmp, 10 * (i + 1), {"step": 10 * (i + 1)})
        else:  # Ray's default: synchronous pyarrow upload of the folder
            ray.train.report({"step": 10 * (i + 1)}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"step_{10 * (i + 1):08d}")
            shutil.rmtree(tmp, ignore_errors=True)
        blocked.append(time.perf_counter() - t0)
    ck.drain()
    if rank == 0:
        with open(config["out"], "w") as fh:
            fh.write(",".join(f"{b:.6f}" for b in blocked))

def bench_blocking(bucket: str, srcs: list[str], tmp: str, n: int = 3, gap_s: float = 8.0) -> dict:
    """Median time a step blocks per checkpoint. The simulated compute between two checkpoints (gap_s) outlasts one
    upload of both ranks' 256 MiB on this 2-core loopback (about 5 s), as minutes of training do between real
    checkpoints; with a shorter gap the next save waits for the previous upload (at most one in flight per rank)
    and the measurement turns into one of upload throughput."""

    res = {}
    for mode in ("ftdist", "ray"):
        spec = bench_spec(f"s3://{bucket}/blocking", 10, name=f"block-{mode}")
        out = os.path.join(tmp, f"blocked-{mode}.txt")
        trainer = TorchTrainer(
            _blocking_fn,
            train_loop_config={"spec": spec.model_dump(mode="json"), "src": srcs, "n": n, "gap_s": gap_s,
                               "mode": mode, "out": out},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=WORLD, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"block-{mode}", storage_path=f"{bucket}/blocking",
                                 storage_filesystem=s3.pyarrow_fs(),
                                 worker_runtime_env={"env_vars": s3.forwarded_env()}),
        )
        result = trainer.fit()
        if result.error:
            raise RuntimeError(result.error)
        with open(out) as fh:
            res[mode] = statistics.median(float(x) for x in fh.read().split(","))
    return res

def bench_overhead(storage: str, steps: int = 60, every: int = 10, rounds: int = 2) -> dict:
    """Training time of a run checkpointing every `every` steps and of one checkpointing only at the end, in the order
    A B B A (repeated `rounds` / 2 times): the later of two runs in one Ray tends to be slower, and a single pair
    swings by several percent here. The overhead is of the means."""

    times: dict = {"none": [], "every": []}
    order = [("none", None), ("every", every), ("every", every), ("none", None)] * max(1, rounds // 2)
    for i, (label, k) in enumerate(order):
        spec = with_overrides(bench_spec(storage, steps, name=f"overhead-{label}-{i}", log_every=10),
                              {"checkpoint.every_n_steps": k, "checkpoint.keep_last": 2})
        s = run_training(spec)
        if s.error:
            raise RuntimeError(s.error)
        times[label].append([h for h in s.history if "train_time_s" in h][-1]["train_time_s"])
    out = {label: statistics.mean(v) for label, v in times.items()}
    out["ratio"] = out["every"] / out["none"] - 1.0
    out["runs"] = len(order)
    return out

def run(lines: list[str], mb: int, bucket: Optional[str] = None) -> None:

    server = None
    if bucket is None:

        server = start_seaweedfs(volume_mb=1024)  # GiB of writes: no volume switch every 64 MiB
        os.environ.update(server.env())  # this process and the local Ray it starts
        bucket = server.make_bucket("ftdist-bench")
    tmp = tempfile.mkdtemp(prefix="ftdist-bench-ckpt-")
    try:
        srcs = [make_checkpoint_dir(tmp, r, mb) for r in range(WORLD)]
        t = bench_transfer(bucket, srcs[0], server_pgid=os.getpgid(server.proc.pid) if server else None)
        mbps = lambda b: f"{b / 2**20:.0f} MiB/s"  # noqa: E731
        what = f"{t['bytes'] / 2**20:.0f} MiB, 3 files, median of {t['reps']}"
        lines.append(f"| checkpoint upload throughput, one rank ({what}) | {mbps(t['ftdist'])} | "
                     f"{mbps(t['pyarrow'])} (Ray default: pyarrow copy_files) | {t['ftdist'] / t['pyarrow']:.2f} | "
                     ">= 1.0 |")
        lines.append(f"| checkpoint upload throughput, one rank ({what}) | {mbps(t['ftdist'])} | "
                     f"{mbps(t['boto3'])} (boto3 upload_file, single stream) | {t['ftdist'] / t['boto3']:.2f} | "
                     ">= 1.0 |")
        if "server_cpu" in t:
            c = t["server_cpu"]
            lines.append(f"| CPU time of the local SeaweedFS per upload (median) | {c['ftdist']:.2f} s | "
                         f"{c['pyarrow']:.2f} s (pyarrow), {c['boto3']:.2f} s (boto3) | "
                         f"{c['ftdist'] / c['pyarrow']:.2f} | |")
        started = connect_ray(None, WORLD + 1)
        try:
            b = bench_blocking(bucket, srcs, tmp)
            lines.append(f"| step blocking per checkpoint, 2 ranks x {mb} MiB (median of 3) | {b['ftdist']:.2f} s | "
                         f"{b['ray']:.2f} s (Ray default: sync pyarrow upload) | {b['ftdist'] / b['ray']:.2f} | "
                         "<= 0.2 |")
            o = bench_overhead(f"s3://{bucket}/overhead")
            lines.append(f"| `ftdist train` wall time, 60 steps, checkpoint to S3 every 10 vs. only at the end "
                         f"(mean of {o['runs'] // 2} each, order A B B A) | "
                         f"{o['every']:.1f} s | {o['none']:.1f} s | +{100 * o['ratio']:.1f}% | <= +10% |")
        finally:
            disconnect_ray(started)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if server is not None:
            server.stop()
