"""Make the quickstart's downstream task and tokenizer: spell numbers out in English words.

    python jobs/data/make_quickstart_data.py   # writes jobs/data/quickstart/{train,eval}.jsonl, tokenizer/ and
                                               # {train,eval}_pairs.jsonl

Train and eval numbers are disjoint, so the held-out loss measures generalisation of the learned mapping
(digits -> words), not memorisation. The preference pairs (prompt, chosen, rejected) for `objective: dpo` use the
same split: chosen is the right spelling, rejected a plausible wrong one (one digit of the number changed, so the
two differ in a word or two). Deterministic: the same files every run.
"""

import json
import random
from pathlib import Path

from ftdist.bench.task import pair, row, write_tokenizer  # the same task and tokenizer recipe as `ftdist bench`

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def main() -> None:
    here = Path(__file__).parent / "quickstart"
    here.mkdir(exist_ok=True)
    rng = random.Random(1234)
    numbers = rng.sample(range(1, 10_000), 3000)
    train, held_out = numbers[:2600], numbers[2600:]

    for name, nums in (("train", train), ("eval", held_out)):
        with open(here / f"{name}.jsonl", "w") as fh:
            for n in nums:
                fh.write(json.dumps(row(n)) + "\n")
    pairs = random.Random(99)  # its own stream: the files above stay as they were before pairs existed
    for name, nums in (("train", train), ("eval", held_out)):
        with open(here / f"{name}_pairs.jsonl", "w") as fh:
            for n in nums:
                fh.write(json.dumps(pair(n, pairs)) + "\n")
    texts = [r["prompt"] + r["completion"] for r in map(row, train)]
    write_tokenizer(texts, str(here / "tokenizer"), CHAT_TEMPLATE)
    print(f"wrote {len(train)} train / {len(held_out)} eval rows, as many preference pairs, and a tokenizer to {here}")


if __name__ == "__main__":
    main()
