"""Kernel lockup: a CPU stuck in the kernel with preemption off.

A CPU spinning on a lock that is never released keeps preemption disabled and
never switches tasks, while time goes on. A busy CPU that is healthy either
switches tasks or runs with preemption enabled (user code, most kernel code),
and an idle CPU runs its idle task. So a CPU is *stuck* in a sample when it is
not idle, runs the same task as in the previous sample without having switched
since, and has its preemption count raised.

Time here is the time the guest was given: for how long, during the stuck
stretch, every busy vCPU ran on the host (the samples' ``vcpus``). A vCPU that
QEMU or the host did not run cannot be blamed on the guest: under TCG with
heavy load one vCPU thread at times ran 3 to 5 ms in an 85 ms stretch, and a lock
holder on such a vCPU keeps the other spinning that long.

Two rules turn a stuck CPU into a lockup:

- *Spinning*: stuck for at least one interval and ``spin_min_ms``, and its
  instruction pointer (looked up through ``where``, a few looks at the vCPU's
  registers) is in a lock's spin loop. A healthy lock is held for
  microseconds, so this fires within two intervals of the deadlock. The floor
  covers a lock held across a slow stretch of emulation.
- *Stuck*: stuck for ``samples`` samples spanning at least ``min_stuck_ms``,
  wherever it is. Healthy kernels do run with preemption off for a while under
  memory pressure (reclaim, zeroing pages) or heavy I/O: under TCG we saw
  20 ms, and once 110 ms (dd with fsync). Hence a floor of 100 ms, which the
  monitor raises to 300 ms under TCG.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from transmigrate.detect.events import Event, Sample
from transmigrate.introspect.cpus import CpuState

__all__ = ["SPIN_FUNCTION", "LockupDetector"]

PREEMPT_MASK = 0xFF
"""The preempt_count bits that count preempt_disable() nesting (spin_lock takes one)."""
SPIN_FUNCTION = re.compile(
    r"queued_(spin|read|write)_lock_slowpath|virt_spin_lock|_raw_(spin|read|write)_lock")
"""Kernel functions whose loops wait for a spinning lock (qspinlock, qrwlock)."""


@dataclass
class _Watch:
    last: CpuState
    last_ns: int
    """When ``last`` was sampled: a CPU found stuck has made no progress since."""
    stuck_since_ns: int | None = None
    ran_since: Mapping[int, int] | None = None
    """Each vCPU's host run time at ``stuck_since_ns``."""
    stuck_samples: int = 0
    looked_ns: int | None = None
    """When ``where`` was last asked about this stuck stretch."""
    reported: bool = False


class LockupDetector:
    name = "lockup"
    needs = frozenset({"cpus", "vcpus"})

    def __init__(self, samples: int = 2, min_stuck_ms: float = 100.0,
                 spin_min_ms: float = 20.0,
                 where: Callable[[int], str | None] | None = None) -> None:
        """``where(cpu)`` names the kernel function CPU ``cpu`` runs (None: unknown);
        without it only the *stuck* rule applies."""
        self.samples = samples
        self.min_stuck_ns = int(min_stuck_ms * 1e6)
        self.spin_min_ns = int(spin_min_ms * 1e6)
        self.where = where
        self._cpus: dict[int, _Watch] = {}
        self._last_vcpus: Mapping[int, int] = {}

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
                watch.stuck_since_ns, watch.stuck_samples = None, 0
                watch.looked_ns, watch.reported = None, False
            else:
                if watch.stuck_since_ns is None:
                    watch.stuck_since_ns, watch.ran_since = watch.last_ns, self._last_vcpus
                watch.stuck_samples += 1
                if not watch.reported:
                    event = self._judge(cpu, watch, sample)
                    if event is not None:
                        watch.reported = True
                        events.append(event)
            watch.last, watch.last_ns = cpu, sample.monotonic_ns
        self._last_vcpus = sample.vcpus or {}
        return events

    @staticmethod
    def _ran_ns(sample: Sample, since: Mapping[int, int], stuck_ns: int) -> int:
        """How long every busy vCPU ran since ``since``: the time in which the stuck CPU,
        and whichever CPU holds what it waits for, could have moved on. Wall time
        where the host's figures are missing."""
        assert sample.cpus is not None
        now = sample.vcpus or {}
        ran = [now[c.cpu] - since[c.cpu] for c in sample.cpus.cpus
               if not c.idle and c.cpu in now and c.cpu in since]
        return min([stuck_ns, *ran])

    def _judge(self, cpu: CpuState, watch: _Watch, sample: Sample) -> Event | None:
        assert watch.stuck_since_ns is not None and watch.ran_since is not None
        now_ns = sample.monotonic_ns
        stuck_ns = now_ns - watch.stuck_since_ns
        ran_ns = self._ran_ns(sample, watch.ran_since, stuck_ns)
        evidence: dict[str, object] = {}
        if (self.where is not None and ran_ns >= self.spin_min_ns
                and (watch.looked_ns is None or now_ns - watch.looked_ns >= self.spin_min_ns)):
            watch.looked_ns = now_ns
            function = self.where(cpu.cpu)
            if function is not None and SPIN_FUNCTION.search(function):
                evidence = {"rule": "spinning", "function": function}
        if not evidence and watch.stuck_samples >= self.samples and ran_ns >= self.min_stuck_ns:
            evidence = {"rule": "stuck"}
        if not evidence:
            return None
        what = "spinning on a lock" if evidence["rule"] == "spinning" else "stuck"
        return Event(
            "lockup", now_ns,
            f"CPU {cpu.cpu} {what} in the kernel with preemption off "
            f"(pid {cpu.current_pid} {cpu.current_comm})",
            {"cpu": cpu.cpu, "pid": cpu.current_pid, "comm": cpu.current_comm,
             "preempt_count": cpu.preempt_count,
             "context_switches": cpu.context_switches,
             "timer_interrupts": cpu.timer_interrupts,
             "timer_interrupts_advancing": cpu.timer_interrupts != watch.last.timer_interrupts,
             "stuck_samples": watch.stuck_samples,
             "stuck_ms": round(stuck_ns / 1e6, 3), "ran_ms": round(ran_ns / 1e6, 3),
             **evidence})
