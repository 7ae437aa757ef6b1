"""GPU runs (NCCL, bf16) of the same code path the CPU tests exercise. They need a CUDA device and skip without one,
so CI on CPU skips them; run them on a GPU machine with `pytest -m gpu` (see README, "GPU")."""

from __future__ import annotations

import os

import pytest
import torch

from ftdist.config import spec_from_dict
from ftdist.driver import run_training
from tests.conftest import tiny_job_dict

pytestmark = [
    pytest.mark.gpu, pytest.mark.ray, pytest.mark.deepspeed,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: GPU tests run on a GPU machine"),
]


def _gpu_run(tmp_path, name, **sections):
    job = tiny_job_dict(str(tmp_path / "store"), name=name, **sections)
    job["model"]["dtype"] = "bf16"
    job["resources"] = {"num_workers": 1, "cpus_per_worker": 2, "gpus_per_worker": 1, "max_failures": 0}
    job["optim"] = {**job["optim"], "micro_batch_size": 16, "global_batch_size": 32, "max_steps": 30}
    job["checkpoint"] = {**job["checkpoint"], "every_n_steps": 15}
    job["logging"] = {"every_n_steps": 5}
    s = run_training(spec_from_dict(job))
    assert s.error is None, s.error
    losses = {h["step"]: h["loss"] for h in s.history if "loss" in h}
    assert losses[30] < losses[5] - 0.2, losses
    assert all(h["tokens_per_s"] > 0 for h in s.history if "tokens_per_s" in h)
    return s


def _generates_on_gpu(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    x = tok("Write 77 in words:", return_tensors="pt").to("cuda")
    out = model.generate(**x, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > x["input_ids"].shape[1]
    return model


@pytest.mark.parametrize("stage", [2, 3])
def test_full_bf16_on_gpu_trains_and_exports(tmp_path, stage):
    s = _gpu_run(tmp_path, f"gpu-full-{stage}", zero={"stage": stage})
    assert os.path.isfile(os.path.join(s.export_dir, "model.safetensors"))
    model = _generates_on_gpu(s.export_dir)
    assert model.dtype == torch.bfloat16


def test_lora_bf16_on_gpu_merged_export(tmp_path):
    s = _gpu_run(tmp_path, "gpu-lora", method="lora",
                 lora={"rank": 8, "alpha": 16, "dropout": 0.0, "merge_on_export": True},
                 optim={**tiny_job_dict("x")["optim"], "lr": 1e-2})
    assert os.path.isfile(os.path.join(s.export_dir, "adapter", "adapter_model.safetensors"))
    _generates_on_gpu(os.path.join(s.export_dir, "merged"))
