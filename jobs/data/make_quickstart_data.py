"""Make the quickstart's downstream task and tokenizer: spell numbers out in English words.

    python jobs/data/make_quickstart_data.py   # writes jobs/data/quickstart/{train,eval}.jsonl and tokenizer/

Train and eval numbers are disjoint, so the held-out loss measures generalisation of the learned mapping
(digits -> words), not memorisation. Deterministic: the same files every run.
"""

import json
import random
from pathlib import Path

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
       "seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + words(n % 100))
    return words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + words(n % 1000))


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def main() -> None:
    here = Path(__file__).parent / "quickstart"
    here.mkdir(exist_ok=True)
    rng = random.Random(1234)
    numbers = rng.sample(range(1, 10_000), 3000)
    train, held_out = numbers[:2600], numbers[2600:]

    def row(n: int) -> dict:
        return {"prompt": f"Write {n} in words:", "completion": " " + words(n)}

    for name, nums in (("train", train), ("eval", held_out)):
        with open(here / f"{name}.jsonl", "w") as fh:
            for n in nums:
                fh.write(json.dumps(row(n)) + "\n")
    texts = [r["prompt"] + r["completion"] for r in map(row, train)]
    make_tokenizer(texts, here / "tokenizer")
    print(f"wrote {len(train)} train / {len(held_out)} eval rows and a tokenizer to {here}")


if __name__ == "__main__":
    main()
