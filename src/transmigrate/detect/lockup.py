"""Kernel lockup: a CPU stuck in the kernel with preemption off.

A CPU spinning on a lock that is never released keeps preemption disabled and
never switches tasks, while time goes on. A busy CPU that is healthy either
switches tasks or runs with preemption enabled (user code, most kernel code),
and an idle CPU runs its idle task. So a CPU is *stuck* in a sample when it is
not idle, runs the same task as in the previous sample without having switched
since, and has its preemption count raised; stuck for ``samples`` samples in a
row spanning at least ``min_stuck_ms``, it is locked up.

Healthy kernels do run with preemption off for a while under memory pressure
(reclaim, zeroing pages) or heavy I/O: under TCG we saw 20 ms, and once 110 ms
(dd with fsync). Hence a floor of 100 ms, which the monitor raises to 300 ms
under TCG: still over 100 times sooner than Linux's own soft-lockup report.
"""

from __future__ import annotations

from dataclasses import dataclass

from transmigrate.detect.events import Event, Sample
from transmigrate.introspect.cpus import CpuState

__all__ = ["LockupDetector"]

PREEMPT_MASK = 0xFF
"""The preempt_count bits that count preempt_disable() nesting (spin_lock takes one)."""


@dataclass
class _Watch:
    last: CpuState
    last_ns: int
    """When ``last`` was sampled: a CPU found stuck has made no progress since."""
    stuck_since_ns: int | None = None
    stuck_samples: int = 0
    reported: bool = False


class LockupDetector:
    name = "lockup"
    needs = frozenset({"cpus"})

    def __init__(self, samples: int = 2, min_stuck_ms: float = 100.0) -> None:
        self.samples = samples
        self.min_stuck_ns = int(min_stuck_ms * 1e6)
        self._cpus: dict[int, _Watch] = {}

    def observe(self, sample: Sample) -> list[Event]:
        assert sample.cpus is not None
        events = []
        for cpu in sample.cpus.cpus:
            watch = self._cpus.get(cpu.cpu)
            if watch is None:
                self._cpus[cpu.cpu] = _Watch(cpu, sample.monotonic_ns)
                continue
            stuck = (not cpu.idle and cpu.context_switches == watch.last.context_switches
                     and cpu.current_pid == watch.last.current_pid
                     and cpu.preempt_count is not None and cpu.preempt_count & PREEMPT_MASK)
            if not stuck:
                watch.stuck_since_ns, watch.stuck_samples, watch.reported = None, 0, False
            else:
                if watch.stuck_since_ns is None:
                    watch.stuck_since_ns = watch.last_ns
                watch.stuck_samples += 1
                stuck_ns = sample.monotonic_ns - watch.stuck_since_ns
                if (not watch.reported and watch.stuck_samples >= self.samples
                        and stuck_ns >= self.min_stuck_ns):
                    watch.reported = True
                    events.append(Event(
                        "lockup", sample.monotonic_ns,
                        f"CPU {cpu.cpu} stuck in the kernel with preemption off "
                        f"(pid {cpu.current_pid} {cpu.current_comm})",
                        {"cpu": cpu.cpu, "pid": cpu.current_pid, "comm": cpu.current_comm,
                         "preempt_count": cpu.preempt_count,
                         "context_switches": cpu.context_switches,
                         "timer_interrupts": cpu.timer_interrupts,
                         "timer_interrupts_advancing":
                             cpu.timer_interrupts != watch.last.timer_interrupts,
                         "stuck_samples": watch.stuck_samples,
                         "stuck_ms": round(stuck_ns / 1e6, 3)}))
            watch.last, watch.last_ns = cpu, sample.monotonic_ns
        return events
