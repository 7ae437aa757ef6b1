"""`ftdist bench`: runs the chosen sections and prints one table, ftdist beside the bare libraries doing the same
work (training.py: throughput, memory, load, GPU; peak.py: the planner against measured ranks; objectives.py: DPO
against SFT on the same sequences; storage.py: checkpoints; tune.py: sweeps; observe.py: tracking and generation
metrics)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from ftdist.bench.training import (FORMULA_TEXT, GPU_LLAMA, GPU_VARIANTS, WORLD, bench_gpu, bench_load, bench_memory,
                                   bench_throughput, sum_params, usable_cores)


def _mb(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def gpu_8b_rows(tmp: str, steps: int, **kw) -> list[str]:
    """The table rows of `--only gpu-8b` (bench/gpu_8b.py), each method beside the planner's prediction."""
    from ftdist.bench.gpu_8b import NEMO_LORA_H100_TPS, bench_gpu_8b

    r = bench_gpu_8b(tmp, steps, **kw)
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    what = f"1x {r['device']}, Llama-3.1-8B shape, seq {r['seq']}, micro batch {r['micro']}"
    rows = []
    for method, label in (("lora", "LoRA r16 all-linear, ZeRO-2"), ("qlora", "QLoRA NF4 r16 all-linear, ZeRO-2"),
                          ("full-offload", "full, ZeRO-3 + optimizer on the host (CPUAdam)")):
        m = r.get(method)
        if m is None:
            continue
        if "skipped" in m:
            rows.append(f"| {label}: not run: {m['skipped']} | | | | |")
            continue
        anchor = (f"{NEMO_LORA_H100_TPS:,} (NeMo AutoModel, H100) | {m['tps'] / NEMO_LORA_H100_TPS:.3f} | >= 1.0"
                  if method in ("lora", "qlora") else " | | report")
        rows.append(f"| training tokens/s per GPU, {label}, {what} | {m['tps']:,.0f} | {anchor} |")
        rows.append(f"| peak GPU memory, {label}: measured (rank 0) / ftdist plan | {gib(m['gpu_peak'])} | "
                    f"{gib(m['planned_gpu'])} | {m['gpu_peak'] / m['planned_gpu']:.3f} | report |")
        if method == "full-offload":
            rows.append(f"| peak host memory, {label}: measured (rank 0 process) / ftdist plan (node) | "
                        f"{gib(m['host_peak'])} | {gib(m['planned_host'])} | "
                        f"{m['host_peak'] / m['planned_host']:.3f} | report |")
    return rows


def main(args: argparse.Namespace) -> int:
    parts = args.only or ["throughput", "memory", "load", "checkpoint", "tune"]
    lines = ["| measurement | ftdist | reference | ratio | goal |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="ftdist-bench-") as tmp:
        if "gpu" in parts:
            import torch

            if not torch.cuda.is_available():
                raise SystemExit("ftdist bench --only gpu: no CUDA device visible")
            variants = args.gpu_variants.split(",")
            unknown = [v for v in variants if v not in GPU_VARIANTS]
            if unknown:  # before any run, not after the first variants took their minutes
                raise SystemExit(f"ftdist bench --gpu-variants: unknown {', '.join(unknown)} (choose from "
                                 f"{', '.join(GPU_VARIANTS)})")
            for variant in variants:
                g = bench_gpu(args.steps, tmp, variant=variant, global_batch=args.gpu_global_batch)
                what = (f"1x {g['device']}, {sum_params(GPU_LLAMA) / 1e9:.2f}B Llama bf16, ZeRO-2, seq {g['seq']}, "
                        f"micro batch {g['mb']}, global batch {g['gb']}, {variant}")
                lines.append(f"| training tokens/s, {what} | {g['ftdist_tps']:.0f} | {g['bare_tps']:.0f} (bare "
                             f"DeepSpeed, no Ray) | {g['ratio']:.3f} | >= 0.95 |")
                if g["peak"]:
                    lines.append(f"| model FLOPs utilisation, {variant} ({g['flops_per_token'] / 1e9:.2f} GFLOP/token, "
                                 f"peak {g['peak'] / 1e12:.0f} TFLOP/s bf16) | {100 * g['ftdist_mfu']:.1f}% | "
                                 f"{100 * g['bare_mfu']:.1f}% (bare) | {g['ratio']:.3f} | >= 45% |")
                lines.append(f"| peak GPU memory allocated (bare loop, {variant}) | | {_mb(g['peak_mem'])} | | |")
                print("\n".join(lines[-3:]), flush=True)  # each variant's rows as soon as they are measured
        if "gpu-8b" in parts:
            import torch

            if not torch.cuda.is_available():
                raise SystemExit("ftdist bench --only gpu-8b: no CUDA device visible")
            lines.extend(gpu_8b_rows(tmp, args.steps))
            print("\n".join(lines), flush=True)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the CPU parts below
        if "throughput" in parts:
            t = bench_throughput(args.steps, tmp, args.rounds)
            each = ", ".join(f"{r:.3f}" for r in t["round_ratios"])
            lines.append(f"| training tokens/s, 2 workers ZeRO-2 ({args.steps} steps, mean of {args.rounds} "
                         f"alternating rounds: {each}) | {t['ftdist_tps']:.0f} | {t['bare_tps']:.0f} (bare DeepSpeed, "
                         f"no Ray) | {t['ratio']:.3f} | >= 0.95 |")
            if usable_cores() <= WORLD:
                # The 2 workers fill every core here, so Ray's own processes (GCS, raylet, Ray Train's controller
                # and helpers) take their CPU from the training threads. The same comparison with one worker
                # leaves them a core: what ftdist's path costs when Ray is not starved, as on any GPU node.
                t1 = bench_throughput(args.steps, tmp, args.rounds, workers=1)
                each = ", ".join(f"{r:.3f}" for r in t1["round_ratios"])
                lines.append(f"| diagnostic: the same with 1 worker, a core left for Ray's own processes (rounds: "
                             f"{each}) | {t1['ftdist_tps']:.0f} | {t1['bare_tps']:.0f} (bare DeepSpeed, 1 process) | "
                             f"{t1['ratio']:.3f} | |")
        if "memory" in parts:
            for r in bench_memory(tmp):
                lines.append(
                    f"| ZeRO-{r['stage']} model states per rank (Ψ={r['psi']:,}, N={WORLD}) | {_mb(r['measured'])} | "
                    f"{_mb(r['formula'])} ({FORMULA_TEXT[r['stage']]}, fp32) | {r['ratio']:.3f} | <= 1.05 |")
        if "peak" in parts:
            from ftdist.bench.peak import bench_peak

            for r in bench_peak(tmp):
                lines.append(f"| `ftdist plan` / measured per rank, {r['setting']}: model states "
                             f"{_mb(r['model_states_predicted'])} / {_mb(r['model_states_measured'])}; peak "
                             f"{_mb(r['peak_predicted'])} / {_mb(r['peak_measured'])} (peak RSS - baseline) "
                             f"| | | "
                             f"{r['model_states_ratio']:.3f}; {r['peak_ratio']:.3f} | [0.9, 1.1]; [0.8, 1.25] |")
        if "dpo" in parts:
            from ftdist.bench.objectives import bench_dpo

            d = bench_dpo(tmp, args.steps, args.rounds)
            (fs, fd), (ls, ld) = (d[("full", "sft")], d[("full", "dpo")]), (d[("lora", "sft")], d[("lora", "dpo")])
            each = {m: ", ".join(f"{r:.3f}" for r in d["round_ratios"][m]) for m in ("full", "lora")}
            lines.append(f"| DPO training tokens/s, full, reference precomputed, 2 workers ZeRO-2 (mean of "
                         f"{args.rounds} alternating rounds: {each['full']}) | {fd['tps']:.0f} | {fs['tps']:.0f} "
                         f"(SFT on the same sequences) | {fd['tps'] / fs['tps']:.3f} | >= 0.95 |")
            lines.append(f"| the one-off reference pass / one training epoch | {fd['reference_s']:.2f} s | "
                         f"{fd['epoch_s']:.2f} s | {fd['reference_s'] / fd['epoch_s']:.3f} | |")
            lines.append(f"| DPO training tokens/s, LoRA, reference = adapters off (rounds: {each['lora']}) | "
                         f"{ld['tps']:.0f} | {ls['tps']:.0f} (LoRA SFT, same sequences) | {ld['tps'] / ls['tps']:.3f} "
                         f"| >= 0.7 |")
            lines.append(f"| peak RSS per rank during training, full DPO / full SFT | {_mb(fd['peak'])} | "
                         f"{_mb(fs['peak'])} | {fd['peak'] / fs['peak']:.3f} | <= 1.1 |")
        if "tracking" in parts:
            from ftdist.bench.observe import bench_tracking

            for auth in (False, True):
                t = bench_tracking(tmp, args.steps, args.rounds, auth=auth)
                each = ", ".join(f"{r:.3f}" for r in t["round_ratios"])
                server = "basic auth: a password hashed per request" if auth else "no auth"
                lines.append(f"| `ftdist train` wall time, MLflow (real server, {server}) + TensorBoard on / off, "
                             f"every step logged, {args.steps} steps, 2 workers (mean of {args.rounds} alternating "
                             f"rounds: {each}) | {t['on']:.1f} s | {t['off']:.1f} s | {t['ratio']:.3f} | <= 1.02 |")
                lines.append(f"| diagnostic: the step loop's time (train_time_s), on / off | {t['loop_on']:.2f} s | "
                             f"{t['loop_off']:.2f} s | {t['loop_ratio']:.3f} | |")
                c = t["critical"]
                lines.append(f"| diagnostic: tracking requests no run can overlap (check {c['check']:.2f} s, last "
                             f"flush {c['flush']:.2f} s, close {c['close']:.2f} s) / the run off | {c['total']:.2f} s | "
                             f"{t['off']:.1f} s | {c['total'] / t['off']:.3f} | |")
            if usable_cores() <= WORLD:  # as for throughput: the same with a core left for the tracking thread
                t1 = bench_tracking(tmp, args.steps, args.rounds, workers=1, auth=False)
                each = ", ".join(f"{r:.3f}" for r in t1["round_ratios"])
                lines.append(f"| diagnostic: no auth, 1 worker, a core left for the tracking thread and Ray's own "
                             f"processes (rounds: {each}) | {t1['on']:.1f} s | {t1['off']:.1f} s | "
                             f"{t1['ratio']:.3f} | |")
        if "data" in parts:
            from ftdist.bench.data import bench_data

            d = bench_data(tmp, args.data_rows)
            today, cold, warm = d["today"], d["cold"], d["warm"]
            what = f"{d['rows']:,} prompt/completion rows, 2 workers"
            lines.append(f"| `ftdist train` to the first step, {what}: cold cache (prepared now) / today's path "
                         f"(data.cache off: the driver and every rank tokenise) | {cold['first_step']:.1f} s | "
                         f"{today['first_step']:.1f} s | {cold['first_step'] / today['first_step']:.3f} | report |")
            lines.append(f"| the same, warm cache (prepared data reused) / today's path | {warm['first_step']:.1f} s | "
                         f"{today['first_step']:.1f} s | {warm['first_step'] / today['first_step']:.3f} | <= 0.2 |")
            data_s = {k: r["driver"] + r["worker_data"] for k, r in (("today", today), ("cold", cold), ("warm", warm))}
            lines.append(f"| diagnostic: the data's own seconds on that path (driver check + the workers' data "
                         f"phase), warm / today (cold: {data_s['cold']:.1f} s) | {data_s['warm']:.1f} s | "
                         f"{data_s['today']:.1f} s | {data_s['warm'] / data_s['today']:.3f} | |")
            mp, mt = d["mem_prepared"], d["mem_today"]
            lines.append(f"| per-rank peak resident memory of the data ({what}, after 200 micro batches; prepared: "
                         f"{_mb(mp['mapped'])} of it mapped page cache) | {_mb(mp['peak'])} | {_mb(mt['peak'])} | "
                         f"{mp['peak'] / mt['peak']:.3f} | <= 0.25 |")
            lines.append(f"| diagnostic: private (anonymous) memory of the data, the part no other rank shares | "
                         f"{_mb(mp['anon'])} | {_mb(mt['anon'])} | {mp['anon'] / mt['anon']:.4f} | |")
            lines.append(f"| `ftdist data prepare` tokens/s, {d['par_on']} / one process | {d['rate_par']:,.0f} | "
                         f"{d['rate_one']:,.0f} | {d['rate_par'] / d['rate_one']:.2f} | report |")
        if "resize" in parts:
            from ftdist.bench.resize import bench_resize

            r = bench_resize(tmp)
            same, resized, c, lo = r["same"], r["resized"], r["convert"], r["lora"]
            lines.append(f"| re-run to its first step, resuming a 2-worker checkpoint on 1 worker (converted now) / on "
                         f"2 workers; split: restore {resized['restore']:.1f} s vs {same['restore']:.1f} s (conversion "
                         f"+ download + load), workers {resized['workers']:.1f} s vs {same['workers']:.1f} s, "
                         f"detection 0 (a re-run) | {resized['s']:.1f} s | {same['s']:.1f} s | "
                         f"{resized['s'] / same['s']:.3f} | <= 1.5 |")
            mbs = lambda s: f"{c['bytes'] / 2**20 / s:.1f} MiB/s"  # noqa: E731
            lines.append(f"| conversion throughput, {_mb(c['bytes'])} 2-worker ZeRO-2 checkpoint: ftdist (download, "
                         f"verify, convert, upload + manifest) / DeepSpeed's ds_to_universal alone | {mbs(c['ft_s'])} "
                         f"| {mbs(c['ds_s'])} | {c['ds_s'] / c['ft_s']:.3f} | >= 1.0 |")
            lines.append(f"| peak memory of the conversion (process tree) | {_mb(c['ft_peak'])} | {_mb(c['ds_peak'])} "
                         f"| {c['ft_peak'] / c['ds_peak']:.3f} | |")
            b, a = lo["before"], lo["after"]
            lines.append(f"| LoRA checkpoint bytes, frozen base kept / left out (rank 8, 2 workers) | {b['bytes']:,} | "
                         f"{a['bytes']:,} | {b['bytes'] / a['bytes']:.1f} | report |")
            lines.append(f"| LoRA checkpoint upload to a local SeaweedFS, kept / left out (median of 3) | "
                         f"{b['upload_s']:.3f} s | {a['upload_s']:.3f} s | {b['upload_s'] / a['upload_s']:.1f} | report |")
            rx, wx = r["export"]["ranged"], r["export"]["whole"]
            lines.append(f"| `ftdist export` of a 2-worker ZeRO-3 checkpoint from a local SeaweedFS, bytes read: "
                         f"master-weight records of the optimizer files / whole files | {rx['bytes']:,} | "
                         f"{wx['bytes']:,} | {rx['bytes'] / wx['bytes']:.3f} | report |")
            lines.append(f"| the same, seconds (median of 3) | {rx['s']:.2f} s | {wx['s']:.2f} s | "
                         f"{rx['s'] / wx['s']:.3f} | report |")
        if "elastic" in parts:
            from ftdist.bench.elastic import bench_elastic

            e = bench_elastic()
            lost, same = e["lost"], e["same"]
            lines.append(f"| a node lost, to the first step on fewer workers: an elastic job 2 -> 1 worker (converted "
                         f"now) / a same-size restart after a worker is killed (2 -> 2); split: detection "
                         f"{lost['detection']:.1f} s vs {same['detection']:.1f} s, the new group's start "
                         f"{lost['start']:.1f} s vs {same['start']:.1f} s, conversion + load {lost['restore']:.1f} s vs "
                         f"{same['restore']:.1f} s | {lost['s']:.1f} s | {same['s']:.1f} s | "
                         f"{lost['s'] / same['s']:.3f} | <= 1.5 |")
            own, same_own = lost["start"] + lost["restore"], same["start"] + same["restore"]
            lines.append(f"| diagnostic: ftdist's part, the new group's start to its first step (conversion + load "
                         f"included) / the same-size restart's; the rest of the gap is Ray noticing the lost node "
                         f"(its health check) | {own:.1f} s | {same_own:.1f} s | {own / same_own:.3f} | <= 1.5 |")
        if "generate" in parts:
            from ftdist.bench.observe import bench_generation

            g = bench_generation()
            lines.append(f"| eval.generate: seconds per 100 held-out prompts, greedy, {g['tokens']} new tokens, "
                         f"batches of {g['batch']} / one at a time ({g['same']}/{g['n']} outputs identical) | "
                         f"{g['batched_s']:.2f} s | {g['single_s']:.2f} s | {g['ratio']:.3f} | report |")
        if "load" in parts:
            for r in bench_load(tmp):
                lines.append(f"| peak RSS of a rank while loading {r['params'] / 1e6:.0f}M params, ZeRO-3, N={WORLD} | "
                             f"{_mb(r['peak'])} | {_mb(r['model_bytes'])} (full model, fp32) | {r['ratio']:.3f} | < 1 |")
        if "checkpoint" in parts:
            from ftdist.bench.storage import run as bench_checkpoint

            bench_checkpoint(lines, args.ckpt_mb, args.s3_bucket)
        if "tune" in parts:
            from ftdist.bench.tune import run as bench_tune

            bench_tune(lines, tmp)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(lines, fh)
    return 0
