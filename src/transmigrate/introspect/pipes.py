"""Pipes and FIFOs as a stopped kernel holds them: the bytes in flight, and each end.

A pipe's data is a ring of page slices (``pipe_inode_info.bufs``, from ``tail`` to
``head``), the same in 6.1 and 6.12. Both ends of a pipe share its inode, whose
number is the pipe's identity in CRIU's images. A FIFO is such a pipe behind an inode
of a file system: the same ring, and a path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import drgn
from drgn.helpers.linux.mm import page_to_phys

from transmigrate.errors import Unrecoverable
from transmigrate.introspect.kernel import Guest
from transmigrate.introspect.pagecache import TmpfsFile
from transmigrate.introspect.pagetable import PAGE

__all__ = ["PipeState", "read_pipe"]

_MAX_RING = 1 << 16


@dataclass(frozen=True)
class PipeState:
    """One end of a pipe (what CRIU's pipe_entry holds) and the pipe's queued bytes."""

    key: int
    """The ``struct file``."""
    pipe_id: int
    """The pipe's inode number, shared by both ends."""
    flags: int
    data: bytes
    size: int
    """The pipe's capacity in bytes (F_GETPIPE_SZ)."""
    path: str | None = None
    """A FIFO's path (None for a pipe): restore opens it there again."""
    mode: int = 0
    """A FIFO's inode mode."""
    tmpfs: TmpfsFile | None = None
    """A FIFO on a tmpfs: made again on the new VM."""

    @property
    def fifo(self) -> bool:
        return self.path is not None


def read_pipe(guest: Guest, file: drgn.Object) -> PipeState:
    """Read the pipe end open as ``file``; raise :class:`Unrecoverable` if the pipe was
    being changed or its ring is torn."""
    pipe = file.f_inode.i_pipe
    if not pipe:
        raise Unrecoverable("is a FIFO that no one has opened (no pipe)")
    if int(pipe.mutex.owner.counter):
        raise Unrecoverable("is a pipe caught mid-update (its mutex held)")
    head, tail, ring = int(pipe.head), int(pipe.tail), int(pipe.ring_size)
    if not 0 < ring <= _MAX_RING or ring & (ring - 1) or (head - tail) & 0xFFFF_FFFF > ring:
        raise Unrecoverable(f"is a pipe with a torn ring (head {head}, tail {tail}, "
                            f"size {ring})")
    chunks = []
    index = tail
    while index != head:
        buffer = pipe.bufs[index & (ring - 1)]
        offset, length = int(buffer.offset), int(buffer.len)
        if offset + length > PAGE:
            raise Unrecoverable("is a pipe with a torn buffer")
        if length:
            physical = int(page_to_phys(buffer.page))
            chunks.append(bytes(guest.ram.read(physical + offset, length)))
        index = (index + 1) & 0xFFFF_FFFF
    return PipeState(key=file.value_(), pipe_id=int(file.f_inode.i_ino),
                     flags=int(file.f_flags) & ~os.O_CLOEXEC, data=b"".join(chunks),
                     size=int(pipe.max_usage) * PAGE)
