"""GPU runs (NCCL, bf16) of the same code path the CPU tests exercise. They need a CUDA device and skip without one,
so CI on CPU skips them; run them on a GPU machine with `pytest -m gpu` (see README, "GPU")."""

from __future__ import annotations

import os

import pytest
import torch

from ftdist.spec import spec_from_dict
from ftdist.train.driver import run_training
from tests.conftest import base_model_section, tiny_job_dict

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
    # tokens/s x step time = the tokens of one optimizer step (attention-mask tokens of the global batch).
    per_step = [h["tokens_per_s"] * h["step_time_s"] for h in s.history if "tokens_per_s" in h]
    assert per_step and all(32 * 4 <= n <= 32 * job["data"]["max_length"] * (1 + 1e-6) for n in per_step), per_step
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


@pytest.mark.parametrize("stage", [2, 3])
def test_qlora_bf16_on_gpu_trains_and_exports(tmp_path, base_model_dir, stage):
    """QLoRA on CUDA (bitsandbytes' GPU kernels; the CPU tests run its CPU backend): ZeRO-2 replicates the 4-bit
    base, ZeRO-3 partitions it (stored in bf16 tensors). The adapter and the merged 16-bit model export."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: pip install 'ftdist[qlora]'")
    s = _gpu_run(tmp_path, f"gpu-qlora-{stage}", method="lora", zero={"stage": stage},
                 model=base_model_section(base_model_dir),
                 lora={"rank": 8, "alpha": 16, "dropout": 0.0, "quantize": "nf4", "merge_on_export": True},
                 optim={**tiny_job_dict("x")["optim"], "lr": 1e-2})
    assert os.path.isfile(os.path.join(s.export_dir, "adapter", "adapter_model.safetensors"))
    _generates_on_gpu(os.path.join(s.export_dir, "merged"))


@pytest.mark.parametrize("stage", [2, 3])
def test_liger_kernels_compute_the_same_loss_and_gradients(tmp_path, monkeypatch, stage):
    """Liger's kernels in place of RMSNorm, rotary, SwiGLU and the loss (fused linear + cross-entropy at ZeRO-2, the
    plain cross-entropy kernel at ZeRO-3) give the model's own loss and gradients, to bf16 rounding."""
    pytest.importorskip("liger_kernel", reason="liger-kernel not installed: pip install 'ftdist[gpu]'")
    from transformers.models.llama import modeling_llama

    from ftdist.train.modeling import apply_kernels, load_model

    # Liger also patches module globals; put them back afterwards so later tests build the stock model.
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", torch.nn.functional.cross_entropy)

    job = tiny_job_dict(str(tmp_path))
    job["model"].update(dtype="bf16", use_liger_kernel=True)
    job["resources"] = {"num_workers": 1, "cpus_per_worker": 2, "gpus_per_worker": 1}
    job["zero"] = {"stage": stage}
    spec = spec_from_dict(job)
    torch.manual_seed(3)
    ids = torch.randint(3, spec.model.from_config["vocab_size"], (4, 64), device="cuda")
    labels = ids.clone()
    labels[:, :16] = -100  # prompt tokens carry no loss

    def loss_and_grads(model):
        model = model.cuda()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.float(), {n: p.grad.float() for n, p in model.named_parameters()}

    ref_loss, ref_grads = loss_and_grads(load_model(spec.model, None, None))
    model = apply_kernels(load_model(spec.model, None, None), spec)
    assert model.model.norm.forward.__func__.__module__.startswith("liger_kernel")
    loss, grads = loss_and_grads(model)
    assert torch.isfinite(loss) and abs(loss - ref_loss) / ref_loss < 1e-2, (loss, ref_loss)
    for n, g in ref_grads.items():
        rel = (grads[n] - g).norm() / g.norm().clamp(min=1e-12)
        assert rel < 5e-2, (n, rel.item())


def test_lora_with_liger_kernels_trains_on_gpu(tmp_path):
    pytest.importorskip("liger_kernel", reason="liger-kernel not installed: pip install 'ftdist[gpu]'")
    s = _gpu_run(tmp_path, "gpu-lora-liger", method="lora",
                 lora={"rank": 8, "alpha": 16, "dropout": 0.0},
                 optim={**tiny_job_dict("x")["optim"], "lr": 1e-2})
    assert os.path.isfile(os.path.join(s.export_dir, "adapter", "adapter_model.safetensors"))
