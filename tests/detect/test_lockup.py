"""Lockup: stuck in the kernel with preemption off, versus busy and healthy."""

from __future__ import annotations

from transmigrate.detect.lockup import LockupDetector

from .samples import MS, cpu, cpus


def test_spinning_cpu_is_reported_once_with_evidence() -> None:
    detector = LockupDetector(samples=2, min_stuck_ms=0)
    stream = [cpus(0, cpu(0, 10), cpu(1, 5, pid=77, comm="tm_deadlock")),
              cpus(10, cpu(0, 11), cpu(1, 9, preempt=1, pid=77, comm="tm_deadlock")),
              cpus(20, cpu(0, 12), cpu(1, 9, preempt=1, pid=77, comm="tm_deadlock")),
              cpus(30, cpu(0, 13), cpu(1, 9, preempt=1, pid=77, comm="tm_deadlock")),
              cpus(40, cpu(0, 14), cpu(1, 9, preempt=1, pid=77, comm="tm_deadlock"))]
    events = [e for s in stream for e in detector.observe(s)]
    assert len(events) == 1
    event = events[0]
    assert event.kind == "lockup" and event.monotonic_ns == 30_000_000
    assert event.evidence["cpu"] == 1 and event.evidence["comm"] == "tm_deadlock"
    assert event.evidence["stuck_ms"] == 20.0


def test_busy_user_task_and_idle_cpu_are_not_lockups() -> None:
    detector = LockupDetector(samples=2)
    stream = [cpus(t, cpu(0, 10, preempt=0), cpu(1, 3, idle=True, preempt=0))
              for t in range(0, 1000, 10)]
    assert [e for s in stream for e in detector.observe(s)] == []


def test_short_preempt_off_section_is_not_a_lockup() -> None:
    detector = LockupDetector(samples=2, min_stuck_ms=50)
    stream = [cpus(0, cpu(0, 10)), cpus(10, cpu(0, 10, preempt=1)),
              cpus(20, cpu(0, 10, preempt=1)), cpus(30, cpu(0, 11))]
    assert [e for s in stream for e in detector.observe(s)] == []


def test_recovered_cpu_can_be_reported_again() -> None:
    detector = LockupDetector(samples=1, min_stuck_ms=0)
    stream = [cpus(0, cpu(0, 1)), cpus(1, cpu(0, 1, preempt=1)), cpus(2, cpu(0, 2)),
              cpus(3, cpu(0, 2, preempt=1))]
    assert len([e for s in stream for e in detector.observe(s)]) == 2


def test_default_waits_out_a_busy_kernel_under_memory_pressure() -> None:
    detector = LockupDetector()
    stream = [cpus(t, cpu(0, 10, preempt=1)) for t in range(0, 100, 10)]
    assert [e for s in stream for e in detector.observe(s)] == []
    assert detector.observe(cpus(110, cpu(0, 10, preempt=1)))


def test_a_different_task_is_not_the_same_stuck_cpu() -> None:
    detector = LockupDetector(samples=2, min_stuck_ms=0)
    stream = [cpus(0, cpu(0, 5, pid=1)), cpus(10, cpu(0, 5, preempt=1, pid=2)),
              cpus(20, cpu(0, 5, preempt=1, pid=3)), cpus(30, cpu(0, 5, preempt=1, pid=4))]
    assert [e for s in stream for e in detector.observe(s)] == []


class Registers:
    """Stands for the monitor's looks at a vCPU: always in ``function``; counts the looks."""

    def __init__(self, function: str) -> None:
        self.function = function
        self.looked: list[int] = []

    def __call__(self, cpu: int) -> str:
        self.looked.append(cpu)
        return self.function


def test_cpu_spinning_on_a_lock_is_reported_after_one_interval_past_the_floor() -> None:
    where = Registers("native_queued_spin_lock_slowpath")
    detector = LockupDetector(min_stuck_ms=300, spin_min_ms=20, where=where)
    stream = [cpus(0, cpu(1, 5)), cpus(10, cpu(1, 5, preempt=1)), cpus(20, cpu(1, 5, preempt=1))]
    events = [e for s in stream for e in detector.observe(s)]
    assert where.looked == [1]
    assert len(events) == 1 and events[0].monotonic_ns == 20 * MS
    assert events[0].evidence["rule"] == "spinning"
    assert events[0].evidence["function"] == "native_queued_spin_lock_slowpath"
    assert events[0].evidence["stuck_ms"] == 20.0


def test_stuck_cpu_outside_a_spin_loop_waits_for_the_stuck_floor() -> None:
    where = Registers("clear_page_erms")
    detector = LockupDetector(min_stuck_ms=100, spin_min_ms=20, where=where)
    stream = [cpus(t, cpu(0, 10, preempt=1)) for t in range(0, 110, 10)]
    events = [e for s in stream for e in detector.observe(s)]
    assert [e.monotonic_ns for e in events] == [100 * MS]
    assert events[0].evidence["rule"] == "stuck" and "function" not in events[0].evidence
    assert where.looked == [0] * 5, "looked once per spin floor, not at every sample"


def test_unknown_function_is_not_spinning() -> None:
    detector = LockupDetector(min_stuck_ms=1000, spin_min_ms=0, where=lambda n: None)
    stream = [cpus(t, cpu(0, 10, preempt=1)) for t in range(0, 100, 10)]
    assert [e for s in stream for e in detector.observe(s)] == []


def test_time_the_host_did_not_run_the_vcpus_does_not_count() -> None:
    """Under TCG a busy vCPU sometimes waits 80 ms for QEMU: the guest is not stuck."""
    where = Registers("native_queued_spin_lock_slowpath")
    detector = LockupDetector(min_stuck_ms=100, spin_min_ms=20, where=where)
    stalled = [cpus(t, cpu(0, 10, preempt=1), cpu(1, 3), ran_ms={0: t / 20, 1: t})
               for t in range(0, 200, 10)]
    assert [e for s in stalled for e in detector.observe(s)] == []
    resumed = [cpus(t, cpu(0, 10, preempt=1), cpu(1, 3), ran_ms={0: t - 180.5, 1: t})
               for t in range(200, 230, 10)]
    events = [e for s in resumed for e in detector.observe(s)]
    assert [e.monotonic_ns for e in events] == [210 * MS]
    assert events[0].evidence["ran_ms"] == 29.5 and events[0].evidence["stuck_ms"] == 210.0


def test_spinning_waits_while_a_busy_cpu_that_may_hold_the_lock_is_not_run() -> None:
    where = Registers("native_queued_spin_lock_slowpath")
    detector = LockupDetector(min_stuck_ms=300, spin_min_ms=20, where=where)
    holder_not_run = [cpus(t, cpu(0, 10, preempt=1), cpu(1, 3, pid=7), ran_ms={0: t, 1: 0})
                      for t in range(0, 50, 10)]
    assert [e for s in holder_not_run for e in detector.observe(s)] == []
    other_idle = LockupDetector(min_stuck_ms=300, spin_min_ms=20, where=where)
    idle_not_run = [cpus(t, cpu(0, 10, preempt=1), cpu(1, 3, idle=True), ran_ms={0: t, 1: 0})
                    for t in range(0, 50, 10)]
    events = [e for s in idle_not_run for e in other_idle.observe(s)]
    assert [e.monotonic_ns for e in events] == [20 * MS]
