"""The frozen base of every schema and the cross-field error that names its key. Pure: no torch, ray or I/O."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class FrozenSpec(BaseModel):
    """Every section: immutable, unknown keys rejected, defaults validated, no infinities or NaNs, and no YAML
    boolean taken for a number (`zero.stage: yes` would otherwise be stage 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, bool) and info.field_name and not _accepts_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"got the YAML boolean {str(v).lower()} (yes/no/on/off/true/false are booleans); give "
                             f"a value of the key's type")
        return v


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field's type admits a boolean as such (bool, Any, or a union/Literal holding one)."""
    if annotation is bool or annotation is Any:
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return any(isinstance(a, bool) for a in args)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts_bool(a) for a in args)
    return False


class FieldError(ValueError):
    """A cross-field rule broken in a model validator, naming the (dotted, relative to the section) key the message
    is about, so the loader can point at that key's line instead of "(top level)"."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
