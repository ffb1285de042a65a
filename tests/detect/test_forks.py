"""Fork storms pile processes up; fork-exec loops do not. Memory running out."""

from __future__ import annotations

from transmigrate.detect.forks import ForkStormDetector, MemoryExhaustionDetector

from .samples import counters, memory


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
