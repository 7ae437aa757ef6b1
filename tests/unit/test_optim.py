"""The optimiser side of a worker: the LR schedule against transformers' own schedules on the same settings, AdamW
parameter groups, and the epochs-to-steps path."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from ftdist.spec import spec_from_dict
from ftdist.train.optim import lr_lambda, param_groups, total_steps
from tests.conftest import TINY_LLAMA, tiny_job_dict

WARMUP, TOTAL = 10, 100


def _spec(schedule: str, **optim):
    job = tiny_job_dict("/tmp/unused")
    job["optim"].update(schedule=schedule, warmup_steps=WARMUP, max_steps=TOTAL, **optim)
    return spec_from_dict(job)


@pytest.mark.parametrize("schedule, reference", [("cosine", get_cosine_schedule_with_warmup),
                                                 ("linear", get_linear_schedule_with_warmup)])
def test_schedule_matches_transformers_after_warmup(schedule, reference):
    ours = lr_lambda(_spec(schedule), TOTAL)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    theirs = reference(opt, WARMUP, TOTAL)
    for step in range(TOTAL):
        want = theirs.get_last_lr()[0]
        if step >= WARMUP:
            assert ours(step) == pytest.approx(want, abs=1e-12), step
        else:  # linear warmup too, shifted by one so that step 0 already trains: (step + 1) / (warmup + 1)
            assert ours(step) == pytest.approx((step + 1) / (WARMUP + 1))
        opt.step()
        theirs.step()
    assert ours(TOTAL - 1) < ours(WARMUP) == pytest.approx(1.0)


def test_min_lr_ratio_and_constant():
    floor = lr_lambda(_spec("cosine", min_lr_ratio=0.1), TOTAL)
    assert floor(TOTAL) == pytest.approx(0.1) and floor(WARMUP) == pytest.approx(1.0)
    const = lr_lambda(_spec("constant"), TOTAL)
    assert [const(s) for s in (WARMUP, 50, TOTAL)] == [1.0, 1.0, 1.0]


def test_param_groups_exclude_1d_tensors_from_weight_decay():
    cfg = dict(TINY_LLAMA)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    model.model.embed_tokens.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    assert all(p is not model.model.embed_tokens.weight for p in decay["params"])  # frozen: in no group
    norms = sum(1 for n, p in model.named_parameters() if "norm" in n)
    assert len(no_decay["params"]) == norms  # Llama has no biases: the 1-D tensors are the RMSNorm weights


def test_epochs_to_steps():
    job = tiny_job_dict("/tmp/unused")
    job["optim"].pop("max_steps")
    job["optim"]["epochs"] = 1.5
    assert total_steps(spec_from_dict(job), steps_per_epoch=7) == 11  # a partial epoch rounds up
    assert total_steps(_spec("constant"), steps_per_epoch=7) == TOTAL
