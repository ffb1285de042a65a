"""When to stop pre-copying, and when to leave the rest to post-copy: P.Haul's policy.

Each pre-dump copies the pages dirtied since the previous one while the
service runs. Iterating pays while the dirty set shrinks; once it is small, or
stops shrinking, the final dump should be taken. If it stopped shrinking while
still large (the service dirties memory faster than it can be copied), copying
it while frozen would cost downtime in proportion: then the final dump leaves
memory where it is and the target fetches it after the service runs there
(post-copy, CRIU's lazy pages).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["CopyMode", "PreCopyPolicy"]


class CopyMode(StrEnum):
    """How memory goes. A migration starts with the operator's choice; the precheck
    narrows it to what both kernels can do, and pre-copy settles ``AUTO``."""

    AUTO = "auto"
    """Pre-copy, then post-copy if pre-copy does not converge."""
    PRE = "pre"
    """Pre-copy only: the rest is copied while frozen."""
    POST = "post"
    """Post-copy only: the target fetches memory after the service runs there."""
    STOP = "stop"
    """Stop-and-copy: everything is copied while frozen."""

    @property
    def label(self) -> str:
        """What the reports call it: "pre-copy", "post-copy", "stop-and-copy"."""
        return {"auto": "pre-copy", "pre": "pre-copy", "post": "post-copy",
                "stop": "stop-and-copy"}[self.value]

    @property
    def precopies(self) -> bool:
        return self in (CopyMode.AUTO, CopyMode.PRE)

    @property
    def lazy(self) -> bool:
        """The final dump leaves private memory to be fetched lazily (post-copy)."""
        return self is CopyMode.POST


@dataclass(frozen=True)
class PreCopyPolicy:
    max_iterations: int = 8
    """Never more pre-dumps than this."""
    small_enough_pages: int = 256
    """A dirty set this small (1 MiB) costs nothing to copy while frozen: tens of ms,
    where one more pre-dump costs the guest ~1.5 s under TCG (a parasite in every task,
    each frozen for a moment)."""
    min_shrink: float = 0.10
    """A dirty set that shrank by less than this fraction has stopped converging."""
    postcopy_above_pages: int = 4096
    """A dirty set still larger than this (16 MiB) when pre-copy stops goes by post-copy."""

    def should_continue(self, pages_written: list[int]) -> bool:
        """Whether to pre-dump again, given the pages each pre-dump so far wrote."""
        if not pages_written:
            return True
        if len(pages_written) >= self.max_iterations:
            return False
        last = pages_written[-1]
        if last <= self.small_enough_pages:
            return False
        stalled = len(pages_written) >= 2 and last > pages_written[-2] * (1 - self.min_shrink)
        return not stalled

    def should_postcopy(self, pages_written: list[int]) -> bool:
        """Whether pre-copy, now stopped, left too much to copy while frozen."""
        return bool(pages_written) and pages_written[-1] > self.postcopy_above_pages
