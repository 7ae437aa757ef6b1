"""Reading some tensors of a torch.save file by byte ranges (how a ZeRO-3 export reads the fp32 master weights and
not the Adam moments): the ranges listed in a manifest at upload, fetched into a sparse file, verified, loaded."""

from __future__ import annotations

import os

import pytest
import torch

from ftdist.storage.checkpoints import CheckpointError, CheckpointStore
from ftdist.storage.manifest import CheckpointMeta, FileEntry
from ftdist.train.export import export_records, fp32_partitions
from ftdist.train.partial_load import Span, load_selected, spans_of

OPTIM = "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _optimizer_file(path: str) -> list[torch.Tensor]:
    """A rank's ZeRO-3 optimizer file as DeepSpeed lays it out: master weights as views into one flat buffer (one
    at an offset), moments beside them, and an fp32 group of another dtype."""
    flat = torch.randn(3000)
    groups = [flat[:1000], flat[1000:].view(40, 50), torch.randn(64).to(torch.bfloat16)]
    state = {"state": {0: {"exp_avg": torch.randn(3000), "exp_avg_sq": torch.randn(3000), "step": torch.tensor(4.)}}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"optimizer_state_dict": {"zero_stage": 3, "optimizer_state_dict": state, "fp32_flat_groups": groups,
                                         "partition_count": 2}, "ds_version": "0.19.8"}, path)
    return groups


def _commit(tmp_path) -> tuple[CheckpointStore, list[torch.Tensor]]:
    src = tmp_path / "rank0"
    groups = _optimizer_file(str(src / OPTIM))
    (src / "global_step4" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"not a zip")
    cs = CheckpointStore(str(tmp_path / "store" / "job"))
    cs.upload_rank(str(src), "step_00000004", 0, export_records)
    cs.commit("step_00000004", 1, CheckpointMeta(step=4, zero_stage=3, method="full", job_name="job",
                                                  spec_sha256="0" * 64))
    return cs, groups


def test_the_manifest_lists_the_master_weights_ranges_and_an_export_reads_only_those(tmp_path):
    cs, groups = _commit(tmp_path)
    manifest = cs.read_manifest("step_00000004")
    entry = next(f for f in manifest.files if f.path == OPTIM)
    assert [r.name.split("/", 1)[1] for r in entry.records][0] == "data.pkl"
    assert sum(r.size for r in entry.records) < 0.4 * entry.size  # not the moments
    others = [f for f in manifest.files if f.path != OPTIM]
    assert all(f.records is None for f in others)  # not a torch zip, or not an optimizer file

    dest = tmp_path / "export"
    cs.fetch_records("step_00000004", str(dest), [entry])
    local = str(dest / OPTIM)
    assert os.path.getsize(local) == entry.size  # the whole file's size; the moments are holes
    got = load_selected(local, [Span(r.name, r.offset, r.size) for r in entry.records], fp32_partitions)
    assert [g.dtype for g in got] == [g.dtype for g in groups]
    for g, want in zip(got, groups):
        assert torch.equal(g, want)
    with open(local, "rb") as fh:  # nothing but the listed ranges came over
        data = fh.read()
    listed = {i for r in entry.records for i in range(r.offset, r.offset + r.size)}
    assert not any(data[i] for i in range(0, len(data), 97) if i not in listed)


def test_a_corrupt_record_is_refused(tmp_path):
    cs, _ = _commit(tmp_path)
    entry = next(f for f in cs.read_manifest("step_00000004").files if f.path == OPTIM)
    stored = tmp_path / "store" / "job" / "step_00000004" / OPTIM
    weights = entry.records[1]
    with open(stored, "r+b") as fh:
        fh.seek(weights.offset + 10)
        byte = fh.read(1)
        fh.seek(weights.offset + 10)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CheckpointError, match=f"checksum mismatch in record {weights.name}"):
        cs.fetch_records("step_00000004", str(tmp_path / "export"), [entry])


def test_files_without_master_weights_list_no_records(tmp_path):
    path = str(tmp_path / "x" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    os.makedirs(os.path.dirname(path))
    torch.save({"optimizer_state_dict": {"state": {}}}, path)  # a ZeRO-1/2 layout: no fp32_flat_groups
    assert spans_of(path, fp32_partitions) is None
    model_states = str(tmp_path / "x" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"module": {}}, model_states)
    assert export_records(model_states) is None
    legacy = str(tmp_path / "x" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    torch.save({"optimizer_state_dict": {}}, legacy, _use_new_zipfile_serialization=False)  # not a zip
    with pytest.warns(UserWarning, match="an export downloads the whole file"):
        assert export_records(legacy) is None


def test_manifests_from_before_records_still_read():
    entry = FileEntry.model_validate({"path": OPTIM, "size": 10, "rank": 0, "blake3": "ab" * 32})
    assert entry.records is None
