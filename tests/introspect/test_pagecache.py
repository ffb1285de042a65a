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
        _found_until_synced(vm, path, 6000, [0, 1], b"transmigrate\ntransmigrat")
    finally:
        vm.run(f"rm -f {path}")


@pytest.mark.parametrize("fixture", GUESTS)
def test_a_file_on_disk_whose_new_size_is_not_committed_is_found(
        fixture: str, request: pytest.FixtureRequest) -> None:
    """An append whose page the disk has (written, clean) but whose size is only in the
    journal's running transaction (as for an fsync caught waiting for its commit): the
    journal replay would cut it off, so its page is found; once committed, no more."""
    vm: Attached = request.getfixturevalue(fixture)
    path = "/data/tm-uncommitted"
    write_pages = ("import ctypes, os; fd = os.open('{path}', os.O_WRONLY); "
                   "assert ctypes.CDLL(None).sync_file_range(fd, ctypes.c_longlong(0), "
                   "ctypes.c_longlong(0), 7) == 0")  # wait, write, wait: pages clean
    vm.run(f"mount -o remount,commit=600 /data && printf 'first\\n' > {path} && sync && "
           f"printf 'second\\n' >> {path} && python3 -c \"{write_pages.format(path=path)}\"")
    try:
        _found_until_synced(vm, path, 13, [0], b"first\nsecond\n")
    finally:
        vm.run(f"rm -f {path}; mount -o remount,commit=5 /data")


def _found_until_synced(vm: Attached, path: str, size: int, pages: list[int],
                        start: bytes) -> None:
    """``path`` is found with ``size``, its unwritten ``pages`` (by index), and its first
    page beginning with ``start``; after a sync it is found no more."""
    found = {f.path: f for f in unwritten_files(vm.guest)}
    assert path in found, sorted(found)
    unwritten = found[path]
    assert unwritten.size == size
    assert [index for index, _ in unwritten.dirty] == pages
    ram = vm.guest.ram
    offset = ram.offset(unwritten.dirty[0][1], PAGE)
    assert bytes(ram.buffer[offset:offset + len(start)]) == start
    vm.run("sync")
    assert path not in {f.path for f in unwritten_files(vm.guest)}
