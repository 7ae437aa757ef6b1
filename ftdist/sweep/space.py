"""A sweep before any trial runs: the trial's job (the sweep's spec with the trial's values), validation of the
`sweep:` section against the job schema, how many trials fit at once, and where the sweep lives in storage.
Needs no Ray."""

from __future__ import annotations

import importlib.util
import math
import typing
from typing import Any

from pydantic import BaseModel

from ftdist.errors import SpecError
from ftdist.spec import JobSpec, LoraSpec, with_overrides
from ftdist.train.contracts import (EVAL_METRICS, OBJECTIVE_EVAL_METRICS, OBJECTIVE_TRAIN_METRICS,
                                     reported_metrics)

TRAIN_PREFIX = "train-"
TRIAL_PREFIX = "trial-"
REPORT_DIR = "report"


def sweep_dir(spec: JobSpec) -> str:
    return spec.run_dir


# ---------------------------------------------------------------------------------------------------------------
# Trial specs and validation (before any trial starts; no Ray needed)


def trial_overrides(spec: JobSpec, params: dict[str, Any]) -> dict[str, Any]:
    ov = dict(params)
    sw = spec.sweep
    if sw is not None and sw.alpha_per_rank is not None:
        rank = ov.get("lora.rank", (spec.lora or LoraSpec()).rank)
        ov["lora.alpha"] = float(sw.alpha_per_rank * rank)
    return ov


def trial_spec(spec: JobSpec, params: dict[str, Any], trial_id: str) -> JobSpec:
    """The job a trial runs: the sweep's spec + the trial's values, its own run folder inside the sweep folder, no
    per-trial export (the best trial is exported once, at the end), its tracking run in the sweep's experiment."""
    ov = trial_overrides(spec, params)
    ov.update({"name": f"{TRAIN_PREFIX}{trial_id}", "checkpoint.storage": sweep_dir(spec), "export.enabled": False,
               "sweep": None})
    if spec.prepared_root is not None:  # the sweep's prepared data (built once before the trials) serves them all
        ov["data.cache"] = spec.prepared_root
    if spec.tracking.mlflow is not None:  # the trials' runs go under the sweep's run, in the sweep's experiment
        ov.update({"tracking.mlflow.experiment": spec.tracking.mlflow.experiment or spec.name,
                   "tracking.mlflow.run_name": f"{spec.name}-{trial_id}"})
    return with_overrides(spec, ov)


def _key_exists(model: Any, parts: list[str]) -> bool:
    field_ = model.model_fields.get(parts[0])
    if field_ is None:
        return False
    if len(parts) == 1:
        return True
    ann = field_.annotation
    for t in (ann, *typing.get_args(ann)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return _key_exists(t, parts[1:])
        if t is dict or typing.get_origin(t) is dict:
            return True  # free-form section (model.from_config)
    return False


def validate_sweep(spec: JobSpec, source: str = "job") -> None:
    """One-line errors for a sweep that cannot work: unknown keys, values that make an invalid job, an empty space,
    a metric the trials do not report, a grid over a continuous range, a scheduler with nothing to act on."""
    sw = spec.sweep
    if sw is None:
        raise SpecError(f"{source}: no sweep section: add sweep.space, e.g. sweep: {{space: {{optim.lr: [1e-4, 3e-4]}}}}")
    if sw.alpha_per_rank is not None and spec.method != "lora" and "method" not in sw.space:
        raise SpecError(f"sweep.alpha_per_rank: needs method lora (this job is {spec.method})")
    if spec.resources.elastic:
        raise SpecError("resources.num_workers: a sweep's trials run at one size each (Tune packs them by it); give "
                        "one number")
    for key, dim in sw.space.items():
        if not _key_exists(JobSpec, key.split(".")):
            raise SpecError(f"sweep.space.{key}: unknown job key")
        for value in dim.corners():
            try:
                with_overrides(spec, {**trial_overrides(spec, {key: value}), "sweep": None})
            except SpecError as e:
                why = str(e).split(": ", 1)[-1]
                raise SpecError(f"sweep.space.{key}: value {value!r} makes an invalid job ({why})") from None
        if sw.search == "grid" and dim.values is None:
            raise SpecError(f"sweep.space.{key}: grid search needs a list of values (choice or grid), not {dim.kind}")
        if sw.search == "optuna" and dim.grid is not None:
            raise SpecError(f"sweep.space.{key}: optuna search samples; use choice instead of grid")
    known = reported_metrics(spec)
    if sw.metric not in known:
        owners = [o for o in OBJECTIVE_EVAL_METRICS
                  if sw.metric in OBJECTIVE_TRAIN_METRICS[o] + OBJECTIVE_EVAL_METRICS[o]]
        hint = ""
        if sw.metric in OBJECTIVE_EVAL_METRICS[spec.objective]:
            hint = " (eval metrics need data.eval or data.eval_fraction)"
        elif owners:
            hint = f" (objective {owners[0]} reports it; this job's objective is {spec.objective})"
        raise SpecError(f"sweep.metric: {sw.metric!r} is not reported by the trials{hint}; they report {', '.join(known)}")
    if sw.scheduler.type == "asha":
        evaluated = sw.metric in EVAL_METRICS or sw.metric in (r.metric for r in spec.eval.reference)
        if evaluated and spec.eval.every_n_steps is None:
            raise SpecError(f"sweep.scheduler: asha compares trials on {sw.metric} while they run; set "
                            f"eval.every_n_steps (now eval runs only at the end)")
        gen = spec.eval.generate
        if gen is not None and sw.metric in gen.metric_names and (gen.every_n_steps is None
                                                                    or spec.eval.every_n_steps is None):
            raise SpecError(f"sweep.scheduler: asha compares trials on {sw.metric} while they run; set "
                            "eval.generate.every_n_steps and eval.every_n_steps (now generation runs at step 0 and "
                            "at the end)")
        if spec.optim.max_steps is None:
            raise SpecError("sweep.scheduler: asha needs optim.max_steps (its time axis is the optimizer step)")
    if sw.max_trials is not None and sw.search == "grid":
        n = grid_size(spec) * sw.num_samples
        if n > sw.max_trials:
            raise SpecError(f"sweep.max_trials: the grid has {n} trials (x num_samples), more than max_trials "
                            f"{sw.max_trials}")
    if sw.search == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise SpecError("sweep.search: optuna is not installed (pip install optuna)")


def grid_size(spec: JobSpec) -> int:
    n = 1
    for dim in spec.sweep.space.values():
        if dim.grid is not None or spec.sweep.search == "grid":
            n *= len(dim.values)
    return n


def num_samples(spec: JobSpec) -> int:
    """Tune's num_samples: how often the grid (the product of grid dimensions) is sampled."""
    sw = spec.sweep
    return sw.num_samples if sw.max_trials is None or sw.search == "grid" else min(sw.num_samples, sw.max_trials)


def trial_count(spec: JobSpec) -> int:
    """Trials the sweep runs: every grid point, num_samples times (Tune's semantics)."""
    return grid_size(spec) * num_samples(spec)


def trial_cost(spec: JobSpec) -> tuple[float, float]:
    return spec.resources.cpus, spec.resources.gpus


def concurrency(spec: JobSpec, cluster: dict) -> int:
    """Trials at once, so that every running trial's workers fit on the cluster at the same time (a trial whose
    workers cannot be placed would otherwise sit holding its Tune slot while others wait: the starvation of
    `max_concurrent_trials` set by hand). The trial driver and the Train controller take no CPU."""
    cpus, gpus = trial_cost(spec)
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    n = math.floor(have_cpu / cpus + 1e-9) if cpus else 10**6
    if gpus:
        n = min(n, math.floor(have_gpu / gpus + 1e-9))
    if n < 1:
        raise SpecError(f"resources: one trial needs {cpus:g} CPUs and {gpus:g} GPUs ({spec.resources.num_workers} "
                        f"workers); the cluster has {have_cpu:g} CPUs and {have_gpu:g} GPUs")
    cap = spec.sweep.max_concurrent_trials
    return min(n, cap) if cap else n
