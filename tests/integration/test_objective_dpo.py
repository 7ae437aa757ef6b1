"""`objective: dpo` through the real loop (Ray Train + DeepSpeed on gloo, 2 workers): full fine-tuning under ZeRO-3
with the reference log-probabilities precomputed (and reused, not recomputed, on resume), LoRA under ZeRO-2 with the
adapters-off reference; both resume at the exact step with the uninterrupted run's losses, and the export,
re-evaluated outside ftdist (transformers/peft and the DPO formula written out), gives the eval metrics the run
reported."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ftdist.spec import spec_from_dict
from ftdist.train.driver import run_training
from ftdist.train.objectives.reference import REFERENCE_FILE
from tests.conftest import QS, TINY_LLAMA, tiny_job_dict

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed]

BETA = 0.5
SETTINGS = {
    "full-zero3": {"method": "full", "zero": {"stage": 3}},
    "lora-zero2": {"method": "lora", "zero": {"stage": 2}, "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}},
}


def _job(tmp_path: Path, name: str, setting: dict, steps: int) -> dict:
    eval_pairs = tmp_path / "eval_pairs.jsonl"
    if not eval_pairs.exists():  # 32 held-out pairs: evaluated whole, so the re-evaluation below sees the same set
        eval_pairs.write_text("".join((QS / "eval_pairs.jsonl").read_text().splitlines(keepends=True)[:32]))
    return tiny_job_dict(str(tmp_path / "store"), name=name, objective="dpo", dpo={"beta": BETA},
                         data={"train": str(QS / "train_pairs.jsonl"), "eval": str(eval_pairs),
                               "format": "prompt_completion", "max_length": 48},
                         optim={**tiny_job_dict("x")["optim"], "max_steps": steps},
                         eval={"max_batches": None}, checkpoint={"every_n_steps": 3, "keep_last": 3}, **setting)


def _run(job: dict):
    spec = spec_from_dict(job)
    summary = run_training(spec)
    assert summary.error is None, summary.error
    return spec, summary


def _losses(history):
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.parametrize("setting", list(SETTINGS), ids=list(SETTINGS))
def test_dpo_trains_resumes_exactly_and_exports(ray_cluster, tmp_path, setting):
    _, full = _run(_job(tmp_path, "whole", SETTINGS[setting], 6))
    losses = _losses(full.history)
    # Step 1's policy is the reference: every pair's loss is exactly ln 2 (and its rewards 0).
    assert sorted(losses) == list(range(1, 7)) and losses[1] == pytest.approx(0.693147, abs=1e-5), losses
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy"} <= set(full.metrics)
    evals = [h for h in full.history if "eval_preference_accuracy" in h]
    # The updates reach the held-out pairs (the policy left the reference: loss off ln 2, a margin). Whether DPO
    # *learns* is the quickstart end-to-end test's (a pre-trained model, accuracy 0.97): this random-init model
    # cannot tell near-miss spellings apart in 6 steps, and its held-out loss drifts either way with the sample order
    # (measured 2026-12-03: up for 3 of 3 seeds at lr 1e-4..3e-3 over 6-12 steps; for 1 of 3 with the earlier order).
    assert evals[0]["step"] == 0 and evals[0]["eval_loss"] == pytest.approx(0.693147, abs=1e-5), evals
    assert abs(evals[-1]["eval_loss"] - evals[0]["eval_loss"]) > 1e-3 and evals[-1]["eval_reward_margin"] != 0.0

    store = tmp_path / "store"
    precomputed = SETTINGS[setting]["method"] != "lora"
    assert (store / "whole" / REFERENCE_FILE).exists() == precomputed
    # The run stopped after its step-3 checkpoint: a new attempt resumes there (a copy of the committed folder, and
    # of the run folder's reference log-probabilities).
    shutil.copytree(store / "whole" / "step_00000003", store / "resumed" / "step_00000003")
    stored = store / "resumed" / REFERENCE_FILE
    if precomputed:
        shutil.copy(store / "whole" / REFERENCE_FILE, stored)
        before = stored.stat().st_mtime_ns
    _, rest = _run(_job(tmp_path, "resumed", SETTINGS[setting], 6))
    assert rest.state.resumes == [3]
    if precomputed:  # the pass did not run again: rank 0 rewrites the file whenever it runs
        assert stored.stat().st_mtime_ns == before
    a, b = losses, _losses(rest.history)
    for step in range(4, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    for key in ("eval_loss", "eval_preference_accuracy", "eval_reward_margin"):
        assert rest.metrics[key] == pytest.approx(full.metrics[key], rel=1e-5, abs=1e-6), key

    reevaluated = _reevaluate(full, tmp_path / "store" / "whole", precomputed)
    for key, value in reevaluated.items():
        assert value == pytest.approx(full.metrics[key], rel=1e-4, abs=1e-5), (key, value, full.metrics[key])


def _reevaluate(summary, run_dir: Path, precomputed: bool) -> dict:
    """The export's eval metrics computed with transformers (and peft) alone: completion log-probabilities summed
    over the labelled tokens, DPO's loss -log sigmoid(beta x margin of log-ratios), preference accuracy."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(summary.export_dir if precomputed else Path(summary.export_dir) / "adapter")
    if precomputed:
        policy = AutoModelForCausalLM.from_pretrained(summary.export_dir).eval()
        reference = json.loads((run_dir / REFERENCE_FILE).read_text())["eval"]
    else:
        from peft import PeftModel

        cfg = dict(TINY_LLAMA)
        torch.manual_seed(0)  # ftdist's seeded init of a from_config base (ZeRO-2)
        base = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        policy = PeftModel.from_pretrained(base, os.path.join(summary.export_dir, "adapter")).eval()
        reference = None
    rows = [json.loads(line) for line in (run_dir.parent.parent / "eval_pairs.jsonl").read_text().splitlines()]

    def logp(model, prompt: str, completion: str) -> float:
        head = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([head + tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        picked = logps.gather(-1, ids[0, 1:, None])[:, 0]
        return picked[len(head) - 1:].sum().item()

    losses, right, margins = [], 0, []
    for i, r in enumerate(rows):
        pc, pr = logp(policy, r["prompt"], r["chosen"]), logp(policy, r["prompt"], r["rejected"])
        if precomputed:
            rc, rr = reference[i]
        else:
            with policy.disable_adapter():
                rc, rr = logp(policy, r["prompt"], r["chosen"]), logp(policy, r["prompt"], r["rejected"])
        margin = BETA * ((pc - rc) - (pr - rr))
        losses.append(F.softplus(torch.tensor(-margin)).item())
        right += margin > 0
        margins.append(margin)
    n = len(rows)
    return {"eval_loss": sum(losses) / n, "eval_preference_accuracy": right / n, "eval_reward_margin": sum(margins) / n}
