"""Runaway process creation, and memory running out.

A fork bomb forks *and* its processes pile up; a busy build or a fork-exec
loop forks as fast, but its children exit, so the process count stays flat.
So runaway creation is: the process count grew by at least ``min_growth``
within ``window_ms`` while forks went on at ``min_fork_rate`` per second or
more. The window reaches back to the last sample at or before its start, so
that an interval that does not divide it does not shorten it. Growth, not
speed, is the signal: a bomb throttled to a few forks a second is still a bomb.
Memory exhaustion is free memory below ``min_free_fraction`` of the total, or
below the zones' own low watermarks, whichever is higher.

The culprit of a storm is the forking tree (:func:`forking_tree`): the deepest
process that is, or is an ancestor of, nearly all of the newest processes. The
culprit of memory running out is the biggest grower (:func:`biggest_grower`).
"""

from __future__ import annotations

from collections import deque

from transmigrate.detect.events import Event, Sample
from transmigrate.introspect.counters import Counters, fork_rate
from transmigrate.introspect.tasks import Task, TaskSample

__all__ = ["ForkStormDetector", "MemoryExhaustionDetector", "biggest_grower", "forking_tree"]

MIB = 1024 * 1024
TREE_SHARE = 0.9
"""The share of the newest processes the forking tree must hold: a few processes that
something else started meanwhile do not move the blame up to a common ancestor."""


def forking_tree(sample: TaskSample, newest: int) -> tuple[Task, int] | None:
    """The root of the tree that made the ``newest`` processes (by pid, the order the
    kernel hands them out until pid_max wraps), and how many processes that tree holds
    now; None if no process other than init holds enough of them."""
    processes = {task.pid: task for task in sample.processes if not task.kernel_thread}
    if not processes or newest < 1:
        return None
    new = sorted(processes, reverse=True)[:newest]
    covered: dict[int, int] = {}
    depth: dict[int, int] = {}
    for pid in new:
        chain = _ancestry(processes, pid)
        for level, ancestor in enumerate(reversed(chain)):
            covered[ancestor] = covered.get(ancestor, 0) + 1
            depth[ancestor] = level
    candidates = [pid for pid, count in covered.items()
                  if count >= TREE_SHARE * len(new) and pid != 1]
    if not candidates:
        return None
    root = max(candidates, key=lambda pid: depth[pid])
    size = sum(1 for pid in processes if root in _ancestry(processes, pid))
    return processes[root], size


def biggest_grower(before: dict[int, int], after: dict[int, int]) -> int | None:
    """The process whose resident memory grew most from ``before`` to ``after`` (two looks
    by pid, a moment apart); if none grew, the biggest: memory may have run out just as
    it stopped growing (or as the OOM killer took it)."""
    if not after:
        return None
    return max(after, key=lambda pid: (after[pid] - before.get(pid, after[pid]), after[pid]))


def _ancestry(processes: dict[int, Task], pid: int) -> list[int]:
    """``pid`` and its ancestors up to the first one not in ``processes``; bounded,
    since a torn walk may leave a loop."""
    chain = [pid]
    while (parent := processes[chain[-1]].ppid) in processes and len(chain) < len(processes):
        if parent in chain:
            break
        chain.append(parent)
    return chain


class ForkStormDetector:
    name = "fork-storm"
    needs = frozenset({"counters"})

    def __init__(self, min_growth: int = 40, min_fork_rate: float = 5.0,
                 window_ms: float = 5000.0) -> None:
        self.min_growth = min_growth
        self.min_fork_rate = min_fork_rate
        self.window_ns = int(window_ms * 1e6)
        self._history: deque[Counters] = deque()
        self._minima: deque[Counters] = deque()
        """Samples of the window with increasing process counts: the first is the minimum."""
        self._reported = False

    def observe(self, sample: Sample) -> list[Event]:
        now = sample.counters
        assert now is not None
        history, minima = self._history, self._minima
        history.append(now)
        while minima and minima[-1].processes >= now.processes:
            minima.pop()
        minima.append(now)
        horizon = now.monotonic_ns - self.window_ns
        while len(history) > 1 and history[1].monotonic_ns <= horizon:
            history.popleft()
        oldest = history[0]
        while minima[0].monotonic_ns < oldest.monotonic_ns:
            minima.popleft()
        growth = now.processes - minima[0].processes
        rate = fork_rate(oldest, now) if oldest is not now else 0.0
        if growth >= self.min_growth and rate >= self.min_fork_rate:
            if not self._reported:
                self._reported = True
                return [Event("fork-storm", now.monotonic_ns,
                              f"processes grew by {growth} in "
                              f"{(now.monotonic_ns - oldest.monotonic_ns) / 1e6:.0f} ms "
                              f"at {rate:.0f} forks/s",
                              {"processes": now.processes, "threads": now.threads,
                               "growth": growth, "forks_per_second": round(rate, 1)})]
        elif growth <= 0:  # a whole window without net growth: the storm is over
            self._reported = False
        return []


class MemoryExhaustionDetector:
    name = "memory-exhaustion"
    needs = frozenset({"memory"})

    def __init__(self, min_free_fraction: float = 0.05) -> None:
        self.min_free_fraction = min_free_fraction
        self._reported = False

    def observe(self, sample: Sample) -> list[Event]:
        memory = sample.memory
        assert memory is not None
        watermarks = sum(zone.low_watermark for zone in memory.zones)
        floor = max(int(memory.total * self.min_free_fraction), watermarks)
        if memory.free < floor:
            if not self._reported:
                self._reported = True
                return [Event("memory-exhaustion", memory.monotonic_ns,
                              f"free memory {memory.free // MIB} MiB is below "
                              f"{floor // MIB} MiB of {memory.total // MIB} MiB",
                              {"free_mib": memory.free // MIB, "total_mib": memory.total // MIB,
                               "floor_mib": floor // MIB,
                               "zones": {f"{z.node}/{z.name}": z.free // MIB
                                         for z in memory.zones}})]
        elif memory.free > floor * 2:
            self._reported = False
        return []
