"""The reference model's log-probabilities for DPO with full or freeze fine-tuning: one no-grad pass with the initial
weights before the first step, each rank scoring every world-th pair (the same number of forward passes on every
rank, so ZeRO-3's gathers stay in step), summed across ranks. Rank 0 stores them in the run folder, keyed by a
fingerprint of the model and the tokenised pairs; a resumed run (whose engine already holds trained weights) and a
re-run of the same job read them back instead of running the pass again."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from ftdist.progress import progress

REFERENCE_FILE = "reference_logps.json"


def fingerprint(model_key: str, splits: dict[str, list]) -> str:
    h = hashlib.sha256(model_key.encode())
    for name, examples in sorted(splits.items()):
        h.update(name.encode())
        for e in examples:
            h.update(json.dumps([e.chosen_ids, e.chosen_labels, e.rejected_ids, e.rejected_labels]).encode())
    return h.hexdigest()


def score(objective: Any, engine: Any, examples: list, micro: int, rank: int, world: int,
          to_device: Callable[[list], dict]) -> torch.Tensor:
    """[N, 2] (chosen, rejected) completion log-probabilities of `examples` under the engine's current weights."""
    n = len(examples)
    mine = list(range(rank, n, world))
    passes = math.ceil(math.ceil(n / world) / micro)  # equal on every rank
    out = torch.zeros(n, 2, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for i in progress(range(passes), passes, "reference log-probabilities (batches)", show=rank == 0,
                          stream=sys.stdout):
            idx = mine[i * micro:(i + 1) * micro]
            batch = [examples[j] for j in idx] or examples[:1]  # a short rank still joins ZeRO-3's gathers
            logps = objective.logps(engine, to_device(batch))[0].double().cpu()
            b = len(batch)
            if idx:
                out[idx] = torch.stack([logps[:b], logps[b:]], dim=1)
    engine.train()
    if dist.is_initialized():
        device_out = out.to(engine.device)
        dist.all_reduce(device_out)  # each pair was scored by exactly one rank
        out = device_out.cpu()
    return out


def attach_reference(objective: Any, engine: Any, splits: dict[str, list], store: Any, model_key: str, rank: int,
                     world: int, micro: int, to_device: Callable[[list], dict], say: Callable[[str], None]) -> bool:
    """Set each example's `reference` from the run folder's stored pass or from a new pass (stored by rank 0).
    Returns whether a pass ran."""
    key = fingerprint(model_key, splits)
    stored = store.get_bytes(REFERENCE_FILE)
    data = json.loads(stored) if stored else None
    ran = data is None or data.get("fingerprint") != key
    if dist.is_initialized():  # every rank takes the same branch: the pass is collective
        flag = torch.tensor([float(ran)], device=engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        ran = bool(flag.item())
    if ran:
        t0 = time.perf_counter()
        data = {"fingerprint": key, **{name: score(objective, engine, ex, micro, rank, world, to_device).tolist()
                                       for name, ex in splits.items()}}
        if rank == 0:
            store.put_bytes(REFERENCE_FILE, json.dumps(data).encode())
        pairs = sum(len(ex) for ex in splits.values())
        say(f"[ftdist] reference log-probabilities: {pairs} pairs scored in {time.perf_counter() - t0:.1f} s, "
            f"stored in the run folder ({REFERENCE_FILE})")
    else:
        say(f"[ftdist] reference log-probabilities: reused from the run folder ({REFERENCE_FILE})")
    for name, examples in splits.items():
        set_references(examples, data[name])
    return ran


def set_references(examples: Any, scores: list) -> None:
    """Give each pair its reference (chosen, rejected) log-probabilities, as `score` lists them: a column beside a
    prepared table's stored ones (its examples are decoded at each access), or set on each in-memory example."""
    if hasattr(examples, "overlay"):
        examples.overlay["reference"] = np.asarray(scores, dtype=np.float64).reshape(len(examples), 2)
        return
    for e, (c, r) in zip(examples, scores):
        e.reference = (c, r)
