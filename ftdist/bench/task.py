"""The benchmark's own task, made on the fly so `ftdist bench` needs nothing outside the package: spell numbers out
in English words (the quickstart's task), a train and an eval split of disjoint numbers, and a small byte-level BPE
tokenizer trained on them. Deterministic: the same files every run."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
VOCAB_SIZE = 320


def words(n: int) -> str:
    """4721 -> 'four thousand seven hundred twenty-one' (0 <= n < 1,000,000)."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + words(n % 100))
    return words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + words(n % 1000))


def row(n: int) -> dict:
    return {"prompt": f"Write {n} in words:", "completion": " " + words(n)}


def near_miss(n: int, rng: random.Random) -> int:
    """`n` with one digit changed (never to a leading zero): a number whose spelling is a plausible mistake."""
    digits = list(str(n))
    i = rng.randrange(len(digits))
    digits[i] = rng.choice([d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0")])
    return int("".join(digits))


def pair(n: int, rng: random.Random) -> dict:
    """A preference row: the right spelling of `n` chosen, a near miss's rejected."""
    return {"prompt": row(n)["prompt"], "chosen": " " + words(n), "rejected": " " + words(near_miss(n, rng))}


@dataclass(frozen=True)
class TaskFiles:
    train: str
    eval: str
    tokenizer: str
    pairs: str
    """Preference pairs of the training numbers (objective dpo)."""
    pair_sequences: str
    """The same pairs as SFT rows, chosen and rejected each a prompt + completion: the same sequences for SFT."""


def write_tokenizer(texts: list[str], out: str, chat_template: str | None = None, vocab_size: int = VOCAB_SIZE) -> None:
    """A byte-level BPE tokenizer of `vocab_size` tokens trained on `texts`, saved as a Hugging Face folder."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(out)


def write_task(root: str, n_train: int = 2600, n_eval: int = 400, seed: int = 1234) -> TaskFiles:
    """The task's files under `root` (made once; reused when present)."""
    files = TaskFiles(os.path.join(root, "train.jsonl"), os.path.join(root, "eval.jsonl"),
                      os.path.join(root, "tokenizer"), os.path.join(root, "pairs.jsonl"),
                      os.path.join(root, "pair_sequences.jsonl"))
    if os.path.isdir(files.tokenizer) and os.path.exists(files.pair_sequences):
        return files
    os.makedirs(root, exist_ok=True)
    numbers = random.Random(seed).sample(range(1, 10_000), n_train + n_eval)
    for path, nums in ((files.train, numbers[:n_train]), (files.eval, numbers[n_train:])):
        with open(path, "w") as fh:
            fh.writelines(json.dumps(row(n)) + "\n" for n in nums)
    rng = random.Random(seed + 1)
    pairs = [pair(n, rng) for n in numbers[:n_train]]
    with open(files.pairs, "w") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in pairs)
    with open(files.pair_sequences, "w") as fh:
        fh.writelines(json.dumps({"prompt": p["prompt"], "completion": p[side]}) + "\n"
                      for p in pairs for side in ("chosen", "rejected"))
    if not os.path.isdir(files.tokenizer):  # (a folder made before the pair files existed keeps its tokenizer)
        texts = [r["prompt"] + r["completion"] for r in map(row, numbers[:n_train])]
        write_tokenizer(texts, files.tokenizer + ".tmp")
        os.replace(files.tokenizer + ".tmp", files.tokenizer)
    return files
