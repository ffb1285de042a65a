"""A process's page tables, walked straight off guest RAM.

drgn's ``follow_phys`` walks one address at a time and cannot tell a page that
was never touched from one that was swapped out; recovery needs both, for every
page of a process, fast. This walker reads whole tables (512 entries in one
``unpack_from``) and reports each user page as present (with its physical
address) or refuses what it cannot copy: a swap entry or marker, a page outside
guest RAM. Guest memory is hostile input here: every table address is checked
against RAM before it is read, so a torn table gives an error, not a wild read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from transmigrate.errors import IntrospectionError
from transmigrate.introspect.kernel import Guest
from transmigrate.introspect.ram import GuestRam

__all__ = ["PageTables", "UnmovablePage"]

PAGE = 4096
_TABLE = struct.Struct("<512Q")
_PRESENT = 1 << 0
_HUGE = 1 << 7  # PSE at the PUD and PMD levels
_PROTNONE = 1 << 8  # a PROT_NONE page is present with _PAGE_PRESENT clear (x86 pte_present)
_ADDRESS = 0x000F_FFFF_FFFF_F000


class UnmovablePage(IntrospectionError):
    """A user page that cannot be copied from RAM: swapped out, or a marker."""

    def __init__(self, address: int, entry: int) -> None:
        self.address = address
        super().__init__(f"page {address:#x} is not in RAM (entry {entry:#x}: swapped out)")


@dataclass(frozen=True)
class PageTables:
    """The page tables whose top level is at guest-physical ``root``."""

    ram: GuestRam
    root: int
    levels: int
    """4, or 5 when the guest runs with 5-level paging (LA57)."""

    @classmethod
    def of(cls, guest: Guest, pgd: int) -> PageTables:
        """The tables of the ``mm->pgd`` at kernel virtual address ``pgd``."""
        enabled = guest.variable("__pgtable_l5_enabled")
        return cls(guest.ram, guest.physical(pgd),
                   5 if enabled is not None and int(enabled) else 4)

    def _table(self, physical: int) -> tuple[int, ...]:
        if physical % PAGE or not self.ram.covers(physical, PAGE):
            raise IntrospectionError(f"a page table at {physical:#x} is outside guest RAM")
        return _TABLE.unpack_from(self.ram.buffer, self.ram.offset(physical, PAGE))

    def pages(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """``(virtual, physical)`` of every present page in [start, end), in order.
        Raises :class:`UnmovablePage` on a page that is mapped but not in RAM."""
        yield from self._walk(self.root, self.levels, 0, start, end)

    def _walk(self, table: int, level: int, base: int, start: int, end: int
              ) -> Iterator[tuple[int, int]]:
        shift = 12 + 9 * (level - 1)
        span = 1 << shift
        entries = self._table(table)
        first = max(0, (start - base) >> shift)
        last = min(511, (end - 1 - base) >> shift)
        for index in range(first, last + 1):
            entry = entries[index]
            if not entry:
                continue
            address = base + (index << shift)
            if level == 1:
                if entry & (_PRESENT | _PROTNONE):
                    yield address, entry & _ADDRESS
                else:
                    raise UnmovablePage(address, entry)
            elif not entry & _PRESENT:
                if level <= 2 and entry & _PROTNONE:  # a PROT_NONE huge page
                    yield from self._huge(address, entry, span, start, end)
                    continue
                raise UnmovablePage(address, entry)
            elif level <= 3 and entry & _HUGE:
                yield from self._huge(address, entry, span, start, end)
            else:
                yield from self._walk(entry & _ADDRESS, level - 1, address, start, end)

    @staticmethod
    def _huge(address: int, entry: int, span: int, start: int, end: int
              ) -> Iterator[tuple[int, int]]:
        frame = entry & _ADDRESS & ~(span - 1)
        for page in range(max(address, start), min(address + span, end), PAGE):
            yield page, frame + (page - address)
