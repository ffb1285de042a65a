"""Fork storms pile processes up; fork-exec loops do not; the tree that forks is named.
Memory running out."""

from __future__ import annotations

from transmigrate.detect.forks import (
    ForkStormDetector,
    MemoryExhaustionDetector,
    biggest_grower,
    forking_tree,
)
from transmigrate.introspect.tasks import Task, TaskSample

from .samples import MIB, counters, memory, task


def test_fork_bomb_is_reported() -> None:
    detector = ForkStormDetector(min_growth=50, min_fork_rate=100, window_ms=1000)
    stream = [counters(t, forks=1000 + t, processes=60 + t // 2) for t in range(0, 400, 10)]
    events = [e for s in stream for e in detector.observe(s)]
    assert len(events) == 1
    assert events[0].kind == "fork-storm"
    assert events[0].evidence["growth"] >= 50
    assert events[0].evidence["forks_per_second"] >= 100


def test_coarse_interval_keeps_the_whole_window() -> None:
    """Sampled every 1.01 s, a 5 s window holds four intervals; it must reach back
    to the fifth, or a bomb adding 9 processes a second is never 40 in a window."""
    detector = ForkStormDetector(min_growth=40, min_fork_rate=5, window_ms=5000)
    stream = [counters(t * 1010, forks=100 + 9 * t, processes=60 + 9 * t) for t in range(10)]
    events = [e for s in stream for e in detector.observe(s)]
    assert [e.monotonic_ns for e in events] == [5 * 1010 * 1_000_000]
    assert events[0].evidence["growth"] == 45


def test_fork_exec_loop_is_not_a_storm() -> None:
    detector = ForkStormDetector(min_growth=50, min_fork_rate=100, window_ms=1000)
    stream = [counters(t, forks=1000 + 5 * t, processes=60 + (t // 10) % 3)
              for t in range(0, 5000, 10)]
    assert [e for s in stream for e in detector.observe(s)] == []


def test_slow_growth_is_not_a_storm() -> None:
    detector = ForkStormDetector(min_growth=50, min_fork_rate=100, window_ms=1000)
    stream = [counters(t, forks=1000 + t // 100, processes=60 + t // 100)
              for t in range(0, 20_000, 100)]
    assert [e for s in stream for e in detector.observe(s)] == []


def test_memory_exhaustion_and_recovery() -> None:
    detector = MemoryExhaustionDetector(min_free_fraction=0.05)
    stream = [memory(0, 500), memory(10, 100), memory(20, 40), memory(30, 30),
              memory(40, 400), memory(50, 20)]
    events = [e for s in stream for e in detector.observe(s)]
    assert [e.monotonic_ns for e in events] == [20_000_000, 50_000_000]
    assert events[0].evidence["free_mib"] == 40 and events[0].evidence["total_mib"] == 1024


def test_watermarks_raise_the_floor() -> None:
    detector = MemoryExhaustionDetector(min_free_fraction=0.0)
    assert detector.observe(memory(0, 60, low_mib=64))


def _system(*extra: Task) -> TaskSample:
    """init, a kernel thread, the guest agent with a shell, redis, and ``extra``."""
    return TaskSample((task(1, "S", "init", ppid=0), task(2, "S", "kthreadd", True, ppid=0),
                       task(300, "S", "tm-agent"), task(310, "S", "sh", ppid=300),
                       task(400, "S", "redis-server"), *extra), 0)


def test_a_linear_bomb_is_blamed_on_the_process_that_forks() -> None:
    children = [task(1000 + n, "S", "tm-forkbomb", ppid=999) for n in range(60)]
    sample = _system(task(999, "S", "tm-forkbomb", ppid=310), *children,
                     task(1100, "S", "cron-job"))  # started meanwhile by someone else
    root, size = forking_tree(sample, newest=50) or (None, 0)
    assert root is not None and (root.pid, root.comm, size) == (999, "tm-forkbomb", 61)


def test_an_exponential_bomb_is_blamed_on_its_first_process() -> None:
    tree = [task(2000, "S", "bomb", ppid=310)]
    for pid in range(2001, 2064):  # every process forks: a binary tree
        tree.append(task(pid, "S", "bomb", ppid=2000 + (pid - 2001) // 2))
    root, size = forking_tree(_system(*tree), newest=40) or (None, 0)
    assert root is not None and (root.pid, size) == (2000, 64)


def test_processes_from_many_parents_blame_no_one() -> None:
    scattered = [task(3000 + n, "S", "job", ppid=[300, 400, 1][n % 3]) for n in range(45)]
    assert forking_tree(_system(*scattered), newest=40) is None


def test_the_biggest_grower_is_blamed_not_the_biggest() -> None:
    before = {400: 300 * MIB, 500: 40 * MIB, 600: 2 * MIB}
    after = {400: 300 * MIB, 500: 90 * MIB, 600: 2 * MIB, 700: 1 * MIB}
    assert biggest_grower(before, after) == 500


def test_without_growth_the_biggest_is_blamed() -> None:
    sizes = {400: 300 * MIB, 500: 40 * MIB}
    assert biggest_grower(sizes, sizes) == 400
    assert biggest_grower({}, {}) is None
