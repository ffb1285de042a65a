"""The page-table walk over a RAM file laid out by hand: what is present, where, and what
is refused (a swap entry, a table outside RAM)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from transmigrate.errors import IntrospectionError
from transmigrate.introspect.pagetable import PageTables, UnmovablePage
from transmigrate.introspect.ram import GuestRam

PAGE = 4096
PRESENT, HUGE, PROTNONE = 1, 1 << 7, 1 << 8


def _ram(tmp_path: Path, tables: dict[int, dict[int, int]]) -> GuestRam:
    """A 4 MiB RAM file; ``tables`` maps a table's physical address to {index: entry}."""
    data = bytearray(4 << 20)
    for table, entries in tables.items():
        for index, entry in entries.items():
            struct.pack_into("<Q", data, table + 8 * index, entry)
    path = tmp_path / "ram"
    path.write_bytes(bytes(data))
    return GuestRam(path)


def test_present_pages_huge_pages_and_protnone(tmp_path: Path) -> None:
    pgd, pud, pmd, pte = 0x1000, 0x2000, 0x3000, 0x4000
    ram = _ram(tmp_path, {
        pgd: {0: pud | PRESENT},
        pud: {0: pmd | PRESENT},
        pmd: {1: pte | PRESENT, 2: 0x20_0000 | PRESENT | HUGE},
        pte: {0: 0x10_0000 | PRESENT, 1: 0x10_1000 | PROTNONE, 5: 0x10_5000 | PRESENT},
    })
    tables = PageTables(ram, pgd, 4)
    found = list(tables.pages(0x20_0000, 0x40_0000 + 2 * PAGE))
    assert found[:3] == [(0x20_0000, 0x10_0000), (0x20_1000, 0x10_1000),
                         (0x20_5000, 0x10_5000)]
    assert found[3:] == [(0x40_0000, 0x20_0000), (0x40_1000, 0x20_1000)]
    assert list(tables.pages(0x20_2000, 0x20_5000)) == []


def test_swapped_page_and_wild_table_are_refused(tmp_path: Path) -> None:
    pgd, pud, pmd, pte = 0x1000, 0x2000, 0x3000, 0x4000
    ram = _ram(tmp_path, {
        pgd: {0: pud | PRESENT, 1: (64 << 30) | PRESENT},
        pud: {0: pmd | PRESENT},
        pmd: {0: pte | PRESENT},
        pte: {3: 0x1234_5000},  # not present, not empty: a swap entry
    })
    tables = PageTables(ram, pgd, 4)
    with pytest.raises(UnmovablePage, match="0x3000 is not in RAM"):
        list(tables.pages(0, 0x20_0000))
    with pytest.raises(IntrospectionError, match="outside guest RAM"):
        list(tables.pages(1 << 39, (1 << 39) + PAGE))
