"""eval.generate without a model: prompts from each row format, the built-in metrics, the user's function."""

from __future__ import annotations

import pytest

from ftdist.errors import SpecError
from ftdist.spec import spec_from_dict
from ftdist.spec.job import GenerateSpec
from ftdist.train.data import RowError, Tokenize
from ftdist.train.generation import load_metric_function, prompt_of, score
from tests.conftest import QS, tiny_job_dict


def _gen(**kw) -> GenerateSpec:
    return GenerateSpec(**kw)


def test_builtin_metrics():
    g = _gen(metrics=["exact_match", "contains", {"regex": r"(\d+) apples", "name": "count"},
                      {"regex": r"^\s*[a-z -]+$", "name": "words_only"}])
    assert g.metric_names == ("eval_gen_exact_match", "eval_gen_contains", "eval_gen_count", "eval_gen_words_only")
    assert score(g, " four hundred ", "four hundred") == [1.0, 1.0, 0.0, 1.0]
    assert score(g, "I have 12 apples, four hundred", "12 apples") == [0.0, 1.0, 1.0, 0.0]
    assert score(g, "13 apples", "12 apples") == [0.0, 0.0, 0.0, 0.0]


def test_user_metric_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "mymetrics.py").write_text("def overlap(p, r):\n    return len(set(p.split()) & set(r.split())) / 2\n")
    by_file = _gen(function=f"{tmp_path}/mymetrics.py:overlap")
    assert by_file.metric_names == ("eval_gen_exact_match", "eval_gen_overlap")
    assert score(by_file, "a b c", "b c d", load_metric_function(by_file)) == [0.0, 1.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_metric_function(_gen(function="mymetrics:overlap"))("x", "x") == 0.5


@pytest.mark.parametrize("function, message", [
    ("nosuchmodule_xyz:f", "no module named 'nosuchmodule_xyz'"),
    ("json:no_such_function", "json has no function 'no_such_function'"),
    ("json:__doc__", "has no function '__doc__'"),
])
def test_user_metric_that_cannot_be_used_is_one_line(function, message):
    with pytest.raises(SpecError, match="eval.generate.function: .*" + message.replace("(", r"\(")):
        load_metric_function(_gen(function=function))


def test_prompts_are_rendered_as_training_renders_them():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(QS.parent / "upstream" / "model"))
    job = spec_from_dict(tiny_job_dict("/r", eval={"generate": {}}))
    t = Tokenize(tok, job.data)
    p = prompt_of({"prompt": "Write 12 in words:", "completion": " twelve"}, job, t)
    assert p.reference == " twelve" and p.ids == t.bos + t.encode("Write 12 in words:")
    assert t(({"prompt": "Write 12 in words:", "completion": " twelve"})).input_ids[:len(p.ids)] == p.ids
    dpo = spec_from_dict(tiny_job_dict("/r", objective="dpo", eval={"generate": {}}))
    p = prompt_of({"prompt": "Q", "chosen": " yes", "rejected": " no"}, dpo, t)
    assert p.reference == " yes" and p.ids == t.bos + t.encode("Q")
    with pytest.raises(RowError, match="must be a string"):
        prompt_of({"prompt": "Q"}, job, t)
