"""`model.from_config` checked against the transformers config class it names, on the driver before Ray starts.

Transformers' configs keep unknown keyword arguments as plain attributes, so `hiden_size: 64` builds a model with the
default hidden size and no complaint. Importing a config class imports torch (about 2 s measured), which is why this
runs in `train`/`tune`'s preflight and not in `ftdist validate`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional

from ftdist.errors import SpecError, did_you_mean
from ftdist.spec import ModelSpec


def check_from_config(model: ModelSpec) -> None:
    """One-line SpecError naming `model.from_config.<key>` for an unknown model type or a key the config class does
    not define."""
    if model.from_config is None:
        return
    from transformers import CONFIG_MAPPING

    cfg = model.from_config
    model_type = str(cfg["model_type"])
    if model_type not in CONFIG_MAPPING:
        raise SpecError(f"model.from_config.model_type: unknown transformers model type {model_type[:60]!r}"
                        f"{did_you_mean(model_type, CONFIG_MAPPING.keys())}")
    cls = CONFIG_MAPPING[model_type]
    known = config_keys(cls)
    if known is None:
        return
    for key in cfg:
        if key != "model_type" and key not in known:
            raise SpecError(f"model.from_config.{key}: not a setting of transformers' {cls.__name__}"
                            f"{did_you_mean(str(key), sorted(known))}")


def config_keys(cls: Any) -> Optional[set]:
    """The settings a config class defines: its dataclass fields (transformers 5), else the keyword arguments of
    every __init__ in its MRO (older releases), plus attribute_map aliases. None when it takes anything."""
    keys: set = set(getattr(cls, "attribute_map", {}) or {})
    if dataclasses.is_dataclass(cls):
        keys |= {f.name for f in dataclasses.fields(cls)}
        return keys
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        keys |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    return keys or None
