"""Loading a job: YAML with the line of every key, `--set` overrides, paths relative to the job file, one-line
errors (file:line: key: message). Pure apart from reading the job file: no torch, ray or deepspeed."""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Union

from pydantic import BaseModel, ValidationError

from ftdist.errors import SpecError, did_you_mean
from ftdist.redact import key_hint
from ftdist.spec.base import FieldError
from ftdist.spec.job import METHOD_SECTIONS, JobSpec
from ftdist.spec.safe_yaml import parse_job_yaml, parse_yaml_value
from ftdist.storage.uri import is_remote, location_problem

# ---------------------------------------------------------------------------------------------------------------
# Loading: YAML with line numbers, relative paths, --set overrides.


def _read_job_file(path: Union[str, Path]) -> tuple[Any, dict]:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{path}: job file not found" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SpecError(f"{path}: cannot read job file ({e.strerror or e.__class__.__name__})") from None
    return parse_job_yaml(raw, str(path))


def _format_errors(err: ValidationError, source: str, lines: dict) -> str:
    errors = err.errors()
    # A value that may be a string or a list (data.train: a path, or a mixture's sources) fails as both; the "not a
    # string" half says nothing about a list the user wrote: the other half's error is the one to show.
    errors = [x for x in errors if x["type"] != "string_type" or x["loc"][-1] != "str"] or errors
    # An unknown key explains a missing one beside it (`trian:` for `train:`): say it first.
    e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and (x.startswith("function-") or x == "str"
                                                                     or x.startswith("list["))))
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):  # a cross-field rule: point at the field it names, not at its section
        loc = loc + tuple(int(p) if p.isdigit() else p for p in cause.key.split("."))
    # The deepest located prefix gives the line (a missing key has none of its own: its section's line).
    line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
    key = ".".join(str(x) for x in loc) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key" + did_you_mean(str(loc[-1]), _known_keys(JobSpec, loc[:-1]))
    elif e["type"] == "missing":
        msg = "required key is missing"
    elif e["type"] == "list_type" and any(isinstance(x, str) and x.startswith("list[") for x in e["loc"]):
        msg = f"expected a path, or a list of sources ({{path, weight, ...}} each), got {_yaml_type(e.get('input'))}"
    elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
        msg = f"expected a mapping of keys (a section), got {_yaml_type(e.get('input'))}"
    where = f"{source}:{line}" if line else source
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {key}: {msg}{more}"


def _yaml_type(value: Any) -> str:
    return {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list",
            dict: "a mapping", type(None): "nothing"}.get(type(value), type(value).__name__)


def _known_keys(model: Any, loc: tuple) -> list[str]:
    """The keys a section accepts at `loc` (a path of section names, dict keys and list indexes) in the schema."""
    tp: Any = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return []
            tp = field.annotation
        elif typing.get_origin(tp) in (dict, list):
            tp = typing.get_args(tp)[-1]
        else:
            return []
    tp = _unwrap(tp)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _unwrap(tp: Any) -> Any:
    """Optional[X] / Union[X, ...] -> the first model or container in it."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if (isinstance(a, type) and issubclass(a, BaseModel)) or typing.get_origin(a) in (dict, list):
                return a
    return tp


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], YAML-parsed value). Errors never quote the item: a malformed one may be a
    secret typed in the wrong place (`--set kubernetes.env.HF_TOKEN:hf_...`)."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise SpecError(f"--set {key_hint(item)}: expected KEY.PATH=VALUE (the value is not shown)")
    parts = key.strip().split(".")
    if not all(parts) or not all(_KEY_SEGMENT_RE.match(p) for p in parts):
        raise SpecError(f"--set {key_hint(key)}: expected KEY.PATH=VALUE with a dotted job key like optim.lr")
    return parts, parse_yaml_value(raw)


_KEY_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Return a copy of the raw job dict with dotted keys set. Unknown keys are caught by validation."""
    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        cur = out
        for p in parts[:-1]:
            nxt = cur.get(p)
            if nxt is None:
                nxt = cur[p] = {}
            elif not isinstance(nxt, dict):
                raise SpecError(f"override {dotted}: {p} is not a section")
            cur = nxt
        cur[parts[-1]] = value
    return out


LOCAL_PATH_KEYS = (("data", "train"), ("data", "eval"), ("model", "name_or_path"), ("model", "tokenizer"))
"""Job keys that may name files on this machine (resolved relative to the job file)."""


_HUB_ID_RE = re.compile(r"^(?:[\w.-]{1,96}/)?[\w.-]{1,96}$")
"""What the Hugging Face hub accepts as a repo id: `name` or `org/name` (huggingface_hub.validate_repo_id)."""


def _resolve_paths(data: dict, base: Path) -> dict:
    """Data and model paths are relative to the job file's folder (`~` is the user's home); checkpoint.storage is
    relative to the cwd."""

    def fix(key: str, v: Optional[str], must_look_local: bool = True) -> Optional[str]:
        if v is None or "://" in v or os.path.isabs(v) or location_problem(v):
            return v  # URIs, absolute paths, and what the schema refuses with its own message
        if v.startswith("~"):
            return os.path.expanduser(v)
        cand = base / v
        # Hub ids look like relative paths ("org/model"); only rewrite those that exist next to the file, start
        # with "." or cannot be hub ids, and refuse a hub-id-looking name that is a typo of a folder beside the job.
        if must_look_local or cand.exists() or v.startswith(".") or not _looks_like_hub_id(v):
            return str(cand.resolve())
        _refuse_near_miss(key, v, base)
        return v

    out = dict(data)
    if isinstance(out.get("data"), dict):
        d = dict(out["data"])
        for k in ("train", "eval"):
            if isinstance(d.get(k), str):
                d[k] = fix(f"data.{k}", d[k])
        if isinstance(d.get("train"), list):  # a mixture: each source's path and eval
            d["train"] = [{**src, **{k: fix(f"data.train.{i}.{k}", src[k]) for k in ("path", "eval")
                                     if isinstance(src.get(k), str)}} if isinstance(src, dict) else src
                          for i, src in enumerate(d["train"])]
        out["data"] = d
    if isinstance(out.get("eval"), dict) and out["eval"].get("reference") is not None:
        e = dict(out["eval"])
        refs = e["reference"]
        refs = [refs] if isinstance(refs, (str, dict)) else refs
        if isinstance(refs, list):
            e["reference"] = [_fix_reference(fix, i, r) for i, r in enumerate(refs)]
        out["eval"] = e
    gen = out.get("eval", {}).get("generate") if isinstance(out.get("eval"), dict) else None
    if isinstance(gen, dict):
        gen = dict(gen)
        if isinstance(gen.get("data"), str):
            gen["data"] = fix("eval.generate.data", gen["data"])
        fn = gen.get("function")
        if isinstance(fn, str) and ".py:" in fn:  # a metric file next to the job file
            path, name = fn.rsplit(":", 1)
            gen["function"] = f"{fix('eval.generate.function', path)}:{name}"
        out["eval"] = {**out["eval"], "generate": gen}
    if isinstance(out.get("model"), dict):
        m = dict(out["model"])
        for k in ("name_or_path", "tokenizer"):
            if isinstance(m.get(k), str):
                m[k] = fix(f"model.{k}", m[k], must_look_local=False)
        out["model"] = m
    return out


def metric_file(gen: Any) -> Optional[str]:
    """The file of an eval.generate.function given as file.py:function (None for module:function)."""
    fn = gen.function
    return fn.rsplit(":", 1)[0] if fn and ".py:" in fn else None


def _fix_reference(fix: Callable[[str, Optional[str]], Optional[str]], i: int, ref: Any) -> Any:
    """An eval.reference entry (a path, or a mapping with one) with its path resolved like data.train's."""
    if isinstance(ref, str):
        return fix(f"eval.reference.{i}", ref)
    if isinstance(ref, dict) and isinstance(ref.get("path"), str):
        return {**ref, "path": fix(f"eval.reference.{i}.path", ref["path"])}
    return ref


def _looks_like_hub_id(v: str) -> bool:
    return bool(_HUB_ID_RE.match(v)) and ".." not in v and "--" not in v and not v.endswith((".", "-", ".git"))


def _refuse_near_miss(key: str, v: str, base: Path) -> None:
    """`tokenizr` beside a `tokenizer/` folder is a typo, not a hub id: say so before Ray fetches from the hub."""
    parent = (base / v).parent
    if not parent.is_dir():
        return
    folders = [p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
    close = difflib.get_close_matches(Path(v).name, folders, n=1, cutoff=0.75)
    if close:
        near = str(Path(v).parent / close[0]) if "/" in v else close[0]
        raise SpecError(f"{key}: {v}: no such folder next to the job file (did you mean {near}?); a Hugging Face "
                        f"hub id would be fetched instead, write ./{v} to mean a local folder")


def spec_from_dict(data: Any, source: str = "<job>", lines: Optional[dict] = None) -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the job file must be a YAML mapping of sections (name, model, data, ...)")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_errors(err, source, lines or {})) from None


def load_spec(path: Union[str, Path], overrides: Optional[list[str]] = None) -> JobSpec:
    """Read, override and validate a job file. Raises SpecError with file:line: key: message."""
    p = Path(path)
    data, lines = _read_job_file(p)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the job file must be a YAML mapping of sections (name, model, data, ...)")
    ov = {".".join(keys): value for keys, value in map(parse_override, overrides or [])}
    data = apply_overrides(data, ov)
    data = _resolve_paths(data, p.parent.resolve())
    return spec_from_dict(data, str(path), lines)


def spec_from_json(text: str, overrides: Optional[list[str]] = None) -> JobSpec:
    """A job given as JSON on the command line (the RayJob entrypoint that `ftdist k8s render` writes)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"--job-json: not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(data, dict):
        raise SpecError("--job-json: the job must be a JSON object of sections (name, model, data, ...)")
    ov = {".".join(keys): value for keys, value in map(parse_override, overrides or [])}
    return spec_from_dict(apply_overrides(data, ov), "--job-json")


def raw_job(path: Union[str, Path], overrides: Optional[list[str]] = None) -> dict:
    """The job file as written plus --set overrides, before path resolution: tells relative paths from absolute."""
    data, _ = _read_job_file(path)
    if not isinstance(data, dict):
        return {}
    return apply_overrides(data, {".".join(keys): value for keys, value in map(parse_override, overrides or [])})


def local_paths(path: Union[str, Path], spec: JobSpec, overrides: Optional[list[str]] = None):
    """(dotted key, value as written in the file or --set, value after resolution) for each LOCAL_PATH_KEYS entry
    that is set: tells paths relative to the job file (this machine only) from absolute paths and hub ids."""
    raw = raw_job(path, overrides)
    for section, key in LOCAL_PATH_KEYS:
        sec = raw.get(section) if isinstance(raw.get(section), dict) else {}
        written, val = sec.get(key), getattr(getattr(spec, section), key, None)
        if isinstance(val, str) and val:
            yield f"{section}.{key}", (written if isinstance(written, str) else None), val
    written_sources = (raw.get("data") or {}).get("train") if isinstance(raw.get("data"), dict) else None
    if isinstance(spec.data.train, list):  # a mixture: each source's path and eval
        for i, src in enumerate(spec.data.train):
            w = written_sources[i] if isinstance(written_sources, list) and i < len(written_sources) else {}
            for k in ("path", "eval"):
                if getattr(src, k):
                    written = w.get(k) if isinstance(w, dict) else None
                    yield f"data.train.{i}.{k}", (written if isinstance(written, str) else None), getattr(src, k)
    written_refs = (raw.get("eval") or {}).get("reference") if isinstance(raw.get("eval"), dict) else None
    written_refs = [written_refs] if isinstance(written_refs, (str, dict)) else (written_refs or [])
    for i, ref in enumerate(spec.eval.reference):
        w = written_refs[i] if i < len(written_refs) else None
        w = w.get("path") if isinstance(w, dict) else w
        yield f"eval.reference.{i}", (w if isinstance(w, str) else None), ref.path
    gen = spec.eval.generate
    written_gen = (raw.get("eval") or {}).get("generate") if isinstance(raw.get("eval"), dict) else None
    written_gen = written_gen if isinstance(written_gen, dict) else {}
    if gen is not None and gen.data:
        yield "eval.generate.data", written_gen.get("data"), gen.data
    if gen is not None and gen.function and ".py:" in gen.function:
        w = written_gen.get("function")
        yield "eval.generate.function", (w.rsplit(":", 1)[0] if isinstance(w, str) else None), metric_file(gen)


def with_overrides(spec: JobSpec, overrides: dict[str, Any]) -> JobSpec:
    """A new validated spec with dotted keys replaced (used by --set and by Tune trials)."""
    data = spec.model_dump(mode="json", exclude_unset=False)
    new_method = overrides.get("method", spec.method)
    if new_method != spec.method and spec.method in METHOD_SECTIONS:
        # The old method's section was filled in with defaults (JobSpec._method_section): it goes with the method,
        # unless the user wrote settings into it (then "lora options are set but method is full" is the answer).
        section = getattr(spec, spec.method)
        if section == type(section)():
            data[spec.method] = None
    return spec_from_dict(apply_overrides(data, overrides), f"overrides {sorted(overrides)}")


def missing_local_inputs(spec: JobSpec) -> list[tuple[str, str, str]]:
    """(key, path, problem) for every local input (data, model, tokenizer folder) that is not on this machine."""
    out = []
    gen = spec.eval.generate
    data_paths = [*spec.data.inputs(),
                  *((f"eval.reference.{i}", r.path) for i, r in enumerate(spec.eval.reference)),
                  ("eval.generate.data", gen.data if gen else None),
                  ("eval.generate.function", metric_file(gen) if gen else None)]
    for key, val in data_paths:
        if val and not is_remote(val) and not os.path.exists(val):
            out.append((key, val, "no such file or directory"))
    m = spec.model
    for key, val in (("model.name_or_path", m.name_or_path), ("model.tokenizer", m.tokenizer)):
        if not val or is_remote(val):
            continue
        looks_local = os.path.isabs(val) or val.startswith((".", "~"))
        folder = os.path.expanduser(val)
        if looks_local and not os.path.isdir(folder):
            out.append((key, val, "no such directory"))
        elif key == "model.name_or_path" and looks_local and not os.path.isfile(os.path.join(folder, "config.json")):
            out.append((key, val, "no config.json here: not a Hugging Face model folder"))
    return out


def check_local_inputs(spec: JobSpec) -> None:
    """Fail early (before Ray starts) on local files that do not exist."""
    for key, val, problem in missing_local_inputs(spec):
        raise SpecError(f"{key}: {val}: {problem}")
