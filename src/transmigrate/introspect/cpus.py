"""Per-CPU liveness: is each CPU still making progress, and what runs on it.

A CPU stuck in the kernel (a spinlock never released, preemption off) stops
switching tasks while its timer interrupts keep arriving; a CPU with interrupts
off stops counting timer interrupts too. So each CPU's sample carries several
independent counters read from the kernel's own per-CPU data, and the task on
it:

- ``context_switches`` (``rq->nr_switches``) and ``clock_ns`` (``rq->clock``,
  advanced by the scheduler tick while the CPU is busy);
- ``timer_interrupts`` (x86 ``irq_stat.apic_timer_irqs``);
- the kernel watchdogs' own marks, when the kernel build has them:
  ``watchdog_touch_ts`` (soft-lockup detector, refreshed every few seconds) and
  ``hrtimer_interrupts`` (hard-lockup detector);
- ``preempt_count`` (its low bits: preemption disabled, soft and hard IRQ
  nesting), from ``__preempt_count`` (6.1) or ``pcpu_hot.preempt_count`` (6.2+).

An idle CPU stops its tick (NOHZ), so its counters stand still legitimately:
``idle`` says when the CPU runs its idle task. Everything is read off guest
memory at addresses resolved once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from transmigrate.introspect.kernel import Guest, Record

__all__ = ["CpuReader", "CpuSample", "CpuState"]

_PREEMPT_NEED_RESCHED = 0x8000_0000
"""x86 keeps an inverted need-resched flag in the top bit of the preempt count."""


@dataclass(frozen=True, slots=True)
class CpuState:
    """One online CPU at one instant."""

    cpu: int
    context_switches: int
    clock_ns: int
    nr_running: int
    timer_interrupts: int | None
    watchdog_touch_ts: int | None
    hrtimer_interrupts: int | None
    preempt_count: int | None
    current_pid: int
    current_comm: str
    idle: bool


@dataclass(frozen=True, slots=True)
class CpuSample:
    """Every online CPU, and the kernel's jiffies, at one instant."""

    jiffies: int
    cpus: tuple[CpuState, ...]
    monotonic_ns: int
    """Host clock when the sample ended."""


class _PerCpu:
    """One per-CPU variable (or a member of it), resolved for every possible CPU."""

    def __init__(self, guest: Guest, name: str, member: str) -> None:
        variable = guest.prog.variable(name)
        self.record = Record(guest, variable.type_, (member,))
        self.addresses = guest.per_cpu_addresses(name)

    def read(self, cpu: int) -> int:
        value: int = self.record.read(self.addresses[cpu])[0]
        return value


def _optional(guest: Guest, *choices: tuple[str, str]) -> _PerCpu | None:
    """The first of (variable, member) this kernel build has; the others are other versions."""
    for name, member in choices:
        variable = guest.variable(name)
        if variable is not None and (not member or guest.has(variable.type_.type_name(),
                                                             member)):
            return _PerCpu(guest, name, member)
    return None


class CpuReader:
    """Per-CPU liveness, resolved once; :meth:`sample` reads it in microseconds."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self._rq = guest.record("struct rq", ("nr_switches", "clock", "nr_running",
                                              "curr", "idle"))
        self._rq_addresses = guest.per_cpu_addresses("runqueues")
        self._task = guest.record("struct task_struct", ("pid", "comm"))
        self._jiffies = Record(guest, guest.prog.variable("jiffies").type_, ("",))
        self._jiffies_address = guest.address_of("jiffies")
        self._timer = _optional(guest, ("irq_stat", "apic_timer_irqs"))
        self._watchdog = _optional(guest, ("watchdog_touch_ts", ""))
        self._hrtimer = _optional(guest, ("hrtimer_interrupts", ""))
        self._preempt = _optional(guest, ("pcpu_hot", "preempt_count"),
                                  ("__preempt_count", ""))

    def sample(self) -> CpuSample:
        cpus = tuple(self._cpu(cpu) for cpu in self.guest.online_cpus())
        jiffies: int = self._jiffies.read(self._jiffies_address)[0]
        return CpuSample(jiffies, cpus, time.monotonic_ns())

    def _cpu(self, cpu: int) -> CpuState:
        switches, clock, running, curr, idle = self._rq.read(self._rq_addresses[cpu])
        pid, comm = self._task.read(curr)
        preempt = _read(self._preempt, cpu)
        return CpuState(
            cpu, switches, clock, running, _read(self._timer, cpu), _read(self._watchdog, cpu),
            _read(self._hrtimer, cpu),
            None if preempt is None else preempt & ~_PREEMPT_NEED_RESCHED & 0xFFFF_FFFF,
            pid, comm.split(b"\0", 1)[0].decode(errors="replace"), curr == idle)


def _read(counter: _PerCpu | None, cpu: int) -> int | None:
    return None if counter is None else counter.read(cpu)
