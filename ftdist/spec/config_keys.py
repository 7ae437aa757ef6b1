"""The settings a transformers config class defines, read from the installed transformers' source (AST), so that
`ftdist validate` catches a typo in `model.from_config` (`hiden_size`) without importing transformers: importing a
config class imports torch (2.3 s measured), and transformers keeps unknown keyword arguments as plain attributes,
so the typo would otherwise build a model with the default size and no complaint.

Reads transformers 5's layout: `models/auto/auto_mappings.py` (model type -> class name) and dataclass-style config
classes whose fields are annotated class attributes. Whatever it cannot resolve with certainty (an unknown layout, a
base class from another module) answers None, and the driver's preflight (ftdist.train.model_config, which imports
the real class) still checks the job before Ray starts.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path
from typing import Optional

_BASE = "PreTrainedConfig"
_BASE_FILE = "configuration_utils.py"
_BASE_MIXINS = {"PushToHubMixin", "RotaryEmbeddingConfigMixin", "HeterogeneousConfigMixin"}
"""PreTrainedConfig's own bases: no dataclass fields (tests/unit/test_bad_input.py compares with the real class)."""


@functools.lru_cache(maxsize=64)
def config_keys(model_type: str) -> Optional[frozenset]:
    """The keys `model.from_config` may set for this model type, or None when the source cannot say."""
    root = _transformers_dir()
    if root is None:
        return None
    try:
        mappings = _module(root / "models" / "auto" / "auto_mappings.py")
        class_name = _literal(mappings, "CONFIG_MAPPING_NAMES").get(model_type)
        if class_name is None:
            return None
        module = _literal(mappings, "SPECIAL_MODEL_TYPE_TO_MODULE_NAME").get(model_type, model_type.replace("-", "_"))
        keys = _fields(root, root / "models" / module / f"configuration_{module}.py", class_name)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return None
    return frozenset(keys) if keys else None


@functools.lru_cache(maxsize=1)
def model_types() -> Optional[tuple]:
    """The model types transformers knows (None: cannot tell from the source)."""
    root = _transformers_dir()
    if root is None:
        return None
    try:
        return tuple(_literal(_module(root / "models" / "auto" / "auto_mappings.py"), "CONFIG_MAPPING_NAMES"))
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return None


def _transformers_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("transformers")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=64)
def _module(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _literal(module: ast.Module, name: str) -> dict:
    """A module-level `NAME = OrderedDict([...])` or `NAME = {...}` as a dict."""
    for node in module.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            value = node.value
            if isinstance(value, ast.Call) and value.args:  # OrderedDict([...])
                value = value.args[0]
            data = ast.literal_eval(value)
            return dict(data)
    raise KeyError(name)


def _fields(root: Path, path: Path, class_name: str) -> Optional[set]:
    """Annotated (non-ClassVar) attributes and attribute_map aliases of a class and its bases, or None."""
    cls = next((n for n in _module(path).body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if cls is None:
        return None
    keys: set = set()
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if "ClassVar" not in ast.unparse(node.annotation):
                keys.add(node.target.id)
            elif node.target.id == "attribute_map" and node.value is not None:
                keys |= set(ast.literal_eval(node.value))
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "attribute_map"
                                                  for t in node.targets):
            keys |= set(ast.literal_eval(node.value))
    for base in cls.bases:
        name = ast.unparse(base)
        if name in _BASE_MIXINS:
            continue
        if name == _BASE:
            more = _fields(root, root / _BASE_FILE, _BASE)
        elif any(isinstance(n, ast.ClassDef) and n.name == name for n in _module(path).body):
            more = _fields(root, path, name)
        else:
            return None  # a base from another module (or a mixin with fields of its own): not resolved here
        if more is None:
            return None
        keys |= more
    return keys
