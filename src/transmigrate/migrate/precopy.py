"""When to stop pre-copying: P.Haul's policy, as one small readable rule.

Each pre-dump copies the pages dirtied since the previous one while the
service runs. Iterating pays while the dirty set shrinks; once it is small, or
stops shrinking, the final dump should be taken.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PreCopyPolicy"]


@dataclass(frozen=True)
class PreCopyPolicy:
    max_iterations: int = 8
    """Never more pre-dumps than this."""
    small_enough_pages: int = 64
    """A dirty set this small costs nothing to copy while frozen."""
    min_shrink: float = 0.10
    """A dirty set that shrank by less than this fraction has stopped converging."""

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
