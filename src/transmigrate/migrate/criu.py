"""CRIU as the guests run it: command lines, image layout, and its statistics.

CRIU's image format is the version-independent intermediate representation of
a process's kernel state: dumped by system calls on the old kernel, recreated
by system calls on the new one. Every CRIU run in a guest writes its log next
to its images, so a failure can always be explained.
"""

from __future__ import annotations

import io
import struct
import tarfile
from dataclasses import dataclass

from transmigrate.errors import TransmigrateError
from transmigrate.introspect.sockets import millisecond_timestamp

__all__ = [
    "HOLD_SCRIPT",
    "IMAGES_ROOT",
    "LAZY_PAGES_PORT",
    "LOG_LEVEL",
    "PAGE_SERVER_PORT",
    "RESTORE_ROOT",
    "DumpStats",
    "Images",
    "RestoreStats",
    "parse_stats",
    "with_millisecond_timestamps",
]

IMAGES_ROOT = "/var/lib/transmigrate/migration"
HOLD_SCRIPT = "/usr/lib/transmigrate/criu-hold"
PAGE_SERVER_PORT = 27100
"""The target's page server for the first tree; tree ``i`` uses ``PAGE_SERVER_PORT + i``."""
LAZY_PAGES_PORT = 27200
"""The source's lazy page server for the first tree; tree ``i`` uses ``LAZY_PAGES_PORT + i``."""
RESTORE_ROOT = "/run/transmigrate-root"
"""On the target: the root file system alone (a bind of /, without the mounts under it),
the root CRIU gives a mount namespace it restores; the rest it mounts itself."""
LOG_LEVEL = "-v2"
"""Errors and warnings: more detailed logs cost measurable frozen time under TCG."""


@dataclass(frozen=True)
class Images:
    """The image directories of one process tree's migration, the same paths on both
    guests, and the ports its CRIU runs talk on.

    Iteration ``n`` lives in ``<root>/<n>``; each names its predecessor as
    ``../<n-1>`` (CRIU wants parent links relative), so restore follows the chain
    of pre-copied pages on the target.
    """

    root: str
    page_server_port: int = PAGE_SERVER_PORT
    lazy_pages_port: int = LAZY_PAGES_PORT
    shared_mounts: tuple[str, ...] | None = None
    """For a tree in a mount namespace of its own, the mount points it shares with the
    VM: external to CRIU, which finds them again in the target's."""

    def dir(self, n: int) -> str:
        return f"{self.root}/{n}"

    def parent_args(self, n: int) -> list[str]:
        return ["--prev-images-dir", f"../{n - 1}"] if n > 1 else []

    def _externals(self) -> list[str]:
        """Each shared mount, keyed by its own path, on both sides."""
        return [f"--external=mnt[{point}]:{point}" for point in self.shared_mounts or ()]

    def page_server(self, n: int, address: str) -> list[str]:
        return ["criu", "page-server", "-D", self.dir(n), *self.parent_args(n),
                "--address", address, "--port", str(self.page_server_port), "--daemon",
                "-o", "page-server.log", LOG_LEVEL]

    def pre_dump(self, n: int, pid: int, target: str) -> list[str]:
        return ["criu", "pre-dump", "-t", str(pid), "-D", self.dir(n), *self.parent_args(n),
                "--track-mem", "--page-server", "--address", target,
                "--port", str(self.page_server_port), *self._externals(),
                "-o", "pre-dump.log", LOG_LEVEL]

    def dump(self, n: int, pid: int, target: str) -> list[str]:
        """The final dump, its pages streamed to the target's page server."""
        return ["criu", "dump", "-t", str(pid), "-D", self.dir(n), *self.parent_args(n),
                "--track-mem", "--page-server", "--address", target,
                "--port", str(self.page_server_port), *self._final_dump_args()]

    def lazy_dump(self, n: int, pid: int, source: str) -> list[str]:
        """The final dump for post-copy: everything but private anonymous memory goes to
        images. After the post-dump hook the dump serves that memory, from the still
        frozen tasks, to the target's lazy-pages daemon, on ``source``, and
        exits when it is all fetched, leaving the tasks stopped (not killed), so that a
        failed transfer can still continue them. (CRIU 3.17 cannot take a parent from
        pre-dumps sent by page server.)"""
        return ["criu", "dump", "-t", str(pid), "-D", self.dir(n), "--lazy-pages",
                "--address", source, "--port", str(self.lazy_pages_port), "--leave-stopped",
                *self._final_dump_args()]

    def _final_dump_args(self) -> list[str]:
        return ["--tcp-established", "--file-locks", "--link-remap", "--ghost-limit", "64M",
                "--network-lock", "nftables", "--action-script", HOLD_SCRIPT,
                *self._externals(), "-o", "dump.log", LOG_LEVEL]

    def lazy_pages(self, n: int, source: str) -> list[str]:
        """The target's daemon that fills a lazily restored process's memory: on demand
        (userfaultfd) first, then everything else in the background."""
        return ["criu", "lazy-pages", "-D", self.dir(n), "--page-server", "--address", source,
                "--port", str(self.lazy_pages_port), "-o", "lazy-pages.log", LOG_LEVEL]

    def restore(self, n: int, pidfile: str, *, lazy: bool = False) -> list[str]:
        namespace = [] if self.shared_mounts is None else ["--root", RESTORE_ROOT]
        return ["criu", "restore", "-D", self.dir(n), "--tcp-established", "--file-locks",
                "--restore-detached", "--pidfile", pidfile, *(["--lazy-pages"] if lazy else []),
                *namespace, *self._externals(), "-o", "restore.log", LOG_LEVEL]


@dataclass(frozen=True)
class DumpStats:
    """CRIU's own dump statistics, under CRIU's names (times in microseconds)."""

    freezing_time: int = 0
    frozen_time: int = 0
    memdump_time: int = 0
    memwrite_time: int = 0
    pages_scanned: int = 0
    pages_skipped_parent: int = 0
    pages_written: int = 0
    pages_lazy: int = 0


@dataclass(frozen=True)
class RestoreStats:
    """CRIU's own restore statistics, under CRIU's names (times in microseconds)."""

    pages_compared: int = 0
    pages_skipped_cow: int = 0
    forking_time: int = 0
    restore_time: int = 0
    pages_restored: int = 0


# Field numbers from CRIU's images/stats.proto.
_DUMP_FIELDS = {1: "freezing_time", 2: "frozen_time", 3: "memdump_time", 4: "memwrite_time",
                5: "pages_scanned", 6: "pages_skipped_parent", 7: "pages_written",
                9: "pages_lazy"}
_RESTORE_FIELDS = {1: "pages_compared", 2: "pages_skipped_cow", 3: "forking_time",
                   4: "restore_time", 5: "pages_restored"}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise TransmigrateError("CRIU stats image is truncated")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(message: bytes) -> dict[int, int | bytes]:
    """The top-level fields of a protobuf message (varints and length-delimited only)."""
    fields: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields[number], pos = _varint(message, pos)
        elif wire == 2:
            length, pos = _varint(message, pos)
            fields[number] = message[pos:pos + length]
            pos += length
        else:
            raise TransmigrateError(f"CRIU stats image has an unexpected wire type {wire}")
    return fields


def parse_stats(image: bytes) -> DumpStats | RestoreStats:
    """Decode a ``stats-dump`` or ``stats-restore`` image.

    The file is two magic numbers, then one entry: a 32-bit length and a
    protobuf ``stats_entry`` holding either ``dump`` (1) or ``restore`` (2).
    """
    if len(image) < 12:
        raise TransmigrateError("CRIU stats image is truncated")
    (size,) = struct.unpack_from("<I", image, 8)
    entry = _fields(image[12:12 + size])
    dump, restore = entry.get(1), entry.get(2)
    if isinstance(dump, bytes):
        raw = _fields(dump)
        return DumpStats(**{name: int(raw.get(n, 0)) for n, name in _DUMP_FIELDS.items()})
    if isinstance(restore, bytes):
        raw = _fields(restore)
        return RestoreStats(**{name: int(raw.get(n, 0)) for n, name in _RESTORE_FIELDS.items()})
    raise TransmigrateError("CRIU stats image holds neither dump nor restore statistics")


def with_millisecond_timestamps(archive: bytes) -> bytes:
    """``archive`` (tar streams of CRIU image directories) with each TCP connection's
    timestamp made a :func:`millisecond_timestamp`; unchanged if all already are."""
    # Here, not at the top: pycriu loads ~80 protobuf modules, which every other
    # transmigrate command would pay at start-up.
    import pycriu.images  # type: ignore[import-untyped]

    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    changed = False
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:", ignore_zeros=True) as tar:
        for member in tar:
            extracted = tar.extractfile(member)
            data = extracted.read() if extracted is not None else None
            name = member.name.rsplit("/", 1)[-1]
            if data is not None and name.startswith("tcp-stream-") and name.endswith(".img"):
                image = pycriu.images.load(io.BytesIO(data))
                for entry in image["entries"]:
                    even = millisecond_timestamp(int(entry.get("timestamp", 0)))
                    if "timestamp" in entry and even != entry["timestamp"]:
                        entry["timestamp"], changed = even, True
                rewritten = io.BytesIO()
                pycriu.images.dump(image, rewritten)
                data = rewritten.getvalue()
            members.append((member, data))
    if not changed:
        return archive
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.GNU_FORMAT) as tar:
        for member, data in members:
            if data is not None:
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return out.getvalue()
