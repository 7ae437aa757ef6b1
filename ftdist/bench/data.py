"""`ftdist bench --only data`: prepared data against today's path (every rank tokenising the whole set in memory,
`data.cache: off`) on a generated set of prompt/completion rows, 2 workers: time from `ftdist train` to the first
step (cold and warm cache), per-rank peak memory of the data, and `ftdist data prepare`'s tokens/s with Ray tasks
beside one process. Also the memory probe the integration test uses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Optional

import yaml

from ftdist.bench.common import bench_spec, task
from ftdist.bench.task import row
from ftdist.spec import JobSpec, with_overrides


def write_rows(path: str, n: int) -> str:
    """`n` prompt/completion rows of the benchmark task (numbers 1..n spelled out), made once per size."""
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as fh:
            fh.writelines(json.dumps(row(k % 999_999 + 1)) + "\n" for k in range(n))
        os.replace(path + ".tmp", path)
    return path


def data_spec(tmp: str, rows: int, name: str, cache: Optional[str], steps: int = 1) -> JobSpec:
    data = write_rows(os.path.join(tmp, f"rows-{rows}.jsonl"), rows)
    return with_overrides(bench_spec(os.path.join(tmp, "store"), steps, name=name, log_every=1),
                          {"data.train": data, "data.cache": cache or "off"})


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def mapped_kb(suffix: str) -> int:
    """Resident KiB of this process's mappings of files ending in `suffix` (/proc/self/smaps)."""
    total, ours = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line: address range ... path
                ours = line.rstrip().endswith(suffix)
            elif ours and first == "Rss:":
                total += int(line.split()[1])
    return total


def measure_rank_memory(job_json: str, batches: int = 200) -> None:
    """In a fresh process: what one rank's data costs in memory, from after the imports and the tokenizer (and one
    warm-up batch, so the library code paged in by a first collate is not counted) to after it has its examples and
    has drawn `batches` micro batches. Prints JSON (bytes): `peak`, the growth of the resident set's peak; `anon`, the
    growth of private memory (today's path keeps the tokenised set there); `mapped`, the resident pages of the
    prepared parts it maps: page cache shared with the node's other ranks and evictable, which the kernel maps 64 KiB
    around each page a sample touches (fault-around), so it reaches the parts' size at small sets."""
    from ftdist.train.data import Example, collate
    from ftdist.train.locations import load_tokenizer
    from ftdist.train.objectives import objective_for
    from ftdist.train.prepare import worker_data
    from ftdist.train.sampling import ShardedLoader

    spec = JobSpec.model_validate_json(job_json)
    tok = load_tokenizer(spec.model.tokenizer_path)
    objective = objective_for(spec)
    collate([Example([1, 2, 3], [1, 2, 3])] * 4, tok.pad_token_id)
    base_rss, base_anon = _status_kb("VmRSS"), _status_kb("RssAnon")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the peak (VmHWM) starts again from here
    sources = worker_data(spec, tok, objective, 0, lambda ok: ok, lambda: None, show=False)
    loader = ShardedLoader.for_job(spec, [s.splits.train for s in sources], 0, spec.resources.num_workers)
    it = loader.micro_batches(0)
    for _ in range(batches):
        objective.collate(next(it), tok.pad_token_id)
    print(json.dumps({"peak": (_status_kb("VmHWM") - base_rss) * 1024,
                      "anon": (_status_kb("RssAnon") - base_anon) * 1024, "mapped": mapped_kb(".arrow") * 1024,
                      "examples": len(sources[0].splits.train)}))


def rank_memory(spec: JobSpec, batches: int = 200) -> dict:
    """measure_rank_memory in a child process (its own peak, nothing of this process's)."""
    code = ("import sys; from ftdist.bench.data import measure_rank_memory; "
            f"measure_rank_memory(sys.stdin.read(), {int(batches)})")
    r = subprocess.run([sys.executable, "-c", code], input=spec.model_dump_json(), capture_output=True, text=True,
                       timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"memory probe failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def first_step(spec: JobSpec, tmp: str) -> dict:
    """`ftdist train` on the job as a user runs it: seconds from the command's start to its first optimizer step (the
    "step 1/" line), with the seconds of the driver's data check and of the workers' data phase from their own
    lines."""
    path = os.path.join(tmp, f"{spec.name}.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(spec.model_dump(mode="json"), fh, sort_keys=False)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ftdist.cli", "train", path], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp)
    out: dict = {}
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if "ftdist: data:" in line and (m := re.search(r"(?:prepared|tokenised|checked) in ([\d.]+) s", line)):
            out["driver"] = float(m.group(1))  # the driver's data check (before Ray starts), as it reports it
        if (m := re.search(r"first step [\d.]+ s after start: .*\bdata ([\d.]+)", line)):
            out["worker_data"] = float(m.group(1))
        if "[ftdist] step 1/" in line and "first_step" not in out:
            out["first_step"] = time.perf_counter() - t0
    if proc.wait() != 0 or "first_step" not in out:
        raise RuntimeError(f"ftdist train {spec.name} failed:\n{''.join(lines[-30:])}")
    return out


def prepare_rate(spec: JobSpec, use_ray: bool) -> tuple[float, str]:
    """Tokens per second of a cold preparation: Ray tasks on an embedded local Ray (one per core), or this process."""
    from ftdist.train.locations import load_tokenizer
    from ftdist.train.objectives import objective_for
    from ftdist.train.prepare import Runner, prepare
    from ftdist.train.ray_runtime import connect_ray, disconnect_ray

    tok = load_tokenizer(spec.model.tokenizer_path)
    started = connect_ray(None, os.cpu_count() or 1) if use_ray else False
    try:
        manifest, built = prepare(spec, tok, objective_for(spec), Runner(1, use_ray=use_ray))
    finally:
        if use_ray:
            disconnect_ray(started)
    assert built
    return manifest.data_stats().tokens / manifest.seconds, manifest.ran_on


def bench_data(tmp: str, rows: int = 200_000) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    task()
    cache = os.path.join(tmp, "prepared")
    today = first_step(data_spec(tmp, rows, "today", None), tmp)
    cold = first_step(data_spec(tmp, rows, "cold", cache), tmp)
    warm = first_step(data_spec(tmp, rows, "warm", cache), tmp)
    mem_today = rank_memory(data_spec(tmp, rows, "mem", None))
    mem_prepared = rank_memory(data_spec(tmp, rows, "mem", cache))
    one = prepare_rate(data_spec(tmp, rows, "one", os.path.join(tmp, "prep-one")), use_ray=False)
    par = prepare_rate(data_spec(tmp, rows, "par", os.path.join(tmp, "prep-ray")), use_ray=True)
    return {"rows": rows, "today": today, "cold": cold, "warm": warm, "mem_today": mem_today,
            "mem_prepared": mem_prepared, "rate_one": one[0], "rate_par": par[0], "par_on": par[1]}
