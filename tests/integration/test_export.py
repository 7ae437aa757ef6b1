"""`ftdist export` from committed checkpoints in S3 (SeaweedFS) and `ftdist checkpoints`: the exported folder
loads with transformers/peft and matches the end-of-job export; --interpolate 0 is the base, 1 the fine-tuned."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ftdist.spec import spec_from_dict
from ftdist.storage.checkpoints import CheckpointStore
from ftdist.train.driver import run_training
from tests.conftest import REPO, base_model_section, tiny_job_dict
from tests.support.faultproxy import FaultProxy

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.s3]


def _cli(*args, env=None):
    r = subprocess.run([sys.executable, "-m", "ftdist.cli", *args], capture_output=True, text=True, cwd=REPO,
                       timeout=600, env=None if env is None else {**os.environ, **env})
    return r


def _download(s3_server, uri: str, dest) -> str:
    c = s3_server.client()
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            p = os.path.join(dest, o["Key"][len(prefix) + 1:])
            os.makedirs(os.path.dirname(p), exist_ok=True)
            c.download_file(bucket, o["Key"], p)
    return str(dest)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_export_full_zero3_checkpoint_and_interpolate(ray_cluster, bucket, s3_server, base_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    storage = f"s3://{bucket}/runs"
    spec = spec_from_dict(tiny_job_dict(storage, name="fullz3", zero={"stage": 3},
                                        model=base_model_section(base_model_dir),
                                        checkpoint={"every_n_steps": 4}, export={"max_shard_size": "200KiB"}))
    s = run_training(spec)
    assert s.error is None, s.error

    manifest = CheckpointStore(f"{storage}/fullz3").read_manifest("step_00000008")
    listing = _cli("checkpoints", f"{storage}/fullz3", "--verify")
    assert listing.returncode == 0, listing.stderr
    assert "step_00000004" in listing.stdout and "step_00000008" in listing.stdout
    assert "step_00000008: verified (sizes and hashes" in listing.stdout

    ckpt = f"{storage}/fullz3/step_00000008"
    outs = {}
    # The plain export, and the WiSE-FT interpolations 0, 1 and 0.5 from one download (`--interpolate a,b,c`).
    for label, extra in {"plain": [], "curve": ["--interpolate", "0,1,0.5"]}.items():
        with FaultProxy(s3_server.endpoint) as proxy:  # no faults: it counts what the export reads
            r = _cli("export", ckpt, "--to", f"{storage}/exports/{label}", "--max-shard-size", "200KB", *extra,
                     env={"AWS_ENDPOINT_URL": proxy.endpoint})
        assert r.returncode == 0, r.stderr
        outs[label] = _download(s3_server, f"{storage}/exports/{label}", tmp_path / label)
        # Of each rank's optimizer file, only the pickle and the fp32 master weights are read (ranged GETs), not
        # the Adam moments: at most a third of its bytes, and never the whole object.
        optim_gets = [(rng, n) for method, path, rng, n in proxy.log
                      if method == "GET" and path.split("?")[0].endswith("optim_states.pt")]
        assert optim_gets and all(rng is not None for rng, _ in optim_gets), optim_gets
        optim_bytes = sum(f.size for f in manifest.files if f.path.endswith("optim_states.pt"))
        assert sum(n for _, n in optim_gets) < 0.35 * optim_bytes, (sum(n for _, n in optim_gets), optim_bytes)
    assert os.path.exists(os.path.join(outs["plain"], "model.safetensors.index.json"))  # sharded at 200KB
    assert os.path.exists(os.path.join(outs["plain"], "tokenizer.json"))

    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)  # noqa: E731
    eoj = _download(s3_server, s.export_dir, tmp_path / "eoj")
    # The end-of-job export (and `ftdist export` without --max-shard-size) follow the job's export.max_shard_size.
    index = json.loads((tmp_path / "eoj" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all(os.path.getsize(tmp_path / "eoj" / f) <= 200 * 1024 + 2048 for f in shards)
    end_of_job = _weights(load(eoj))
    plain = _weights(load(outs["plain"]))
    a0, a1, a05 = (_weights(load(os.path.join(outs["curve"], f"alpha_{a}"))) for a in ("0", "1", "0.5"))
    base = _weights(load(base_model_dir))
    # Independent reference: DeepSpeed's own zero_to_fp32 on the final checkpoint's files (whole model in memory,
    # fine for a test): ftdist's streamed stitching must give exactly its weights.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    local = tmp_path / "final-ckpt"
    CheckpointStore(f"{storage}/fullz3").fetch_all("step_00000008", str(local))
    tag = json.loads((local / "ftdist_state.json").read_text())["tag"]
    reference = get_fp32_state_dict_from_zero_checkpoint(str(local), tag=tag)
    assert s.checkpoint == ckpt
    for k in base:
        torch.testing.assert_close(plain[k], reference[k], rtol=0, atol=0)
        torch.testing.assert_close(end_of_job[k], plain[k])  # the end-of-job export is streamed the same way
        torch.testing.assert_close(a1[k], plain[k])
        torch.testing.assert_close(a0[k], base[k])
        torch.testing.assert_close(a05[k], (base[k] + plain[k]) / 2, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(plain[k], base[k]) for k in base)  # it did train

    bad = _cli("export", f"{storage}/fullz3/step_00000005", "--to", str(tmp_path / "x"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    bad = _cli("export", ckpt, "--to", str(tmp_path / "x"), "--interpolate", "1.5")
    assert bad.returncode == 2 and "--interpolate" in bad.stderr


def test_export_lora_checkpoint_adapter_and_merged(ray_cluster, bucket, s3_server, base_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    storage = f"s3://{bucket}/runs"
    spec = spec_from_dict(tiny_job_dict(storage, name="lora2", method="lora",
                                        lora={"rank": 4, "alpha": 8, "dropout": 0.0, "merge_on_export": True},
                                        model=base_model_section(base_model_dir),
                                        optim={**tiny_job_dict("x")["optim"], "lr": 1e-2}))
    s = run_training(spec)
    assert s.error is None, s.error
    losses = {h["step"]: h["loss"] for h in s.history if "loss" in h}  # LoRA under ZeRO-2 learns
    assert (losses[7] + losses[8]) / 2 < (losses[1] + losses[2]) / 2 - 0.1, losses
    r = _cli("export", f"{storage}/lora2/step_00000008", "--to", f"{storage}/exports/lora")
    assert r.returncode == 0, r.stderr
    out = _download(s3_server, f"{storage}/exports/lora", tmp_path / "lora")
    eoj = _download(s3_server, s.export_dir, tmp_path / "eoj")

    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged"), dtype=torch.float32)
    merged_eoj = AutoModelForCausalLM.from_pretrained(os.path.join(eoj, "merged"), dtype=torch.float32)
    for k, v in _weights(merged_eoj).items():
        torch.testing.assert_close(_weights(merged)[k], v)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    x = torch.tensor([[1, 5, 9, 22, 40, 7]])
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(x).logits, merged.eval()(x).logits, rtol=1e-4, atol=1e-4)
