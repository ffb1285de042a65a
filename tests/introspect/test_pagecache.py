"""The data volume's page cache that its disk does not have yet, read from guest memory."""

from __future__ import annotations

import pytest

from transmigrate.introspect.pagecache import unwritten_files
from transmigrate.introspect.pagetable import PAGE

from .conftest import GUESTS, Attached


@pytest.mark.parametrize("fixture", GUESTS)
def test_a_file_written_and_not_synced_is_found_with_its_pages(
        fixture: str, request: pytest.FixtureRequest) -> None:
    """Found with its size and its bytes (two pages), and no longer once synced."""
    vm: Attached = request.getfixturevalue(fixture)
    path = "/data/tm-unsynced"
    vm.run(f"yes transmigrate | head -c 6000 > {path}")
    try:
        found = {f.path: f for f in unwritten_files(vm.guest)}
        assert path in found, sorted(found)
        unwritten = found[path]
        assert unwritten.size == 6000
        assert [index for index, _ in unwritten.dirty] == [0, 1]
        ram = vm.guest.ram
        start = ram.offset(unwritten.dirty[0][1], PAGE)
        assert bytes(ram.buffer[start:start + 24]) == b"transmigrate\ntransmigrat"
        vm.run("sync")
        assert path not in {f.path for f in unwritten_files(vm.guest)}
    finally:
        vm.run(f"rm -f {path}")
