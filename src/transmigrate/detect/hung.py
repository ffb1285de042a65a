"""Hung device driver: processes piling up, blocked uninterruptibly in the same place.

A task in D state is normal for a moment (disk I/O); a driver that never wakes
its readers leaves them in D for good, all in the same kernel function. A task
counts once it has been in D continuously for ``min_blocked_ms``; where it
waits is asked once (an unwind of its stack, milliseconds) through
``wait_site``. When ``min_tasks`` such tasks wait in the same function, the
driver hangs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from transmigrate.detect.events import Event, Sample
from transmigrate.introspect.tasks import Task

__all__ = ["HungDriverDetector", "WaitSiteLookup"]

WaitSiteLookup = Callable[[Task], str | None]
"""The kernel function a blocked task waits in, or None if it cannot be told."""


class HungDriverDetector:
    name = "hung-driver"
    needs = frozenset({"tasks"})

    def __init__(self, wait_site: WaitSiteLookup, min_tasks: int = 3,
                 min_blocked_ms: float = 500.0) -> None:
        self.wait_site = wait_site
        self.min_tasks = min_tasks
        self.min_blocked_ns = int(min_blocked_ms * 1e6)
        self._blocked_since: dict[tuple[int, int], int] = {}
        self._sites: dict[tuple[int, int], str | None] = {}
        self._reported: set[str] = set()

    def observe(self, sample: Sample) -> list[Event]:
        assert sample.tasks is not None
        now = sample.monotonic_ns
        blocked = {(t.pid, t.address): t for t in sample.tasks.tasks
                   if t.state == "D" and not t.kernel_thread}
        for key in list(self._blocked_since):
            if key not in blocked:
                del self._blocked_since[key]
                self._sites.pop(key, None)
        sites: Counter[str] = Counter()
        pids: dict[str, list[int]] = {}
        for key, task in blocked.items():
            since = self._blocked_since.setdefault(key, now)
            if now - since < self.min_blocked_ns:
                continue
            if key not in self._sites:
                self._sites[key] = self.wait_site(task)
            site = self._sites[key]
            if site is not None:
                sites[site] += 1
                pids.setdefault(site, []).append(task.pid)
        events = []
        for site, count in sites.items():
            if count >= self.min_tasks and site not in self._reported:
                self._reported.add(site)
                events.append(Event(
                    "hung-driver", now,
                    f"{count} processes blocked uninterruptibly in {site}",
                    {"function": site, "blocked": count, "pids": sorted(pids[site]),
                     "all_blocked": len(blocked)}))
        self._reported &= {s for s, c in sites.items() if c >= self.min_tasks}
        return events
