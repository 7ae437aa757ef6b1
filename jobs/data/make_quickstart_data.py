"""Make the quickstart's downstream task and tokenizer: spell numbers out in English words.

    python jobs/data/make_quickstart_data.py   # writes jobs/data/quickstart/{train,eval}.jsonl and tokenizer/

Train and eval numbers are disjoint, so the held-out loss measures generalisation of the learned mapping
(digits -> words), not memorisation. Deterministic: the same files every run.
"""

import json
import random
from pathlib import Path

from ftdist.bench.task import row, write_tokenizer  # the same task and tokenizer recipe as `ftdist bench`

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
    texts = [r["prompt"] + r["completion"] for r in map(row, train)]
    write_tokenizer(texts, str(here / "tokenizer"), CHAT_TEMPLATE)
    print(f"wrote {len(train)} train / {len(held_out)} eval rows and a tokenizer to {here}")


if __name__ == "__main__":
    main()
