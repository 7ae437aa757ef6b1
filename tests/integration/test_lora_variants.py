"""QLoRA, DoRA and rsLoRA through the real loop (Ray Train + DeepSpeed ZeRO-2 on gloo, 2 workers), in one job: the
saved base's linears loaded in 4-bit NF4 by bitsandbytes (its CPU backend runs 4-bit layers forward and backward),
DoRA adapters scaled the rsLoRA way. The loss falls; a new attempt resumes from the step-3 checkpoint with the
uninterrupted run's losses; the adapter loads with peft on the 4-bit base and on the full-precision base (no adapter
key missing or left over), and the merged export's logits equal the adapter's on the full-precision base. Then QLoRA
under ZeRO-3, the 4-bit base partitioned over the workers: the same losses as under ZeRO-2, and it resumes exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ftdist.spec import spec_from_dict
from ftdist.train.driver import run_training
from ftdist.train.export import export_checkpoint
from tests.conftest import base_model_section, tiny_job_dict

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed]

LORA = {"rank": 8, "alpha": 16, "dropout": 0.05, "use_dora": True, "use_rslora": True, "quantize": "nf4",
        "merge_on_export": True}


def _run(tmp_path, base_dir: str, name: str):
    job = tiny_job_dict(str(tmp_path / "store"), name=name, method="lora", lora=LORA,
                        model=base_model_section(base_dir), optim={**tiny_job_dict("x")["optim"], "max_steps": 6},
                        checkpoint={"every_n_steps": 3, "keep_last": 3})
    summary = run_training(spec_from_dict(job))
    assert summary.error is None, summary.error
    return summary


def _losses(history) -> dict:
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_qlora_dora_rslora_trains_resumes_exactly_and_exports(ray_cluster, base_model_dir, tmp_path):
    from peft import PeftModel, load_peft_weights, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    whole = _run(tmp_path, base_model_dir, "whole")
    losses = _losses(whole.history)
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1] - 0.1, losses
    store = tmp_path / "store"
    manifest = json.loads((store / "whole" / "step_00000006" / "ftdist_manifest.json").read_text())
    assert manifest["frozen_excluded"], manifest  # the 4-bit base is not in the checkpoint: it reloads from the base

    shutil.copytree(store / "whole" / "step_00000003", store / "resumed" / "step_00000003")
    resumed = _run(tmp_path, base_model_dir, "resumed")
    assert resumed.state.resumes == [3]
    again = _losses(resumed.history)
    for step in range(4, 7):  # same process layout and sample order; LoRA dropout's RNG restored with the rest
        assert again[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6), (step, losses, again)

    adapter, merged_dir = store / "whole" / "export" / "adapter", store / "whole" / "export" / "merged"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"] and config["r"] == 8, config
    assert not (adapter / "frozen.json").exists()

    x = torch.tensor([[1, 5, 9, 22, 40, 7, 3, 12]])
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    on_base = PeftModel.from_pretrained(base, str(adapter)).eval()
    incompatible = set_peft_model_state_dict(on_base, load_peft_weights(str(adapter)))
    assert not [k for k in incompatible.missing_keys if "lora_" in k] and not incompatible.unexpected_keys
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        adapted = on_base(x).logits
        # fp32 throughout: the merge (W + s B A, rows rescaled to DoRA's magnitudes) differs from the adapter's
        # forward only in summation order.
        torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-4, atol=1e-4)
        with on_base.disable_adapter():  # (peft put the adapter into `base` itself)
            assert (adapted - on_base(x).logits).abs().max() > 1e-3  # the adapter changes the model

    # WiSE-FT scales an adapter's B; a DoRA adapter's magnitudes renormalise that away: refused in one line.
    with pytest.raises(ValueError, match="a DoRA adapter cannot carry the interpolation"):
        export_checkpoint(str(store / "whole" / "step_00000006"), str(tmp_path / "wise"), interpolate=0.5)
    assert not (tmp_path / "wise").exists()

    four_bit = AutoModelForCausalLM.from_pretrained(
        base_model_dir, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    on_four_bit = PeftModel.from_pretrained(four_bit, str(adapter)).eval()
    with torch.no_grad():
        logits = on_four_bit(x).logits
    # The model the adapter trained with: 4-bit weights, so near the full-precision base's logits, not equal.
    assert torch.isfinite(logits).all() and (logits - adapted).abs().max() < 0.5 * adapted.abs().max()


def test_qlora_under_zero3_trains_as_zero2_and_resumes(ray_cluster, base_model_dir, tmp_path):
    """An evaluation every 2 steps between the training steps (bitsandbytes' CPU inference repacking must not leak
    into training; under ZeRO-3 it silently stopped the learning). ZeRO-2 and ZeRO-3 run the same seeds, samples and
    dropout masks: their losses differ only in the order gradients are reduced (float32)."""
    lora = {"rank": 8, "alpha": 16, "dropout": 0.05, "use_rslora": True, "quantize": "nf4"}

    def run(name: str, stage: int):
        job = tiny_job_dict(str(tmp_path / "store"), name=name, method="lora", lora=lora, zero={"stage": stage},
                            model=base_model_section(base_model_dir), optim={**tiny_job_dict("x")["optim"],
                                                                             "max_steps": 4},
                            checkpoint={"every_n_steps": 2, "keep_last": 3}, eval={"every_n_steps": 2,
                                                                                   "max_batches": 2},
                            export={"enabled": False})
        summary = run_training(spec_from_dict(job))
        assert summary.error is None, summary.error
        return summary

    def evals(history) -> dict:
        return {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}

    z3, z2 = run("z3", 3), run("z2", 2)
    l3, l2 = _losses(z3.history), _losses(z2.history)
    assert sorted(l3) == [1, 2, 3, 4] and l3[4] < l3[1], l3
    for step in l2:
        assert l3[step] == pytest.approx(l2[step], rel=1e-5), (step, l2, l3)
    e3, e2 = evals(z3.history), evals(z2.history)
    assert sorted(e3) == [0, 2, 4] and all(e3[k] == pytest.approx(e2[k], rel=1e-5) for k in e2), (e2, e3)

    store = tmp_path / "store"
    shutil.copytree(store / "z3" / "step_00000002", store / "z3-resumed" / "step_00000002")
    resumed = run("z3-resumed", 3)
    assert resumed.state.resumes == [2]
    again = _losses(resumed.history)
    for step in (3, 4):
        assert again[step] == pytest.approx(l3[step], rel=1e-5, abs=1e-6), (step, l3, again)
