"""Hung driver: many tasks in D, for long, in the same function."""

from __future__ import annotations

from transmigrate.detect.hung import HungDriverDetector
from transmigrate.introspect.tasks import Task

from .samples import task, tasks


def _sites(table: dict[int, str]) -> tuple[HungDriverDetector, list[int]]:
    asked: list[int] = []

    def lookup(t: Task) -> str | None:
        asked.append(t.pid)
        return table.get(t.pid)

    return HungDriverDetector(lookup, min_tasks=3, min_blocked_ms=100), asked


def test_readers_piling_up_in_one_function() -> None:
    detector, asked = _sites({p: "tm_hang_read" for p in range(10, 20)})
    stream = [tasks(t, *[task(p, "D") for p in range(10, 10 + 1 + t // 50)], task(2, "S"))
              for t in range(0, 400, 10)]
    events = [e for s in stream for e in detector.observe(s)]
    assert len(events) == 1
    assert events[0].evidence["function"] == "tm_hang_read"
    assert events[0].evidence["blocked"] == 3
    assert len(asked) == len(set(asked)), "each blocked task is unwound once"


def test_short_io_waits_and_kernel_threads_do_not_count() -> None:
    detector, _ = _sites({p: "io_schedule" for p in range(10, 20)})
    stream = []
    for t in range(0, 2000, 10):
        waiting = [task(p, "D") for p in range(10, 15) if (t // 50 + p) % 3 == 0]
        stream.append(tasks(t, *waiting, task(3, "D", "kworker/0:1", kernel_thread=True)))
    assert [e for s in stream for e in detector.observe(s)] == []


def test_different_functions_are_not_one_hang() -> None:
    detector, _ = _sites({10: "a_read", 11: "b_read", 12: "c_read"})
    stream = [tasks(t, task(10, "D"), task(11, "D"), task(12, "D")) for t in range(0, 500, 10)]
    assert [e for s in stream for e in detector.observe(s)] == []
