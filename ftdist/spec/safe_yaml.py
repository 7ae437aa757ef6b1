"""Job-file YAML, read defensively: bytes -> (data, line of every key), or one SpecError line naming file:line.

PyYAML's SafeLoader is safe from code execution but not from the rest of what a hand-edited or generated file can
hold, so this module bounds it: a size cap (a job file is a few KB), no recursive aliases (PyYAML builds a
self-containing list and `validate` ended in a RecursionError), a cap on what aliases expand to (a 2 KB "billion
laughs" file otherwise takes minutes and gigabytes), a nesting-depth cap (the composer recurses), duplicate keys
refused (YAML says keys are unique; PyYAML silently keeps the last), and every failure pointed at its line: an
unclosed quote at the line where it opens, a NUL or non-UTF-8 byte at its own line. Pure: no torch, Ray or network.
"""

from __future__ import annotations

from typing import Any

import yaml

from ftdist.errors import SpecError

MAX_BYTES = 1_000_000
"""A job file is a few KB; a 5 MB one took PyYAML a minute to parse."""
MAX_NODES = 100_000
"""Values after alias expansion: far above any job (a large sweep space has hundreds), far below a bomb."""
MAX_DEPTH = 64
"""Nesting depth; PyYAML's composer recurses per level."""

_ALLOWED_CONTROL = {"\t", "\n", "\r"}


def parse_job_yaml(raw: bytes, source: str) -> tuple[Any, dict]:
    """(data, {key path tuple: line}) of a YAML job file's bytes."""
    if len(raw) > MAX_BYTES:
        raise SpecError(f"{source}: {len(raw) / 1e6:.1f} MB is too large for a job file (at most "
                        f"{MAX_BYTES // 1_000_000} MB; data belongs in data.train)")
    text = _decode(raw, source)
    _check_characters(text, source)
    _check_flow_depth(text, source)
    loader = yaml.SafeLoader(text)
    try:
        node = _compose(loader, source)
        if node is None:
            return None, {}
        _check_shape(node, source)
        _check_expansion(node, source)
        lines: dict = {}
        _walk(node, (), lines, source)
        return loader.construct_document(node), lines
    except yaml.YAMLError as e:
        raise SpecError(_describe(e, source)) from None
    finally:
        loader.dispose()


def parse_yaml_value(raw: str) -> Any:
    """A `--set` value as YAML (`3e-4`, `[1, 2]`, `true`), under the same limits; a string if it is not YAML."""
    if not raw.strip():
        return None
    try:
        data, _ = parse_job_yaml(raw.encode(), "--set")
    except SpecError:
        return raw
    return data


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise SpecError(f"{source}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {col}; save the job "
                        f"file as UTF-8)") from None


def _check_characters(text: str, source: str) -> None:
    for lineno, line in enumerate(text.split("\n"), 1):
        bad = next((c for c in line if (ord(c) < 32 and c not in _ALLOWED_CONTROL) or ord(c) == 0x7F), None)
        if bad is not None:
            raise SpecError(f"{source}:{lineno}: control character U+{ord(bad):04X} at column {line.index(bad) + 1} "
                            f"(not allowed in YAML)")


def _check_flow_depth(text: str, source: str) -> None:
    """Refuse `[[[[...` / `{{{{...` nested past MAX_DEPTH before PyYAML sees it: its scanner is quadratic in the
    flow depth (5,000 brackets took 19 s) and its composer recurses per level. Counts brackets even inside quoted
    strings, which can only over-count: a real job never comes near the limit either way."""
    depth = 0
    for lineno, line in enumerate(text.split("\n"), 1):
        for ch in line:
            if ch in "[{":
                depth += 1
                if depth > MAX_DEPTH:
                    raise SpecError(f"{source}:{lineno}: malformed YAML: nested more than {MAX_DEPTH} levels deep")
            elif ch in "]}" and depth:
                depth -= 1


def _compose(loader: yaml.SafeLoader, source: str) -> Any:
    try:
        return loader.get_single_node()
    except RecursionError:
        raise SpecError(f"{source}: malformed YAML: nested more than {MAX_DEPTH} levels deep") from None


def _check_shape(root: yaml.Node, source: str) -> None:
    """Refuse recursion (a node reached again below itself) and nesting deeper than MAX_DEPTH; each distinct node
    is visited once, however often aliases repeat it."""
    done: set = set()

    def visit(node: yaml.Node, on_path: set, depth: int) -> None:
        if id(node) in on_path:
            raise SpecError(f"{source}:{node.start_mark.line + 1}: malformed YAML: recursive alias (an anchor used "
                            f"inside itself)")
        if depth > MAX_DEPTH:
            raise SpecError(f"{source}:{node.start_mark.line + 1}: malformed YAML: nested more than {MAX_DEPTH} "
                            f"levels deep")
        if id(node) in done or not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            return
        on_path.add(id(node))
        for child in _children(node):
            visit(child, on_path, depth + 1)
        on_path.discard(id(node))
        done.add(id(node))

    visit(root, set(), 0)


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _walk(node: yaml.Node, prefix: tuple, out: dict, source: str) -> None:
    """Record the line of every key path and refuse duplicate keys (after _check_expansion: the expansion is
    bounded, so walking every use of an aliased node is too)."""
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                continue  # a list or mapping as a key: the constructor refuses it with its line
            if k.value != "<<":
                if k.value in first:
                    raise SpecError(f"{source}:{k.start_mark.line + 1}: duplicate key {_key_path(prefix, k.value)} "
                                    f"(first on line {first[k.value]}; YAML keys are unique)")
                first[k.value] = k.start_mark.line + 1
            key = prefix + (k.value,)
            out.setdefault(key, k.start_mark.line + 1)
            _walk(v, key, out, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.setdefault(prefix + (i,), v.start_mark.line + 1)
            _walk(v, prefix + (i,), out, source)


def _key_path(prefix: tuple, key: Any) -> str:
    return ".".join(str(p) for p in (*prefix, key))


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases expand to more than MAX_NODES values (sizes memoised per node: linear in
    the nodes as written, however many times aliases repeat them)."""
    sizes: dict = {}

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        s = min(1 + sum(size(c) for c in _children(n)), MAX_NODES + 1)
        sizes[id(n)] = s
        return s

    if size(root) <= MAX_NODES:
        return
    # Point at the outermost key whose value alone is too large: where the bomb is.
    node, line = root, root.start_mark.line + 1
    while isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        children = [(v, (k.start_mark.line + 1)) for k, v in node.value] if isinstance(node, yaml.MappingNode) else \
            [(v, v.start_mark.line + 1) for v in node.value]
        big = next(((c, ln) for c, ln in children if size(c) > MAX_NODES // 2), None)
        if big is None:
            break
        node, line = big
    raise SpecError(f"{source}:{line}: malformed YAML: aliases expand to more than {MAX_NODES} values (an alias "
                    f"bomb?)")


def _describe(e: yaml.YAMLError, source: str) -> str:
    """One line for a PyYAML error, at the line that explains it: where an unclosed quote or bracket opened (the
    context), not the end of the file where the scanner noticed."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    mark = getattr(e, "problem_mark", None)
    ctx_mark = getattr(e, "context_mark", None)
    if ctx_mark is not None and "end of stream" in problem:
        mark, problem = ctx_mark, f"{context} that is never closed"
    elif context and ctx_mark is not None and mark is not None and ctx_mark.line != mark.line:
        problem = f"{problem} ({context} from line {ctx_mark.line + 1})"
    elif context:
        problem = f"{problem} ({context})"
    where = f"{source}:{mark.line + 1}" if mark is not None else source
    return f"{where}: malformed YAML: {problem}"
