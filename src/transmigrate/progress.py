"""Progress reporting: lower layers say what they are doing, the interface renders it."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]
"""Called with one short line per step of a long operation."""


def silent(message: str) -> None:
    """The progress sink for callers that do not show progress."""
