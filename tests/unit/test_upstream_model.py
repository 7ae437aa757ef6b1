"""The upstream model the quickstart fine-tunes (jobs/data/make_upstream_model.py, committed): a Hugging Face folder
that loads with the Auto classes, is the architecture the script states, and is pre-trained: its loss on the
held-out slice of its corpus is far below a random model's."""

from __future__ import annotations

import json
import math
import sys

import torch

from tests.conftest import REPO

UPSTREAM = REPO / "jobs" / "data" / "upstream"


def test_the_committed_model_is_the_scripts_and_is_pretrained():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "jobs" / "data"))
    try:
        from make_upstream_model import CONFIG, SEQ
    finally:
        sys.path.pop(0)
    model = AutoModelForCausalLM.from_pretrained(UPSTREAM / "model").eval()
    tok = AutoTokenizer.from_pretrained(UPSTREAM / "model")
    config = model.config.to_dict()
    assert {k: config[k] for k in CONFIG} == CONFIG and len(tok) == CONFIG["vocab_size"]
    rows = [json.loads(line) for line in (UPSTREAM / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) >= 40 and all(set(r) == {"text"} and len(r["text"]) > 100 for r in rows)
    total = count = 0.0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([[tok.bos_token_id] + tok(r["text"], add_special_tokens=False)["input_ids"][:SEQ - 1]])
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    # Measured when made: 4.06 (7.63 before pre-training; uniform over the vocabulary: ln 2048 = 7.62).
    assert total / count < 4.5 < math.log(CONFIG["vocab_size"])
