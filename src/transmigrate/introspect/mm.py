"""Guest memory: total, free, and free per zone against the zone's watermarks.

The same numbers the guest's ``/proc/meminfo`` and ``/proc/zoneinfo`` show
(``_totalram_pages``, the ``NR_FREE_PAGES`` counters, each zone's
``_watermark``), read off guest memory. A zone whose free memory falls to its
``min`` watermark is where the kernel starts reclaiming hard and, soon after,
killing: the number a memory-exhaustion detector watches.

The zones (which nodes are online, which zones have memory) are found once with
drgn; their counters are read with ``struct`` at every sample. A process's resident
memory (:func:`resident_bytes`, ``ps``'s RSS) is read with drgn, on demand: to name
who ate the memory, not at every sample.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import drgn
from drgn.helpers.linux.mm import task_rss
from drgn.helpers.linux.nodemask import for_each_online_node

from transmigrate.introspect.kernel import Guest, Record, drgn_errors
from transmigrate.introspect.tasks import Task

__all__ = ["MemoryReader", "MemorySample", "ZoneState", "resident_bytes"]


@dataclass(frozen=True, slots=True)
class ZoneState:
    """One memory zone of one NUMA node; sizes in bytes."""

    node: int
    name: str
    managed: int
    free: int
    min_watermark: int
    low_watermark: int
    high_watermark: int


@dataclass(frozen=True, slots=True)
class MemorySample:
    """The guest's memory at one instant; sizes in bytes."""

    total: int
    """``MemTotal``: the RAM the kernel manages."""
    free: int
    """``MemFree``."""
    zones: tuple[ZoneState, ...]
    monotonic_ns: int


class MemoryReader:
    """Memory counters, resolved once; :meth:`sample` reads them in microseconds."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.page_size = int(guest.vmcoreinfo.fields["PAGESIZE"])
        self._total = Record(guest, guest.prog.variable("_totalram_pages").type_, ("",))
        self._total_address = guest.address_of("_totalram_pages")
        self._free = Record(guest, guest.prog.variable("vm_zone_stat").type_,
                            ("[NR_FREE_PAGES]",))
        self._free_address = guest.address_of("vm_zone_stat")
        self._zone = guest.record("struct zone", (
            "managed_pages", "vm_stat[NR_FREE_PAGES]", "_watermark[WMARK_MIN]",
            "_watermark[WMARK_LOW]", "_watermark[WMARK_HIGH]"))
        self._zones: list[tuple[int, str, int]] = []
        with drgn_errors("cannot find the guest's memory zones"):
            prog = guest.prog
            for node in for_each_online_node(prog):
                pgdat = prog["node_data"][node]
                for index in range(int(pgdat.nr_zones)):
                    zone = pgdat.node_zones[index]
                    if int(zone.present_pages):
                        address = zone.address_
                        assert address is not None, "zones are objects in memory"
                        self._zones.append((node, zone.name.string_().decode(), address))

    def sample(self) -> MemorySample:
        page = self.page_size
        total: int = self._total.read(self._total_address)[0]
        free: int = self._free.read(self._free_address)[0]
        zones = []
        for node, name, address in self._zones:
            managed, zone_free, low_min, low, high = self._zone.read(address)
            zones.append(ZoneState(node, name, managed * page, max(zone_free, 0) * page,
                                   low_min * page, low * page, high * page))
        return MemorySample(total * page, max(free, 0) * page, tuple(zones),
                            time.monotonic_ns())


def resident_bytes(guest: Guest, tasks: Iterable[Task]) -> dict[int, int]:
    """Resident memory (anonymous, file and shared) of each process of ``tasks``, by pid;
    a process that exited since ``tasks`` were read is left out."""
    page = int(guest.vmcoreinfo.fields["PAGESIZE"])
    resident = {}
    for task in tasks:
        if task.kernel_thread or task.pid != task.tgid:
            continue
        try:
            pages = task_rss(guest.prog, drgn.Object(guest.prog, "struct task_struct *",
                                                      task.address)).total
        except (drgn.FaultError, LookupError, ValueError):
            continue
        if pages >= 0:  # per-CPU counters can be briefly negative
            resident[task.pid] = pages * page
    return resident
