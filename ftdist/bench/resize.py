"""`ftdist bench --only resize`: resuming on another number of workers and checkpoints without frozen parameters,
side by side in one run on the benchmark model:

1. resize cost: seconds from the start of a re-run to its first step when it resumes a 2-worker checkpoint on 1
   worker (conversion included) / the same re-run on 2 workers (a same-size restart), with the split;
2. conversion throughput: ftdist's conversion of that checkpoint (download, verify, DeepSpeed's ds_to_universal in a
   child process, upload with a manifest) / DeepSpeed's script alone on a local copy, and the peak memory of each;
3. a LoRA checkpoint with the frozen base left out / with it (the same adapter on a from_config twin, whose
   checkpoints keep the base): bytes, and seconds to upload to an S3-compatible server;
4. `ftdist export` of a ZeRO-3 checkpoint reading only the fp32 master weights of the optimizer files / the whole
   files (as for a checkpoint from before the manifest listed their records): bytes read and seconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import psutil  # Ray's dependency, not ftdist's (this module loads only for `ftdist bench --only resize`)

from ftdist.bench.common import BENCH_LLAMA, bench_spec, task
from ftdist.spec import JobSpec, spec_from_dict
from ftdist.storage.checkpoints import MANIFEST, CheckpointStore, checkpoint_name
from ftdist.storage.store import relative_files
from ftdist.train.contracts import STARTUP_KEY
from ftdist.train.driver import run_training
from ftdist.train.ray_runtime import connect_ray, disconnect_ray


def _spec(storage: str, name: str, workers: int, steps: int, **over: Any) -> JobSpec:
    job = bench_spec(storage, steps, stage=2, name=name, workers=workers).model_dump(mode="json", exclude_none=True)
    job["checkpoint"] = {**job["checkpoint"], "every_n_steps": 2, "keep_last": 5}
    for k, v in over.items():
        job[k] = {**job.get(k, {}), **v} if isinstance(v, dict) else v
    return spec_from_dict(job)


def _startup(summary: Any) -> dict:
    """This attempt's startup breakdown (the history also holds the rows of the attempt it resumed)."""
    for row in reversed(summary.history):
        if STARTUP_KEY in row:
            return row[STARTUP_KEY]
    raise RuntimeError(f"{summary.name}: no startup breakdown reported")


def _run(spec: JobSpec) -> Any:
    s = run_training(spec)
    if s.error is not None:
        raise RuntimeError(f"bench run {spec.name} failed: {s.error}")
    return s


class PeakRSS:
    """The peak resident memory of a process and its children, sampled every 20 ms while a `with` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(0.02)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _timed_child(code: str) -> tuple[float, int]:
    """(seconds, peak RSS of the process tree) of `python -c code`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with PeakRSS(proc.pid) as mem:
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(err.decode()[-2000:])
    return time.perf_counter() - t0, mem.peak


def bench_resize(tmp: str) -> dict:
    storage = os.path.join(tmp, "resize")
    out: dict = {}
    started = connect_ray(None, 3)
    try:
        _run(_spec(storage, "two", 2, 2))  # the 2-worker checkpoint at step 2
        src = os.path.join(storage, "two", checkpoint_name(2))
        for name, workers in (("same", 2), ("resized", 1)):
            os.makedirs(os.path.join(storage, name))
            shutil.copytree(src, os.path.join(storage, name, checkpoint_name(2)))
            out[name] = _startup(_run(_spec(storage, name, workers, 4)))

        # Conversion: DeepSpeed's script alone on a local copy of the tag folder, then ftdist's whole path.
        ckpt_bytes = CheckpointStore(os.path.join(storage, "two")).read_manifest(checkpoint_name(2)).total_bytes
        tag = os.path.join(src, checkpoint_name(2))
        ds_out = os.path.join(tmp, "ds-universal", checkpoint_name(2))
        ds_s, ds_peak = _timed_child(f"from ftdist.train.universal import convert; convert({tag!r}, {ds_out!r}, 1)")
        job = os.path.join(storage, "two")
        ft_out = os.path.join(tmp, "ft-universal")
        ft_s, ft_peak = _timed_child(
            "from ftdist.storage.checkpoints import CheckpointStore; from ftdist.train.universal import "
            f"UniversalCheckpoints; UniversalCheckpoints(CheckpointStore({job!r})).create({checkpoint_name(2)!r}, "
            f"1, {ft_out!r})")
        out["convert"] = {"bytes": ckpt_bytes, "ds_s": ds_s, "ds_peak": ds_peak, "ft_s": ft_s, "ft_peak": ft_peak}

        out["lora"] = _bench_lora_bytes(tmp, storage)
        out["export"] = _bench_zero3_export(tmp, storage)
    finally:
        disconnect_ray(started)
    return out


def _bench_lora_bytes(tmp: str, storage: str) -> dict:
    """The same LoRA job on a saved base (frozen base left out) and on its from_config twin (kept)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = os.path.join(tmp, "bench-base")
    cfg = dict(BENCH_LLAMA)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(base)
    AutoTokenizer.from_pretrained(task().tokenizer).save_pretrained(base)
    lora = {"method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}
    after = _spec(storage, "lora-after", 2, 2, model={"name_or_path": base, "from_config": None, "tokenizer": None},
                  **lora)
    before = _spec(storage, "lora-before", 2, 2, **lora)
    sizes = {}
    for key, spec in (("after", after), ("before", before)):
        _run(spec)
        m = CheckpointStore(spec.run_dir).read_manifest(checkpoint_name(2))
        sizes[key] = {"bytes": m.total_bytes, "upload_s": _upload_seconds(spec.run_dir, checkpoint_name(2))}
    return sizes


@contextlib.contextmanager
def _seaweedfs(bucket: str) -> Iterator[str]:
    """A local SeaweedFS in this process's AWS environment for the block: yields the bucket's s3:// URI."""
    from ftdist.bench.local_s3 import start_seaweedfs

    server = start_seaweedfs(volume_mb=256)
    saved = dict(os.environ)
    try:
        os.environ.update(server.env())
        yield f"s3://{server.make_bucket(bucket)}"
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()


def _files_of(local: str) -> list[tuple[str, str]]:
    """(path, key) of every file under `local`, as put_files takes them."""
    return [(os.path.join(local, rel), rel) for rel in relative_files(local)]


def _upload_seconds(job: str, name: str) -> float:
    """Seconds ftdist's uploader takes to put a checkpoint folder on a local SeaweedFS (median of 3)."""
    from ftdist.storage.store import open_store

    with _seaweedfs("ftdist-bench-lora") as bucket:
        files = _files_of(os.path.join(job, name))
        times = []
        for i in range(3):
            store = open_store(f"{bucket}/run{i}")
            t0 = time.perf_counter()
            store.put_files(files)
            times.append(time.perf_counter() - t0)
        return sorted(times)[1]


def _bench_zero3_export(tmp: str, storage: str) -> dict:
    """`ftdist export` of a 2-worker ZeRO-3 checkpoint from a local SeaweedFS: reading only the master weights'
    records of the optimizer files (the manifest lists them) / the same checkpoint with a manifest from before
    records (whole optimizer files downloaded). Bytes read and seconds (median of 3)."""
    from ftdist.storage.manifest import Manifest
    from ftdist.storage.store import open_store
    from ftdist.train.export import export_checkpoint, export_reads

    spec = _spec(storage, "z3", 2, 2, zero={"stage": 3})
    _run(spec)
    name = checkpoint_name(2)
    manifest = CheckpointStore(spec.run_dir).read_manifest(name)
    old = Manifest.model_validate({**manifest.model_dump(), "files": [
        {**f.model_dump(), "records": None} for f in manifest.files]})
    out: dict = {}
    with _seaweedfs("ftdist-bench-export") as bucket:
        for key, m in (("ranged", manifest), ("whole", old)):
            job = f"{bucket}/{key}"
            store = open_store(job)
            store.put_files([(p, f"{name}/{k}") for p, k in _files_of(os.path.join(spec.run_dir, name))
                             if k != MANIFEST])
            store.put_bytes(f"{name}/{MANIFEST}", m.model_dump_json(exclude_none=True).encode())
            whole, partial = export_reads(m)
            times = []
            for i in range(3):
                t0 = time.perf_counter()
                export_checkpoint(f"{job}/{name}", os.path.join(tmp, f"export-{key}-{i}"))
                times.append(time.perf_counter() - t0)
            out[key] = {"bytes": sum(f.size for f in whole) + sum(r.size for f in partial for r in f.records),
                        "s": sorted(times)[1]}
    return out
