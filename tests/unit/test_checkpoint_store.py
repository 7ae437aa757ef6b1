
"""Checkpoint storage on local disk: which files a rank needs, retention by recency and by metric, and no
credentials in storage URIs."""

from __future__ import annotations

import pytest

from ftdist.errors import SpecError
from ftdist.storage.checkpoints import MANIFEST, CheckpointStore, is_shared, needed_by, rank_of
from tests.conftest import tiny_job_dict
from tests.support.checkpoints import meta as _meta


def test_needed_by():
    assert needed_by("step_1/zero_pp_rank_3_mp_rank_00_optim_states.pt", 3)
    assert not needed_by("step_1/bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt", 3)
    assert not needed_by("step_1/rng_state_rank12.pt", 1)
    assert needed_by("step_1/mp_rank_00_model_states.pt", 5)
    assert not needed_by(".ftdist/rank-00000.json", 0) and not needed_by(MANIFEST, 0)


def test_shared_files_are_downloaded_once_per_node_and_own_files_per_rank():
    """What one rank per node downloads for the node (shared) and what each rank downloads for itself."""
    assert is_shared("step_1/mp_rank_00_model_states.pt") and is_shared("ftdist_state.json")
    assert is_shared("hf/config.json") and is_shared("latest")
    assert not is_shared("step_1/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert not is_shared(".ftdist/rank-00000.json") and not is_shared(MANIFEST)
    assert rank_of("step_1/zero_pp_rank_12_mp_rank_00_model_states.pt") == 12
    assert rank_of("step_1/rng_state_rank3.pt") == 3 and rank_of("step_1/mp_rank_00_model_states.pt") is None


def test_universal_form_rules():
    from ftdist.train.universal import needs_conversion, node_dir, wanted_for_conversion

    manifest = type("M", (), {"world_size": 2, "zero_stage": 2})()
    assert not needs_conversion(manifest, 2) and needs_conversion(manifest, 3) and needs_conversion(manifest, 1)
    manifest.zero_stage = 0  # replicated optimizer state: any world size loads it as it is
    assert not needs_conversion(manifest, 3)
    assert wanted_for_conversion("step_2/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert not wanted_for_conversion("hf/tokenizer.json")
    # every rank of a node agrees on the folder; two checkpoints (or jobs) never share one
    assert node_dir("s3://b/job", "step_00000002") == node_dir("s3://b/job", "step_00000002")
    assert node_dir("s3://b/job", "step_00000002") != node_dir("s3://b/job", "step_00000004")
    assert node_dir("s3://b/job", "step_00000002") != node_dir("s3://b/other", "step_00000002")


def test_job_file_rejects_credentials_in_storage_uri(write_job, tmp_path):
    from ftdist.spec import load_spec

    job = write_job(tiny_job_dict("s3://AKIAXXXX:verysecret@bucket/prefix"))
    with pytest.raises(SpecError) as e:
        load_spec(str(job))
    assert "credentials do not belong" in str(e.value) and "verysecret" not in str(e.value)


def test_retention_keeps_newest_and_best(tmp_path):
    cs = CheckpointStore(str(tmp_path / "job"))
    losses = {2: 3.0, 4: 1.0, 6: 2.0, 8: 2.5}
    for step, loss in losses.items():
        name = f"step_{step:08d}"
        d = tmp_path / name
        d.mkdir()
        (d / "f").write_text(name)
        cs.upload_rank(str(d), name, 0)
        cs.commit(name, 1, _meta(step, metrics={"eval_loss": loss}), timeout_s=5)
    assert cs.apply_retention(2, "eval_loss", "min") == ["step_00000002"]  # best two (4, 6) + newest (8)
    assert [c.step for c in cs.checkpoints()] == [4, 6, 8]
    assert cs.apply_retention(1) == ["step_00000004", "step_00000006"]
    assert [c.step for c in cs.checkpoints()] == [8]


def test_checkpoints_listing_shows_what_the_run_spent(tmp_path, capsys):
    """`ftdist checkpoints` puts each checkpoint's recorded hours beside it: GPU-hours when the run had GPUs, else
    worker-hours (a run on CPU)."""
    from ftdist.cli import main

    cs = CheckpointStore(str(tmp_path / "job"))
    for step, hours in ((4, 0.25), (8, 0.5)):
        name = f"step_{step:08d}"
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
        cs.upload_rank(str(tmp_path / name), name, 0)
        cs.commit(name, 1, _meta(step, worker_hours=hours * 2, gpu_hours=hours), timeout_s=5)
    assert main(["checkpoints", str(tmp_path / "job")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "GPU-h" in lines[0] and lines[1].split()[7] == "0.25" and lines[2].split()[7] == "0.5"  # after "16 B"
