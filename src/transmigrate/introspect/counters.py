"""Process and thread counts and the fork counter, for fork rate.

Three kernel globals answer these without walking any list: ``total_forks``
(every successful fork or clone since boot), ``nr_threads`` (tasks alive) and
the per-CPU ``process_counts`` whose sum is the number of processes (thread
group leaders), as the kernel's own ``nr_processes()`` computes it. Reading them
costs a few microseconds even under a fork bomb, when walking the task list
would grow with the bomb.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from transmigrate.introspect.kernel import Guest, Record

__all__ = ["CounterReader", "Counters", "fork_rate", "sum_per_cpu"]


@dataclass(frozen=True, slots=True)
class Counters:
    total_forks: int
    threads: int
    processes: int
    monotonic_ns: int
    """Host clock when read, to turn two samples into rates."""


def fork_rate(before: Counters, after: Counters) -> float:
    """Forks per second between two samples."""
    seconds = (after.monotonic_ns - before.monotonic_ns) / 1e9
    return (after.total_forks - before.total_forks) / seconds if seconds > 0 else 0.0


def sum_per_cpu(counts: Iterable[int]) -> int:
    """The sum of per-CPU ``unsigned long`` counters as the kernel adds them, wrapping.
    A process forked on one CPU and reaped on another leaves the first CPU's count one
    high and the second's one "below zero" (2**64 - 1), and only the wrapped sum is right."""
    return sum(counts) % (1 << 64)


class CounterReader:
    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        prog = guest.prog
        self._forks = Record(guest, prog.variable("total_forks").type_, ("",))
        self._forks_address = guest.address_of("total_forks")
        self._threads = Record(guest, prog.variable("nr_threads").type_, ("",))
        self._threads_address = guest.address_of("nr_threads")
        self._processes = Record(guest, prog.variable("process_counts").type_, ("",))
        self._process_addresses = tuple(guest.per_cpu_addresses("process_counts").values())

    def sample(self) -> Counters:
        processes = sum_per_cpu(self._processes.read(address)[0]
                                for address in self._process_addresses)
        return Counters(self._forks.read(self._forks_address)[0],
                        self._threads.read(self._threads_address)[0],
                        processes, time.monotonic_ns())
