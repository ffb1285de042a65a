"""Disks built on the host from a directory: what a guest mounts is what the host wrote."""

from __future__ import annotations

import subprocess
from pathlib import Path

from transmigrate.vm.volume import directory_disk


def test_a_directory_disk_holds_the_files_byte_for_byte(tmp_path: Path) -> None:
    source = tmp_path / "images"
    (source / "10039").mkdir(parents=True)
    pages = bytes(range(256)) * 4096 * 3
    (source / "10039" / "pages-1.img").write_bytes(pages)
    (source / "10039" / "core-10039.img").write_bytes(b"core")
    disk = directory_disk(source, tmp_path / "images.img")
    read = subprocess.run(["debugfs", "-R", "cat /10039/pages-1.img", str(disk)],
                          capture_output=True, check=True)
    assert read.stdout == pages
    assert disk.stat().st_size < len(pages) * 2 + (16 << 20)
