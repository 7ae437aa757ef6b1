"""Pre-train the quickstart's upstream model: a small Llama on general English text that ships with every Python.

    python jobs/data/make_upstream_model.py        # writes jobs/data/upstream/{model/,heldout.jsonl}; ~3 min on 2 cores

The corpus is CPython's own documentation as installed: the `pydoc_data` topics (the language reference pages `help()`
shows) and the docstrings of a fixed list of standard-library modules, about 0.8 MB of English prose and code. Every
20th document is held out: `heldout.jsonl` (rows {"text": ...}) measures what the model knew before a fine-tune and
how much of it a fine-tune forgets. The tokenizer (byte-level BPE) is trained on the training documents plus the
downstream task's text (jobs/data/quickstart/train.jsonl), as one would train a tokenizer for a model one means to
adapt. Then a plain next-token loop (one process, fixed seed and order) pre-trains the model; the result, a Hugging
Face folder (config, safetensors, tokenizer), is what jobs/quickstart.yaml fine-tunes via model.name_or_path.

Deterministic for a given Python version (the docstrings are the installed ones): the committed folder was made with
CPython 3.11.7, torch 2.13.0 on CPU.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "upstream"
MODULES = (
    "abc argparse array asyncio base64 bisect calendar collections concurrent.futures configparser contextlib copy "
    "csv dataclasses datetime decimal difflib email enum fnmatch fractions functools getopt glob gzip hashlib heapq "
    "hmac html http.client io ipaddress itertools json locale logging math mimetypes numbers operator optparse os "
    "pathlib pickle pprint queue random re sched secrets selectors shlex shutil signal socket sqlite3 statistics "
    "string struct subprocess tarfile tempfile textwrap threading time timeit tokenize traceback types typing "
    "unittest urllib.parse urllib.request uuid warnings weakref xml.etree.ElementTree zipfile zlib"
).split()
VOCAB_SIZE = 2048
SEQ = 128
CONFIG = {  # the quickstart's former from_config model, with the vocabulary and context of this corpus
    "model_type": "llama", "vocab_size": VOCAB_SIZE, "hidden_size": 128, "intermediate_size": 344,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": SEQ,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
STEPS, BATCH, LR, WARMUP, SEED = 600, 32, 3e-3, 40, 0


def documents() -> list[str]:
    """The corpus, one string per document, in a fixed order."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    for name in MODULES:
        module = importlib.import_module(name)
        parts = [inspect.getdoc(module) or ""]
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc:
                    parts.append(f"{attr}: {doc}")
        docs.append("\n\n".join(p for p in parts if p))
    return [d.strip() for d in docs if len(d.strip()) > 200]


def heldout_rows(docs: list[str], chars: int = 600) -> list[dict]:
    """Held-out documents cut at paragraph ends into rows of about `chars` characters."""
    rows = []
    for doc in docs:
        chunk = ""
        for para in doc.split("\n\n"):
            chunk = f"{chunk}\n\n{para}" if chunk else para
            if len(chunk) >= chars:
                rows.append({"text": chunk[: 2 * chars]})
                chunk = ""
        if len(chunk) > 100:
            rows.append({"text": chunk})
    return rows


def main() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ftdist.bench.task import write_tokenizer
    sys.path.insert(0, str(HERE))
    from make_quickstart_data import CHAT_TEMPLATE

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    docs = documents()
    train_docs = [d for i, d in enumerate(docs) if i % 20 != 7]
    held = [d for i, d in enumerate(docs) if i % 20 == 7]
    task = [json.loads(line) for line in open(HERE / "quickstart" / "train.jsonl")]
    model_dir = OUT / "model"
    write_tokenizer(train_docs + [r["prompt"] + r["completion"] for r in task], str(model_dir), CHAT_TEMPLATE,
                    vocab_size=VOCAB_SIZE)
    tok = AutoTokenizer.from_pretrained(model_dir)
    stream: list[int] = []
    for d in train_docs:
        stream += [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = torch.tensor(stream[: len(stream) // SEQ * SEQ]).view(-1, SEQ)
    rows = heldout_rows(held)
    with open(OUT / "heldout.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    held_ids = [tok(r["text"], add_special_tokens=False)["input_ids"][: SEQ - 2] for r in rows]
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} MB; train {blocks.numel():,} tokens "
          f"({len(blocks)} blocks of {SEQ}), held out {len(held)} documents -> {len(rows)} rows")

    cfg = dict(CONFIG)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (
        1 + math.cos(math.pi * min(s, STEPS) / STEPS)))

    def heldout_loss() -> float:
        model.eval()
        total = n = 0.0
        with torch.no_grad():
            for ids in held_ids:
                x = torch.tensor([[tok.bos_token_id] + ids + [tok.eos_token_id]])
                loss = model(input_ids=x, labels=x).loss
                total += loss.item() * (x.shape[1] - 1)
                n += x.shape[1] - 1
        model.train()
        return total / n

    print(f"step 0: held-out loss {heldout_loss():.3f}")
    g = torch.Generator().manual_seed(SEED)
    order = torch.empty(0, dtype=torch.long)
    t0 = time.time()
    for step in range(1, STEPS + 1):
        if len(order) < BATCH:
            order = torch.cat([order, torch.randperm(len(blocks), generator=g)])
        idx, order = order[:BATCH], order[BATCH:]
        x = blocks[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == STEPS:
            print(f"step {step}: train loss {loss.item():.3f}, {time.time() - t0:.0f} s")
    print(f"step {STEPS}: held-out loss {heldout_loss():.3f} "
          f"({STEPS * BATCH * SEQ / blocks.numel():.1f} epochs, {time.time() - t0:.0f} s)")
    model.save_pretrained(model_dir, safe_serialization=True)
    print(f"wrote {model_dir} and {OUT / 'heldout.jsonl'}")


if __name__ == "__main__":
    main()
