"""Waiting for something to become true, with a deadline: one loop for the whole tool.

Every wait in transmigrate has a bound, so that a guest, a QEMU or a client
that never gets there ends in an error that says what was awaited, never in a
hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from transmigrate.errors import TransmigrateError

__all__ = ["Deadline", "wait_for"]

T = TypeVar("T")


class Deadline:
    """A point in monotonic time, for loops that do more than poll one condition."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at


def wait_for(check: Callable[[], T | None], *, timeout: float, what: str,
             interval: float = 0.05, error: type[TransmigrateError] = TransmigrateError,
             ) -> T:
    """Call ``check`` every ``interval`` seconds until it returns something truthy;
    return that. After ``timeout`` seconds raise ``error``: "<what> within N s".

    ``check`` is called at least once, even with a zero timeout, and may raise to
    give up early.
    """
    deadline = Deadline(timeout)
    while True:
        result = check()
        if result:
            return result
        if deadline.expired():
            raise error(f"{what} within {timeout:g} s")
        time.sleep(min(interval, max(deadline.remaining(), 0.001)))
