"""The service's data volume: a raw ext4 disk that moves from VM to VM with the service.

Both the active and the standby VM have it attached (QEMU's image locking is
off for it), but only one guest mounts it at a time; handover freezes it on the
old guest before the new one mounts it. The standby writes to an overlay of its
own until it has taken over (see ``vm.machine``), so even a rollback after it
mounted the volume leaves the volume as only the old guest wrote it. Files a
service writes there (redis' AOF and RDB, logs) therefore survive the move, and
nothing is written by both.
"""

from __future__ import annotations

from pathlib import Path

from transmigrate.errors import TransmigrateError
from transmigrate.process import run

__all__ = ["DATA_MOUNT", "create_volume", "directory_disk"]

DATA_MOUNT = "/data"


def create_volume(path: Path, size_mib: int = 4096) -> None:
    """A sparse, empty ext4 volume at ``path`` (it costs disk only as it fills)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        handle.truncate(size_mib * 1024 * 1024)
    run(["mkfs.ext4", "-q", "-F", "-L", "tm-data", "-E", "root_owner=0:0", tmp])
    tmp.replace(path)


def directory_disk(directory: Path, path: Path, *, fill: bool = False) -> Path:
    """A raw ext4 disk at ``path`` holding a copy of ``directory``, built on the host
    (mke2fs -d): how the host hands a guest many megabytes at disk speed. With ``fill``,
    ``path`` is an existing disk (a warm standby's, attached already) kept at its size."""
    files = [f for f in directory.rglob("*") if f.is_file()]
    used = sum(f.stat().st_size for f in files)
    size_kib = (used * 11 // 10 + (len(files) + 64) * 8192) // 1024 + 8192
    if fill:
        if path.stat().st_size < size_kib * 1024:
            raise TransmigrateError(
                f"the images need {size_kib >> 10} MiB; the standby's disk {path} holds "
                f"{path.stat().st_size >> 20} MiB")
    else:
        with open(path, "wb") as handle:
            handle.truncate(size_kib * 1024)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "tm-import",
         "-N", str(len(files) + 256), "-E", "root_owner=0:0", "-d", directory, path])
    return path
