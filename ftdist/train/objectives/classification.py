"""`objective: classification`: a new head on the backbone (AutoModelForSequenceClassification, one logit per label)
trained with cross-entropy on rows with a text (`data.text_field`, and optionally a second one for pair tasks) and a
label (`classification.label_field`). Reports accuracy, and on the eval set macro-F1 as scikit-learn computes it
(over the labels that occur in the targets or the predictions).

Texts are tokenised as the tokenizer does for its models (`tokenizer(text, text_pair)`: [CLS] ... [SEP] for BERT,
BOS ... for Llama), which is also what a `text-classification` pipeline does with the export. Truncation to
data.max_length keeps the closing special tokens."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ftdist.errors import SpecError
from ftdist.train.data import OneSequence, RowError, attention_mask, json_object, read_rows, right_padded
from ftdist.train.heads import ScoreHead
from ftdist.train.objectives.base import Objective


@dataclass
class LabelledText(OneSequence):
    input_ids: list[int]
    label: int
    token_type_ids: Optional[list[int]] = None
    tail: int = 0
    """Special tokens at the end (BERT's [SEP]) that truncation keeps."""

    def truncated(self, max_length: int) -> "LabelledText":
        keep = max_length - self.tail

        def cut(seq: Optional[list[int]]) -> Optional[list[int]]:
            return None if seq is None else seq[:keep] + seq[len(seq) - self.tail:]

        return LabelledText(cut(self.input_ids), self.label, cut(self.token_type_ids), self.tail)

    has_target = True


def _label_key(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(f"label must be a string or an integer, got {type(value).__name__}")
    return str(value)


def derive_labels(rows: list, field: str, where: str) -> tuple[str, ...]:
    """The sorted distinct labels of the training rows (integers in numeric order); rows that are not objects or
    lack the field are left to the encoder, which names them."""
    found: set = set()
    for r in rows:
        data = r.data
        if isinstance(data, dict) and field in data:
            v = data[field]
            if not isinstance(v, bool) and isinstance(v, (str, int)):
                found.add(v)
    if all(isinstance(v, int) for v in found):
        labels = tuple(str(v) for v in sorted(found))
    else:
        labels = tuple(sorted(str(v) for v in found))
    if len(labels) < 2:
        raise SpecError(f"{where}: a classifier needs two or more labels; field {field!r} has "
                        f"{len(labels)} distinct value{'s' if len(labels) != 1 else ''}"
                        + (f" ({labels[0]!r})" if labels else "") + "; or list them in classification.labels")
    return labels


class LabelEncoder:
    """A row -> LabelledText, the label mapped to its id (a label outside the set names the set)."""

    def __init__(self, tokenizer: Any, text_field: str, pair_field: Optional[str], label_field: str,
                 labels: tuple[str, ...], declared: bool) -> None:
        self.tok, self.text_field, self.pair_field, self.label_field = tokenizer, text_field, pair_field, label_field
        self.ids = {name: i for i, name in enumerate(labels)}
        self.declared = declared
        self.tail = _closing_special_tokens(tokenizer)

    def __call__(self, row: Any) -> LabelledText:
        row = json_object(row)
        texts = []
        for name in (self.text_field, self.pair_field):
            if name is None:
                continue
            if name not in row:
                raise RowError(f"missing field {name!r}")
            if not isinstance(row[name], str) or not row[name]:
                raise RowError(f"field {name!r} must be a non-empty string")
            texts.append(row[name])
        if self.label_field not in row:
            raise RowError(f"missing field {self.label_field!r}")
        key = _label_key(row[self.label_field])
        if key not in self.ids:
            shown = ", ".join(list(self.ids)[:8]) + (", ..." if len(self.ids) > 8 else "")
            source = "classification.labels" if self.declared else "the labels of data.train"
            raise RowError(f"label {key[:40]!r} is not one of {source} ({shown})")
        enc = self.tok(*texts)
        return LabelledText(list(enc["input_ids"]), self.ids[key],
                            list(enc["token_type_ids"]) if "token_type_ids" in enc else None, self.tail)


def _closing_special_tokens(tokenizer: Any) -> int:
    """How many special tokens the tokenizer puts after a text (BERT: 1, [SEP]; Llama: 0)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return len(full) - start - len(plain)
    return 0


def collate_labelled(batch: list[LabelledText], pad_id: int) -> dict[str, torch.Tensor]:
    ids = [e.input_ids for e in batch]
    out = {"input_ids": right_padded(ids, pad_id), "attention_mask": attention_mask(ids),  # [B, T]
           "labels": torch.tensor([e.label for e in batch], dtype=torch.long)}  # [B]
    if batch[0].token_type_ids is not None:
        out["token_type_ids"] = right_padded([e.token_type_ids for e in batch], 0)  # [B, T]
    return out


def macro_f1(tp: list[float], fp: list[float], fn: list[float]) -> float:
    """The mean F1 over the labels that occur in the targets or the predictions (scikit-learn's default)."""
    scores = [2 * t / (2 * t + p + n) for t, p, n in zip(tp, fp, fn) if 2 * t + p + n > 0]
    return sum(scores) / len(scores) if scores else 0.0


class Classification(Objective):
    name = "classification"
    example_type = LabelledText

    @cached_property
    def labels(self) -> tuple[str, ...]:
        c = self.spec.classification
        if c.labels is not None:
            return tuple(c.labels)
        return derive_labels(read_rows(self.spec.data.train), c.label_field, self.spec.data.train)

    def data_key(self) -> dict:
        c = self.spec.classification
        # Derived labels are the data's own (the key already covers the data): not read to make the key.
        return {"label_field": c.label_field, "text_pair_field": c.text_pair_field, "labels": c.labels}

    def prepare_meta(self) -> dict:
        return {"labels": list(self.labels)}

    def adopt(self, meta: dict) -> None:
        self.__dict__["labels"] = tuple(meta["labels"])  # the cached_property's slot

    def encoder(self, tokenizer: Any) -> Callable[[Any], Any]:
        c = self.spec.classification
        return LabelEncoder(tokenizer, self.spec.data.text_field, c.text_pair_field, c.label_field, self.labels,
                            declared=c.labels is not None)

    def score_head(self, tokenizer: Any) -> ScoreHead:
        return ScoreHead(self.labels, tokenizer.pad_token_id)

    def collate(self, batch: list, pad_id: int) -> dict[str, torch.Tensor]:
        return collate_labelled(batch, pad_id)

    def forward(self, engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = engine(**inputs).logits.float()  # [B, C]
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels, reduction="none")  # [B]
        n = len(self.labels)
        choice = logits.argmax(-1)  # [B]
        predicted = F.one_hot(choice, n).bool()  # [B, C]
        actual = F.one_hot(labels, n).bool()  # [B, C]
        counts = torch.stack([loss.detach().sum(), torch.tensor(float(len(labels)), device=loss.device),
                              (choice == labels).sum().float()])
        per_label = torch.cat([(predicted & actual).sum(0), (predicted & ~actual).sum(0), (~predicted & actual).sum(0)])
        return loss.mean(), torch.cat([counts.double(), per_label.double()])

    def train_metrics_from(self, sums: list[float]) -> dict[str, float]:
        return {"accuracy": sums[2] / max(sums[1], 1.0)}

    def eval_metrics_from(self, sums: list[float]) -> dict[str, float]:
        n = len(self.labels)
        tp, fp, fn = sums[3:3 + n], sums[3 + n:3 + 2 * n], sums[3 + 2 * n:3 + 3 * n]
        rows = max(sums[1], 1.0)
        return {"eval_loss": sums[0] / rows, "eval_accuracy": sums[2] / rows, "eval_macro_f1": macro_f1(tp, fp, fn)}
