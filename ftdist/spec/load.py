"""Loading a job: YAML with the line of every key, `--set` overrides, paths relative to the job file, one-line
errors (file:line: key: message). Pure apart from reading the job file: no torch, ray or deepspeed."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import ValidationError

from ftdist.errors import SpecError
from ftdist.spec.base import FieldError
from ftdist.spec.job import METHOD_SECTIONS, JobSpec
from ftdist.storage.uri import is_remote

# ---------------------------------------------------------------------------------------------------------------
# Loading: YAML with line numbers, relative paths, --set overrides.


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records the line of every mapping key path."""


def _compose_lines(node: yaml.Node, prefix: tuple, out: dict) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = prefix + (k.value,)
            out[key] = k.start_mark.line + 1
            _compose_lines(v, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[prefix + (i,)] = v.start_mark.line + 1
            _compose_lines(v, prefix + (i,), out)


def _parse_yaml(text: str, source: str) -> tuple[Any, dict]:
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{where}: malformed YAML: {problem}") from None
    lines: dict = {}
    if node is not None:
        _compose_lines(node, (), lines)
    return data, lines


def _format_errors(err: ValidationError, source: str, lines: dict) -> str:
    e = err.errors()[0]
    loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):  # a cross-field rule: point at the field it names, not at its section
        loc = loc + tuple(int(p) if p.isdigit() else p for p in cause.key.split("."))
    # The deepest located prefix gives the line (a missing key has none of its own: its section's line).
    line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
    key = ".".join(str(x) for x in loc) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required key is missing"
    where = f"{source}:{line}" if line else source
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {key}: {msg}{more}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], YAML-parsed value)."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected key.path=value")
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise SpecError(f"--set {item!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


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


def _resolve_paths(data: dict, base: Path) -> dict:
    """Data and model paths are relative to the job file's folder; checkpoint.storage to the cwd."""

    def fix(v: Optional[str], must_look_local: bool = True) -> Optional[str]:
        if v is None or "://" in v or os.path.isabs(v) or v.startswith("~"):
            return v
        cand = base / v
        # Hub ids look like relative paths ("org/model"); only rewrite those that exist next to the file.
        if must_look_local or cand.exists() or v.startswith("."):
            return str(cand.resolve())
        return v

    out = dict(data)
    if isinstance(out.get("data"), dict):
        d = dict(out["data"])
        for k in ("train", "eval"):
            if isinstance(d.get(k), str):
                d[k] = fix(d[k])
        out["data"] = d
    if isinstance(out.get("model"), dict):
        m = dict(out["model"])
        for k in ("name_or_path", "tokenizer"):
            if isinstance(m.get(k), str):
                m[k] = fix(m[k], must_look_local=False)
        out["model"] = m
    return out


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
    if not p.is_file():
        raise SpecError(f"{path}: job file not found")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read job file ({e.__class__.__name__})") from None
    data, lines = _parse_yaml(text, str(path))
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
    data, _ = _parse_yaml(Path(path).read_text(), str(path))
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
        if val:
            yield f"{section}.{key}", (written if isinstance(written, str) else None), val


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
    for key, val in (("data.train", spec.data.train), ("data.eval", spec.data.eval)):
        if val and not is_remote(val) and not os.path.exists(val):
            out.append((key, val, "no such file or directory"))
    m = spec.model
    for key, val in (("model.name_or_path", m.name_or_path), ("model.tokenizer", m.tokenizer)):
        if not val or is_remote(val):
            continue
        looks_local = os.path.isabs(val) or val.startswith((".", "~"))
        if looks_local and not os.path.isdir(os.path.expanduser(val)):
            out.append((key, val, "no such directory"))
    return out


def check_local_inputs(spec: JobSpec) -> None:
    """Fail early (before Ray starts) on local files that do not exist."""
    for key, val, problem in missing_local_inputs(spec):
        raise SpecError(f"{key}: {val}: {problem}")
