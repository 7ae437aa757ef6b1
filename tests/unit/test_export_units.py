"""Export pieces that need no checkpoint: sizes as Hugging Face writes them, and which checkpoint files an export
downloads for each ZeRO stage."""

from __future__ import annotations

import pytest

from ftdist.spec import parse_size
from ftdist.train.export import needed_for_export


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("5GiB", 5 * 2**30), ("500MB", 500 * 10**6),
                                        ("4MiB", 4 * 2**20), ("1.5KB", 1500), ("2TiB", 2 * 2**40), ("1024", 1024)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_rejects_nonsense():
    with pytest.raises(ValueError, match="not a size"):
        parse_size("five gigs")


def test_export_downloads_no_optimizer_shards_below_zero3():
    files = ["ftdist_state.json", "hf/config.json", "step_00000008/mp_rank_00_model_states.pt",
             "step_00000008/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "step_00000008/rng_state_rank0.pt",
             "step_00000008/zero_pp_rank_1_mp_rank_00_model_states.pt"]
    z2 = [f for f in files if needed_for_export(f, 2)]
    assert z2 == ["ftdist_state.json", "hf/config.json", "step_00000008/mp_rank_00_model_states.pt",
                  "step_00000008/zero_pp_rank_1_mp_rank_00_model_states.pt"]
    z3 = [f for f in files if needed_for_export(f, 3)]
    assert "step_00000008/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt" in z3 and not any("rng" in f for f in z3)


def test_shard_writer_writes_tied_weights_once_and_splits_shared_storage(tmp_path):
    """Tied weights (one tensor under two names) and DeepSpeed's views into one flat buffer, as they come out of a
    ZeRO 0-2 checkpoint: safetensors refuses shared storage in a file; the writer saves a tied weight once (as
    save_pretrained does) and copies views of a shared buffer."""
    import torch
    from safetensors.torch import load_file

    from ftdist.train.export import ShardWriter

    flat = torch.arange(12, dtype=torch.float32)
    emb = flat[:6].view(2, 3)
    w = ShardWriter(str(tmp_path), "1MB")
    w.add("model.embed_tokens.weight", emb)
    w.add("lm_head.weight", emb)  # tied: the same view
    w.add("model.norm.weight", flat[6:])  # another view of the same buffer
    assert w.close() == ["model.safetensors"]
    got = load_file(tmp_path / "model.safetensors")
    assert sorted(got) == ["model.embed_tokens.weight", "model.norm.weight"]
    assert torch.equal(got["model.embed_tokens.weight"], emb) and torch.equal(got["model.norm.weight"], flat[6:])
