"""Resuming on another number of workers (train/universal.py), with real Ray Train and DeepSpeed on gloo: a checkpoint
written by 2 workers continues on 3 and on 1, converted once to DeepSpeed's universal format and stored beside it;
the run's losses are the uninterrupted 2-worker run's."""

from __future__ import annotations

import glob
import os
import shutil

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from ftdist.spec import spec_from_dict
from ftdist.storage.checkpoints import MANIFEST, CheckpointStore
from ftdist.train.driver import run_training
from ftdist.train.universal import UNIVERSAL
from tests.conftest import base_model_section, tiny_job_dict

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]

# Global batch 24 = micro 4 x 2 workers x 3 = 4 x 3 x 2 = 4 x 1 x 6: every world size here keeps it.
OPTIM = {**tiny_job_dict("x")["optim"], "micro_batch_size": 4, "global_batch_size": 24, "max_steps": 6}
# Why not equal: the same gradients are summed in another order (over 3 or 1 ranks and 2 or 6 micro batches instead
# of 2 and 3), which moves fp32 sums by a few ulps. Measured: at most 6e-8 relative over the 4 steps after a resize
# (two uninterrupted runs on 2 and on 3 workers differ by 3e-8). A lost or misloaded optimizer state or a wrong data
# position moves the loss by 1e-3 or more; a step counter advanced twice (DeepSpeed's universal load shares one
# between parameter groups) moved it by 2.6e-5, which this tolerance catches.
RESIZE_REL = 1e-5

CASES = {
    # (method, ZeRO stage, model, (workers, up to step) of each attempt after the first's (2, 2))
    "full-zero3": ("full", 3, None, [(3, 4), (1, 6)]),
    # A LoRA job on a saved base: its checkpoints leave the frozen base weights out.
    "lora-zero2": ("lora", 2, "base", [(1, 4), (3, 6)]),
}


def _job(tmp_path, name, method, stage, model, base_model_dir, workers, max_steps):
    sections = dict(method=method, zero={"stage": stage}, optim={**OPTIM, "max_steps": max_steps},
                    checkpoint={"every_n_steps": 2, "keep_last": 5}, resources={"num_workers": workers},
                    export={"enabled": False}, eval={"max_batches": 2})
    if method == "lora":
        sections.update(lora={"rank": 32, "alpha": 64, "dropout": 0.0}, optim={**sections["optim"], "lr": 1e-2})
    if model == "base":
        sections["model"] = base_model_section(base_model_dir)
    spec = spec_from_dict(tiny_job_dict(str(tmp_path / "store"), name=name, **sections))
    s = run_training(spec)
    assert s.error is None, s.error
    return s


def _tensor(saved):
    """A universal-format file's tensor (DeepSpeed stores it bare or as {"param": tensor})."""
    return saved["param"] if isinstance(saved, dict) else saved


def _losses(history):
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_resumes_on_another_number_of_workers(ray_cluster, tmp_path, base_model_dir, case):
    method, stage, model, attempts = CASES[case]
    run = lambda name, workers, steps: _job(tmp_path, name, method, stage, model, base_model_dir, workers, steps)  # noqa: E731
    reference = _losses(run("same-size", 2, 6).history)
    # The 2-worker run stopped after its step-2 checkpoint: the resized attempts resume from a copy of it.
    job = tmp_path / "store" / "resized"
    shutil.copytree(tmp_path / "store" / "same-size" / "step_00000002", job / "step_00000002")
    store = CheckpointStore(str(job))
    last = None
    for workers, steps in attempts:
        if case == "lora-zero2" and steps == 6:
            # Back to step 2 again (its step-4 checkpoint uncommitted): the universal form made for the 1-worker
            # attempt is reused, not converted again.
            converted = (job / "step_00000002" / UNIVERSAL / MANIFEST).read_bytes()
            os.remove(job / "step_00000004" / MANIFEST)
        last = run("resized", workers, steps)
        if case == "lora-zero2" and steps == 6:
            assert (job / "step_00000002" / UNIVERSAL / MANIFEST).read_bytes() == converted
    resized = _losses(last.history)
    assert sorted(resized) == list(range(1, 7))
    for step in range(3, 7):
        assert resized[step] == pytest.approx(reference[step], rel=RESIZE_REL), (step, reference, resized)
    # (the LoRA run's resume at step 2 on 1 worker went with the step-4 checkpoint it wrote)
    assert last.state.resumes == ([2, 4] if case == "full-zero3" else [2])

    # The converted weights are DeepSpeed's own consolidation (zero_to_fp32) of the original 2-worker checkpoint.
    original = job / "step_00000002"
    tag = "step_00000002"
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(original), tag)
    universal = {os.path.basename(os.path.dirname(p)): _tensor(torch.load(p, weights_only=False))
                 for p in glob.glob(str(original / UNIVERSAL / tag / "zero" / "*" / "fp32.pt"))}
    trained = {k for k in consolidated if method == "full" or ".lora_" in k}
    assert trained and trained <= set(universal)
    for k in trained:
        torch.testing.assert_close(universal[k].reshape(-1), consolidated[k].float().reshape(-1), rtol=0, atol=0)
    manifest = store.inside("step_00000002").read_manifest(UNIVERSAL)
    assert manifest is not None and not store.inside("step_00000002").problems(UNIVERSAL, deep=True)

    if method == "lora":
        # Only what training changed: the DeepSpeed shards of a LoRA checkpoint are the adapter and its optimizer
        # state (fp32 module copy + fp32 master + two Adam moments = 16 bytes a parameter), not the frozen base.
        trainable = sum(t.numel() for k, t in consolidated.items() if ".lora_" in k)
        shards = sum(f.size for f in store.read_manifest("step_00000006").files
                     if f.path.endswith(("model_states.pt", "optim_states.pt")))
        assert shards / (trainable * 16) <= 1.05, (shards, trainable)
