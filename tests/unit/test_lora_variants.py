"""DoRA, rsLoRA and QLoRA without Ray: the job file's rules (one line each), what the adapters become in peft, and
the export's DoRA merge and adapter naming against peft's own."""

from __future__ import annotations

import pytest
import torch

from ftdist.spec import spec_from_dict
from tests.conftest import TINY_LLAMA, tiny_job_dict

BASE = {"name_or_path": "/models/base", "from_config": None, "tokenizer": None}


@pytest.mark.parametrize("change, message", [
    ({"method": "lora", "lora": {"use_dora": True}, "zero": {"stage": 3}},
     r"^ftdist: .*lora.use_dora runs under zero.stage 0, 1 or 2: peft's DoRA reads each base weight outside"),
    ({"method": "lora", "lora": {"quantize": "nf4"}},
     r"^ftdist: .*lora.quantize .*needs model.name_or_path"),
    ({"method": "lora", "lora": {"quantize": "int4"}},
     r"^ftdist: .*lora.quantize.*'nf4' or 'fp4'"),
    ({"method": "lora", "lora": {"use_dora": "sometimes"}}, r"^ftdist: .*lora.use_dora"),
])
def test_bad_lora_variants_are_one_line(validate_refuses, change, message):
    validate_refuses(change, message)


def test_qlora_under_zero3_stores_the_4bit_weights_in_the_compute_dtype():
    """DeepSpeed partitions and gathers tensors of the model's dtype; bitsandbytes' uint8 storage stays for ZeRO
    0-2, where the 4-bit base is replicated."""
    from ftdist.train.modeling import four_bit_config

    spec = spec_from_dict(tiny_job_dict("/tmp/x", method="lora", lora={"quantize": "nf4"}, zero={"stage": 3},
                                        model={**BASE, "dtype": "bf16"}))
    assert four_bit_config(spec.lora, torch.bfloat16, zero3=True).bnb_4bit_quant_storage == torch.bfloat16
    assert four_bit_config(spec.lora, torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


def test_a_4bit_model_trains_after_an_evaluation(tmp_path):
    """bitsandbytes repacks a 4-bit layer in place for CPU inference the first time it runs in eval mode without
    gradients (CPUs with AVX512-BF16, as these hosts); a repacked layer then computes the training forward with a
    kernel autograd does not see through, so the adapters below it got wrong gradients (and under DeepSpeed the
    step failed). Models ftdist trains keep their layout: after an evaluation, the same gradients as without."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftdist.train.modeling import apply_method, load_model

    cfg = dict(TINY_LLAMA)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(tmp_path / "b")
    spec = spec_from_dict(tiny_job_dict(str(tmp_path), method="lora", lora={"quantize": "nf4"},
                                        model={"name_or_path": str(tmp_path / "b"), "from_config": None,
                                               "tokenizer": None, "dtype": "fp32"}))
    x = torch.tensor([[1, 5, 9, 22, 40, 7, 3, 12]])

    def gradients(evaluate_first: bool) -> dict:
        model = apply_method(load_model(spec.model, spec.model.name_or_path, None, lora=spec.lora), spec)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=x)
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}

    plain, after_eval = gradients(False), gradients(True)
    assert plain and plain.keys() == after_eval.keys()
    for name, g in plain.items():
        torch.testing.assert_close(after_eval[name], g, msg=name)


def _peft_model(tmp_path, **lora):
    from ftdist.train.modeling import apply_method, load_model

    spec = spec_from_dict(tiny_job_dict(str(tmp_path), method="lora", lora={"rank": 4, "alpha": 8, **lora}))
    return apply_method(load_model(spec.model, None, None), spec)


def test_dora_and_rslora_reach_peft(tmp_path):
    model = _peft_model(tmp_path, use_dora=True, use_rslora=True)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(rank)
    assert "default" in q.lora_magnitude_vector and q.lora_magnitude_vector["default"].weight.requires_grad
    plain = _peft_model(tmp_path).base_model.model.model.layers[0].self_attn.q_proj
    assert plain.scaling["default"] == 2.0 and not plain.lora_magnitude_vector


def _trained(model) -> None:
    """Adapters as after training: B and DoRA's magnitudes moved off their starting values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("lora", [{"use_dora": True, "use_rslora": True}, {"use_dora": True}, {"use_rslora": True}],
                         ids=["dora-rslora", "dora", "rslora"])
def test_the_export_merges_and_names_adapters_as_peft_does(tmp_path, lora):
    from peft import get_peft_model_state_dict

    from ftdist.train.export import adapter_only, merged_lora

    model = _peft_model(tmp_path, dropout=0.0, **lora).eval()
    _trained(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def read(want=lambda n: True):
        return ((k, v) for k, v in state.items() if want(k))

    adapter_cfg = model.peft_config["default"].to_dict()
    merged = dict(merged_lora(read, adapter_cfg))
    named = dict(adapter_only(read(want=lambda n: ".lora_" in n)))
    assert set(named) == set(get_peft_model_state_dict(model))
    x = torch.tensor([[1, 5, 9, 22, 40, 7]])
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        reference = model.merge_and_unload()
        torch.testing.assert_close(merged, reference.state_dict(), rtol=1e-5, atol=1e-6)
        assert TINY_LLAMA["model_type"] == reference.config.model_type
        torch.testing.assert_close(reference(input_ids=x).logits, adapted, rtol=1e-4, atol=1e-5)

