"""Guest-physical addressing of the RAM file, for both q35 layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from transmigrate.errors import IntrospectionError
from transmigrate.introspect.ram import GuestRam, Segment, q35_segments

MIB = 1 << 20


def test_small_ram_is_one_segment_at_zero() -> None:
    assert q35_segments(2048 * MIB) == (Segment(0, 0, 2048 * MIB),)


def test_large_ram_continues_above_four_gib() -> None:
    low, high = q35_segments(4096 * MIB)
    assert (low.physical, low.size) == (0, 2048 * MIB)
    assert (high.physical, high.file_offset, high.size) == (4096 * MIB, 2048 * MIB, 2048 * MIB)


def test_reads_by_physical_address_and_refuses_outside(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    path.write_bytes(bytes(range(256)) * 16)
    with GuestRam(path) as ram:
        assert ram.read(0x10, 4) == bytes([0x10, 0x11, 0x12, 0x13])
        with pytest.raises(IntrospectionError, match="outside the guest's RAM"):
            ram.read(4094, 4)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IntrospectionError, match="cannot map guest RAM"):
        GuestRam(tmp_path / "absent")
