"""User-facing error type: the CLI prints it as one line and exits 2; and the "did you mean" its messages offer."""

from __future__ import annotations

import difflib
from typing import Iterable


class SpecError(ValueError):
    """A mistake in user input (job file, data file, URI, address). Message names the key, file or line."""


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """" (did you mean X?)" for the closest of `known` (difflib's default similarity), or ""."""
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def last_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message in one line: its last line (where wrapped errors name the real one), else its type."""
    text = str(e).strip()
    return text.splitlines()[-1][:limit] if text else type(e).__name__
