"""Memory read from guest memory equals the guest's own /proc/meminfo."""

from __future__ import annotations

import pytest

from transmigrate.introspect.mm import MemoryReader

from .conftest import GUESTS, Attached


def _meminfo(vm: Attached) -> dict[str, int]:
    lines = vm.run("cat /proc/meminfo").text.splitlines()
    return {key: int(value.split()[0]) * 1024
            for key, value in (line.split(":", 1) for line in lines)}


@pytest.mark.parametrize("fixture", GUESTS)
def test_memory_matches_meminfo(fixture: str, request: pytest.FixtureRequest) -> None:
    vm: Attached = request.getfixturevalue(fixture)
    sample = MemoryReader(vm.guest).sample()
    meminfo = _meminfo(vm)
    assert sample.total == meminfo["MemTotal"]
    assert abs(sample.free - meminfo["MemFree"]) < 16 << 20
    assert {zone.name for zone in sample.zones} >= {"DMA", "DMA32"}
    assert sum(zone.managed for zone in sample.zones) == sample.total
    assert abs(sum(zone.free for zone in sample.zones) - sample.free) < 4 << 20
    for zone in sample.zones:
        assert 0 < zone.min_watermark < zone.low_watermark < zone.high_watermark < zone.managed
