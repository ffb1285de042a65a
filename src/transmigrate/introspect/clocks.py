"""The guest kernel's clocks as they stood when it stopped.

A recovered process must find CLOCK_MONOTONIC (and CLOCK_BOOTTIME) where it left
them: a timer it armed at an absolute monotonic time (Python's time.sleep, every
event loop's deadline) would otherwise wait for the difference between the two
VMs' uptimes. CRIU restores into a time namespace whose offsets continue these
clocks from the values in its images; they are read here from the dead kernel's
timekeeper, as of its last update (at most a tick before it stopped).
"""

from __future__ import annotations

from dataclasses import dataclass

from transmigrate.introspect.kernel import Guest

__all__ = ["KernelClocks", "read_clocks"]


@dataclass(frozen=True)
class KernelClocks:
    monotonic_ns: int
    boottime_ns: int
    realtime_ns: int


def read_clocks(guest: Guest) -> KernelClocks:
    keeper = guest.prog["tk_core"].timekeeper
    mono = keeper.tkr_mono
    since_update = int(mono.xtime_nsec) >> int(mono.shift)
    monotonic = int(mono.base) + since_update
    return KernelClocks(monotonic_ns=monotonic, boottime_ns=monotonic + int(keeper.offs_boot),
                        realtime_ns=int(keeper.xtime_sec) * 10**9 + since_update)
