"""Whether the kernel panicked or oopsed, read from its own globals.

``panic_cpu`` leaves -1 (PANIC_CPU_INVALID) the moment a CPU enters panic(),
before any notifier runs, and an oops sets TAINT_DIE in ``tainted_mask``. Both
are plain words, so reading them costs two memory reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from transmigrate.introspect.kernel import Guest, Record

__all__ = ["TAINT_DIE", "KernelHealth", "PanicReader"]

TAINT_DIE = 7
"""Bit of ``tainted_mask`` set by an oops (include/linux/panic.h)."""


@dataclass(frozen=True, slots=True)
class KernelHealth:
    panic_cpu: int
    """The CPU in panic(), or -1."""
    tainted_mask: int
    monotonic_ns: int

    @property
    def panicked(self) -> bool:
        return self.panic_cpu != -1

    @property
    def oopsed(self) -> bool:
        return bool(self.tainted_mask >> TAINT_DIE & 1)


class PanicReader:
    def __init__(self, guest: Guest) -> None:
        prog = guest.prog
        self._panic = Record(guest, prog.variable("panic_cpu").type_, ("counter",))
        self._panic_address = guest.address_of("panic_cpu")
        self._taint = Record(guest, prog.variable("tainted_mask").type_, ("",))
        self._taint_address = guest.address_of("tainted_mask")

    def sample(self) -> KernelHealth:
        return KernelHealth(self._panic.read(self._panic_address)[0],
                            self._taint.read(self._taint_address)[0], time.monotonic_ns())
