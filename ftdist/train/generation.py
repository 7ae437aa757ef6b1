"""Task metrics from generation (`eval.generate`): greedy decoding of held-out prompts in batches, scored against the
reference answers by built-in metrics (exact match, contains, regex) and a user function. Each rank decodes its
shard; under ZeRO-3 the ranks stay in step (transformers' `synced_gpus`: a rank that is done keeps joining the
parameter gathers until every rank is), and the metric sums all-reduce like every other eval metric."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ftdist.errors import SpecError, last_line
from ftdist.spec import JobSpec
from ftdist.spec.job import GenerateSpec, RegexMetric
from ftdist.train.data import RowError, Tokenize, json_object, read_rows
from ftdist.train.objectives.pairs import read_pair


@dataclass
class Prompt:
    ids: list[int]
    reference: str


def load_metric_function(spec: GenerateSpec) -> Optional[Callable[[str, str], float]]:
    """The user's metric `module:function` or `file.py:function`; SpecError (one line) when it cannot be used."""
    if not spec.function:
        return None
    where, name = spec.function.rsplit(":", 1)
    key = "eval.generate.function"
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise SpecError(f"{key}: {where}: no such file")
            mod_spec = importlib.util.spec_from_file_location(f"ftdist_user_metric_{abs(hash(where))}", where)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except SpecError:
        raise
    except ModuleNotFoundError as e:
        raise SpecError(f"{key}: {spec.function}: no module named {e.name!r} on this Python path") from None
    except Exception as e:  # noqa: BLE001  (the user's module fails at import)
        raise SpecError(f"{key}: {spec.function}: importing it failed ({type(e).__name__}: {last_line(e)})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SpecError(f"{key}: {spec.function}: {where} has no function {name!r}")
    return fn


def _regex_score(metric: RegexMetric, prediction: str, reference: str) -> float:
    pattern = re.compile(metric.regex)
    found = pattern.search(prediction)
    if pattern.groups == 0:
        return float(found is not None)
    want = pattern.search(reference)
    return float(found is not None and want is not None and found.group(1).strip() == want.group(1).strip())


def score(spec: GenerateSpec, prediction: str, reference: str, user: Optional[Callable] = None) -> list[float]:
    """One prompt's score under each metric, in GenerateSpec.metric_names order."""
    out = []
    for m in spec.metrics:
        if m == "exact_match":
            out.append(float(prediction.strip() == reference.strip()))
        elif m == "contains":
            out.append(float(reference.strip() in prediction))
        else:
            out.append(_regex_score(m, prediction, reference))
    if user is not None:
        try:
            out.append(float(user(prediction, reference)))
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"eval.generate.function {spec.function} failed on a prediction: "
                               f"{type(e).__name__}: {last_line(e)}") from None
    return out


def _last_assistant(messages: list) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], dict) and messages[i].get("role") == "assistant":
            return i
    raise RowError("conversation has no assistant message (its last one is the reference answer)")


def prompt_of(row: Any, job: JobSpec, tok: Tokenize) -> Prompt:
    """A row's prompt tokens (as training renders them, before the answer) and its reference answer."""
    data = job.data
    if job.objective == "dpo":
        prompt, chosen, _ = read_pair(row, prompt_required=True)
        if isinstance(chosen, str):
            return Prompt(tok.bos + tok.encode(prompt), chosen)
        return Prompt(tok.render(prompt, gen_prompt=True), chosen[_last_assistant(chosen)]["content"])
    row = json_object(row)
    if data.format == "chat":
        messages = row.get(data.messages_field)
        if not isinstance(messages, list) or not messages:
            raise RowError(f"field {data.messages_field!r} must be a non-empty list of messages")
        i = _last_assistant(messages)
        return Prompt(tok.render(messages[:i], gen_prompt=True) if i else tok.bos, messages[i]["content"])
    for field in (data.prompt_field, data.completion_field):
        if not isinstance(row.get(field), str):
            raise RowError(f"field {field!r} must be a string")
    return Prompt(tok.bos + tok.encode(row[data.prompt_field]), row[data.completion_field])


def load_prompts(job: JobSpec, tokenizer: Any) -> list[Prompt]:
    """The first max_prompts rows of eval.generate.data (default data.eval); a bad row is a file:line error."""
    gen = job.eval.generate
    tok = Tokenize(tokenizer, job.data.model_copy(update={"format": "chat"}) if job.data.chat_template else job.data)
    out = []
    for r in read_rows(gen.data or job.data.eval)[:gen.max_prompts]:
        try:
            out.append(prompt_of(r.data, job, tok))
        except RowError as e:
            raise SpecError(f"{r.where}: bad row for eval.generate: {e}") from None
    return out


def greedy_generate(model: Any, prompts: list[list[int]], pad_id: int, eos_id: Optional[int], max_new_tokens: int,
                    synced: bool = False) -> list[list[int]]:
    """The new tokens of each prompt, decoded greedily in one batch (left-padded: every row's last prompt token at
    the same position, so generation appends to all of them at once)."""
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos_id, synced_gpus=synced)
    new = out[:, width:].tolist()
    cut = []
    for row in new:  # up to (not including) the first EOS; the padding generate adds after it goes too
        end = row.index(eos_id) if eos_id is not None and eos_id in row else len(row)
        cut.append(row[:end])
    return cut


class GenerationEval:
    """eval.generate inside the workers: this rank's share of the prompts, batched by optim.micro_batch_size."""

    def __init__(self, job: JobSpec, tokenizer: Any, rank: int, world: int) -> None:
        self.spec = job.eval.generate
        self.tokenizer, self.rank, self.world = tokenizer, rank, world
        self.prompts = load_prompts(job, tokenizer)
        self.user = load_metric_function(self.spec)
        self.batch = job.optim.micro_batch_size
        self.synced = job.zero.stage == 3  # partitioned parameters: every rank joins every forward
        per_rank = math.ceil(len(self.prompts) / world)
        self.shard = self.prompts[rank * per_rank:(rank + 1) * per_rank]
        self.n_batches = math.ceil(per_rank / self.batch)

    def due(self, step: int, last: bool) -> bool:
        every = self.spec.every_n_steps
        return step == 0 or last or (every is not None and step % every == 0)

    def __call__(self, model: Any, device: Any) -> dict[str, float]:
        tok = self.tokenizer
        sums = torch.zeros(1 + len(self.spec.metric_names), dtype=torch.float64)
        for b in range(self.n_batches):
            batch = self.shard[b * self.batch:(b + 1) * self.batch]
            # A rank with a short shard decodes a stand-in prompt, uncounted, so ZeRO-3's gathers stay in step.
            todo = batch or self.prompts[:1]
            new = greedy_generate(model, [p.ids for p in todo], tok.pad_token_id, tok.eos_token_id,
                                  self.spec.max_new_tokens, self.synced)
            for p, ids in zip(batch, new):
                text = tok.decode(ids, skip_special_tokens=True)
                sums += torch.tensor([1.0, *score(self.spec, text, p.reference, self.user)], dtype=torch.float64)
        sums = sums.to(device)
        if dist.is_initialized():
            dist.all_reduce(sums)
        n, *totals = sums.tolist()
        return {name: t / max(n, 1.0) for name, t in zip(self.spec.metric_names, totals)}
