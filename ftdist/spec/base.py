"""The frozen base of every schema and the cross-field error that names its key. Pure: no torch, ray or I/O."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class FrozenSpec(BaseModel):
    """Every section: immutable, unknown keys rejected, defaults validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class FieldError(ValueError):
    """A cross-field rule broken in a model validator, naming the (dotted, relative to the section) key the message
    is about, so the loader can point at that key's line instead of "(top level)"."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
