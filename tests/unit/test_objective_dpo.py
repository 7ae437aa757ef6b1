"""`objective: dpo` without Ray or DeepSpeed: preference rows (strings and TRL's conversational form) become masked
pairs, one batch carries the chosen then the rejected rows, the loss and metrics come from the objective's forward,
LoRA's reference is the model with its adapters off, the precomputed reference is stored and reused, and bad rows
and settings are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftdist.cli import main
from ftdist.errors import SpecError
from ftdist.spec import DataSpec, spec_from_dict
from ftdist.train.data import IGNORE_INDEX, RowError, build_splits
from ftdist.train.locations import load_tokenizer
from ftdist.train.objectives import objective_for
from ftdist.train.objectives.dpo import collate_pairs
from ftdist.train.objectives.reference import REFERENCE_FILE, attach_reference
from ftdist.storage.store import open_store
from tests.conftest import QS, TINY_LLAMA, ModelAsEngine, sweep_job_dict, tiny_job_dict

PAIRS = str(QS / "train_pairs.jsonl")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(QS / "tokenizer"))


def _spec(tmp_path, **sections):
    job = tiny_job_dict(str(tmp_path / "runs"), objective="dpo",
                        data={"train": PAIRS, "eval": str(QS / "eval_pairs.jsonl"), "format": "prompt_completion",
                              "max_length": 48}, **sections)
    return spec_from_dict(job)


def _encoder(tok, tmp_path):
    return objective_for(_spec(tmp_path)).encoder(tok)


def test_string_pairs_mask_the_prompt(tok, tmp_path):
    ex = _encoder(tok, tmp_path)({"prompt": "Write 5 in words:", "chosen": " five", "rejected": " six"})
    for ids, labels, text in ((ex.chosen_ids, ex.chosen_labels, " five</s>"), (ex.rejected_ids, ex.rejected_labels,
                                                                                " six</s>")):
        assert tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == text
        prompt = ids[:sum(lab == IGNORE_INDEX for lab in labels)]
        assert tok.decode(prompt) == "Write 5 in words:"  # this tokenizer adds no BOS


def test_conversational_pairs_use_the_chat_template(tok, tmp_path):
    prompt = [{"role": "user", "content": "Write 5 in words:"}]
    ex = _encoder(tok, tmp_path)({"prompt": prompt, "chosen": [{"role": "assistant", "content": "five"}],
                                  "rejected": [{"role": "assistant", "content": "six"}]})
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "five"}], tokenize=True)["input_ids"]
    assert ex.chosen_ids == list(full)
    assert tok.decode([t for t, lab in zip(ex.chosen_ids, ex.chosen_labels) if lab != IGNORE_INDEX]) == "five</s>"


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "rejected": " six"}, "missing field 'chosen'"),
    ({"prompt": "p", "chosen": " six", "rejected": " six"}, "chosen and rejected are identical"),
    ({"prompt": "p", "chosen": " five", "rejected": [{"role": "assistant", "content": "six"}]},
     "must all be strings, or all message lists"),
    ({"prompt": "p", "chosen": "", "rejected": " six"}, "chosen or rejected is empty"),
])
def test_bad_rows_name_the_problem(tok, tmp_path, row, message):
    with pytest.raises(RowError, match=message):
        _encoder(tok, tmp_path)(row)


def test_a_bad_row_is_one_line_with_file_and_line_or_skipped(tok, tmp_path):
    rows = [json.loads(line) for line in Path(PAIRS).read_text().splitlines()[:40]]
    rows[7]["rejected"] = rows[7]["chosen"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = _spec(tmp_path)
    data = DataSpec(**{**spec.data.model_dump(), "train": str(path), "eval": None})
    encode = objective_for(spec).encoder(tok)
    with pytest.raises(SpecError, match=r"pairs\.jsonl:8: bad row: chosen and rejected are identical"):
        build_splits(data, tok, 0, encode)
    skipped = build_splits(DataSpec(**{**data.model_dump(), "on_bad_row": "skip"}), tok, 0, encode)
    assert skipped.stats.skipped_bad == 1 and len(skipped.train) == 39


@pytest.mark.parametrize("change, message", [
    ({"objective": "dpo", "data": {"train": PAIRS, "packing": True}}, r"data\.packing: data\.packing concatenates"),
    ({"dpo": {"beta": 0.2}}, r"dpo: dpo options are set but objective is 'sft'"),
    ({"objective": "dpo", "dpo": {"loss_type": "kto"}}, r"dpo\.loss_type"),
    ({"objective": "dpo", "dpo": {"label_smoothing": 0.5}}, r"dpo\.label_smoothing"),
])
def test_bad_settings_are_one_line(validate_refuses, change, message):
    validate_refuses(change, message)


def test_a_sweep_metric_the_objective_does_not_report(tmp_path, write_job, capsys):
    job = sweep_job_dict(str(tmp_path / "runs"))
    job["sweep"]["metric"], job["sweep"]["mode"] = "eval_preference_accuracy", "max"
    assert main(["validate", str(write_job(job))]) == 2
    err = capsys.readouterr().err
    assert "objective dpo reports it; this job's objective is sft" in err and len(err.strip().splitlines()) == 1


def _model(lora: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_LLAMA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a trained adapter, so policy and reference differ
                torch.nn.init.normal_(p, std=0.1)
    return model


def test_lora_reference_is_the_model_with_adapters_off(tok, tmp_path):
    spec = _spec(tmp_path, method="lora", dpo={"beta": 0.1})
    objective = objective_for(spec)
    assert not objective.precomputes_reference
    model = _model(lora=True)
    examples = build_splits(spec.data, tok, 0, objective.encoder(tok)).train[:4]
    batch = collate_pairs(examples, tok.pad_token_id)
    loss, sums = objective.forward(ModelAsEngine(model), batch)
    with torch.no_grad(), model.disable_adapter():
        reference = objective.logps(model, batch)[0]
    policy = objective.logps(model, batch)[0].detach()
    margin = 0.1 * ((policy[:4] - reference[:4]) - (policy[4:] - reference[4:]))
    assert loss.item() == pytest.approx(torch.nn.functional.softplus(-margin).mean().item(), rel=1e-5)
    metrics = objective.train_metrics_from(sums.tolist())
    assert metrics["reward_margin"] == pytest.approx(margin.mean().item(), rel=1e-5)
    assert set(metrics) == {"rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy"}
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_full_reference_is_precomputed_once_and_reused(tok, tmp_path):
    spec = _spec(tmp_path)
    objective = objective_for(spec)
    assert objective.precomputes_reference
    splits = build_splits(spec.data, tok, 0, objective.encoder(tok))
    parts = {"train": splits.train[:6], "eval": splits.eval[:3]}
    store = open_store(str(tmp_path / "run"))
    engine = ModelAsEngine(_model(lora=False))

    def to_device(batch):
        return collate_pairs(batch, tok.pad_token_id)

    lines = []
    assert attach_reference(objective, engine, parts, store, "m", 0, 1, 4, to_device, lines.append)
    first = [e.reference for e in parts["train"]]
    with torch.no_grad():
        direct = objective.logps(engine.module.eval(), to_device(parts["train"]))[0]
    assert [c for c, _ in first] == pytest.approx(direct[:6].tolist(), rel=1e-6)
    assert store.get_bytes(REFERENCE_FILE)
    for e in parts["train"] + parts["eval"]:
        e.reference = None
    assert not attach_reference(objective, engine, parts, store, "m", 0, 1, 4, to_device, lines.append)
    assert [e.reference for e in parts["train"]] == first and "reused" in lines[-1]
    assert attach_reference(objective, engine, parts, store, "another model", 0, 1, 4, to_device, lines.append)
    batch = to_device(parts["train"][:2])
    assert batch["reference"].shape == (4,)  # [chosen_1, chosen_2, rejected_1, rejected_2]


def test_a_dpo_sweep_validates(tmp_path, write_job, capsys):
    """`ftdist tune` sweeps any objective: dpo.beta x optim.lr on the preference accuracy."""
    job = sweep_job_dict(str(tmp_path / "runs"), objective="dpo",
                         data={"train": PAIRS, "eval": str(QS / "eval_pairs.jsonl"), "max_length": 48},
                         sweep={"search": "grid", "space": {"dpo.beta": [0.1, 0.5], "optim.lr": [1e-3, 3e-3]},
                                "metric": "eval_preference_accuracy", "mode": "max"})
    assert main(["validate", str(write_job(job))]) == 0, capsys.readouterr().err


def test_data_chat_template_applies_to_message_list_pairs(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(QS / "tokenizer")
    tok.chat_template = None
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    spec = spec_from_dict(tiny_job_dict(str(tmp_path), objective="dpo",
                                        data={"train": PAIRS, "chat_template": template, "max_length": 48}))
    ex = objective_for(spec).encoder(tok)({"prompt": [{"role": "user", "content": "Write 5 in words:"}],
                                          "chosen": [{"role": "assistant", "content": "five"}],
                                          "rejected": [{"role": "assistant", "content": "six"}]})
    assert tok.decode(ex.chosen_ids) == "[user] Write 5 in words:\n[assistant] five\n"
