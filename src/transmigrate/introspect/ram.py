"""The guest's RAM file, mapped read-only, addressed by guest-physical address.

QEMU backs the guest's RAM with a shared file in /dev/shm; mapping it gives the
host the guest's physical memory with no copy and no call into QEMU, which is
what makes a sample cost microseconds. The map is read-only: the monitor never
writes to the guest.

On q35, RAM below 2816 MiB sits at guest-physical 0 in one piece. A larger RAM
is split by QEMU: the first 2 GiB stay low, the rest starts at 4 GiB (above the
PCI hole). Both layouts are described as segments here; the kernel's own e820
table is checked against them when a kernel is attached.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from transmigrate.errors import IntrospectionError

__all__ = ["GuestRam", "Segment", "q35_segments"]

_GIB = 1 << 30
_Q35_SPLIT_FROM = 0xB000_0000
_Q35_LOW = 2 * _GIB
_FOUR_GIB = 4 * _GIB


@dataclass(frozen=True)
class Segment:
    """A run of guest-physical memory held at ``file_offset`` in the RAM file."""

    physical: int
    file_offset: int
    size: int

    @property
    def end(self) -> int:
        return self.physical + self.size


def q35_segments(size: int) -> tuple[Segment, ...]:
    """Where QEMU's q35 machine places a RAM file of ``size`` bytes in physical memory."""
    if size < _Q35_SPLIT_FROM:
        return (Segment(0, 0, size),)
    return (Segment(0, 0, _Q35_LOW), Segment(_FOUR_GIB, _Q35_LOW, size - _Q35_LOW))


class GuestRam:
    """Read-only view of a guest's physical memory through its RAM file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as handle:
                self.buffer = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
        except (OSError, ValueError) as exc:
            raise IntrospectionError(f"cannot map guest RAM {path}: {exc}") from exc
        self.segments = q35_segments(len(self.buffer))
        self._spans = tuple((s.physical, s.end, s.file_offset - s.physical)
                            for s in self.segments)

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.buffer.close()

    @property
    def size(self) -> int:
        return len(self.buffer)

    def offset(self, physical: int, size: int = 1) -> int:
        """File offset of ``size`` bytes at ``physical``; they must lie in one segment."""
        for start, end, shift in self._spans:
            if start <= physical and physical + size <= end:
                return physical + shift
        raise IntrospectionError(
            f"guest-physical {physical:#x}+{size} lies outside the guest's RAM")

    def read(self, physical: int, size: int) -> bytes:
        start = self.offset(physical, size)
        return self.buffer[start:start + size]

    def covers(self, physical: int, size: int) -> bool:
        return any(s.physical <= physical and physical + size <= s.end for s in self.segments)
