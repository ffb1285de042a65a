"""File locks a process holds: POSIX record locks (``fcntl``) and ``flock`` locks.

A restored process that believed it held a lock and does not would let another
process into what it guards (sqlite's database, a daemon's pid file), so the locks
go with it: read from each open file's ``inode->i_flctx`` as ``/proc/locks`` shows
them, and rebuilt by ``criu restore --file-locks``. CRIU 3.17 rebuilds these two
kinds only: an open file description lock (``F_OFD_SETLK``) or a lease is refused.
6.9 moved the common fields into ``struct file_lock_core`` (include/linux/filelock.h).
"""

from __future__ import annotations

from dataclasses import dataclass

import drgn
from drgn.helpers.linux.list import list_for_each_entry

from transmigrate.errors import IntrospectionError

__all__ = ["FileLockState", "read_locks"]

_FL_POSIX, _FL_FLOCK, _FL_OFDLCK = 1, 2, 1024
_F_RDLCK, _F_WRLCK = 0, 1
_OFFSET_MAX = (1 << 63) - 1
_MAX_LOCKS = 1 << 12
"""More locks than this on one file: its list is corrupt."""


@dataclass(frozen=True)
class FileLockState:
    """One lock as CRIU's ``file_lock_entry`` has it: ``kind`` 1 (POSIX) or 2 (flock),
    ``type`` F_RDLCK (0) or F_WRLCK (1), and for POSIX the byte range (``length`` 0:
    to the end of the file). ``fd`` is a descriptor of its file in the owner. A flock
    lock belongs to an open file, which processes of a tree may share (``file``); the
    one that took it is ``taker``."""

    kind: int
    type: int
    fd: int
    start: int
    length: int
    file: int = 0
    taker: int = 0

    @property
    def posix(self) -> bool:
        return self.kind == _FL_POSIX


def read_locks(task: drgn.Object, files: dict[int, drgn.Object]) -> list[FileLockState]:
    """The locks ``task``'s process holds through ``files`` (its open files by
    descriptor): its POSIX locks (owned by its file table) once per file, and the
    flock locks of each open file description. IntrospectionError for a lock CRIU
    cannot rebuild or a list that does not check out."""
    owner = task.files.value_()
    ours = {file.value_() for file in files.values()}
    locks: list[FileLockState] = []
    seen_inodes: set[int] = set()
    for fd, file in sorted(files.items()):
        inode = file.f_inode
        context = inode.i_flctx
        if not context or inode.value_() in seen_inodes:
            continue
        seen_inodes.add(inode.value_())
        if int(context.flc_lock.rlock.raw_lock.val.counter):
            raise IntrospectionError(f"fd {fd}: its file's locks were being changed "
                                     "(flc_lock held)")
        if context.flc_lease.next.value_() != context.flc_lease.address_of_().value_():
            raise IntrospectionError(f"fd {fd}: its file has a lease (not supported yet)")
        # As CRIU's dump names them: by the highest descriptor of the file (any would do).
        by_file = {f.value_(): number for number, f in sorted(files.items())
                   if f.f_inode.value_() == inode.value_()}
        last = max(by_file.values())
        for lock in _entries(context.flc_flock):
            holder = _field(lock, "file").value_()
            if holder in by_file:
                locks.append(FileLockState(_FL_FLOCK, _type(lock, fd), by_file[holder], 0, 0,
                                           holder, int(_field(lock, "pid"))))
        for lock in _entries(context.flc_posix):
            if int(_field(lock, "flags")) & _FL_OFDLCK:
                if _field(lock, "file").value_() in ours:
                    raise IntrospectionError(f"fd {fd}: an open file description lock "
                                             "(F_OFD_SETLK; CRIU 3.17 cannot rebuild it)")
                continue
            if _field(lock, "owner").value_() != owner:
                continue
            start, end = int(lock.fl_start), int(lock.fl_end)
            if not 0 <= start <= end:
                raise IntrospectionError(f"fd {fd}: a lock's range is corrupt "
                                         f"({start}-{end})")
            length = 0 if end == _OFFSET_MAX else end - start + 1
            locks.append(FileLockState(_FL_POSIX, _type(lock, fd), last, start, length))
    return locks


def _entries(head: drgn.Object) -> list[drgn.Object]:
    """The locks on one of a file's lists, bounded."""
    member = "c.flc_list" if _has_core(head.prog_) else "fl_list"
    locks = []
    for lock in list_for_each_entry("struct file_lock", head.address_of_(), member):
        locks.append(lock)
        if len(locks) > _MAX_LOCKS:
            raise IntrospectionError("a file's lock list is corrupt (too long)")
    return locks


def _has_core(prog: drgn.Program) -> bool:
    """Whether the kernel has ``struct file_lock_core`` (6.9 and later)."""
    return bool(prog.type("struct file_lock").has_member("c"))


def _field(lock: drgn.Object, name: str) -> drgn.Object:
    """``fl_NAME`` (before 6.9) or ``c.flc_NAME`` of the lock ``lock`` points to."""
    return lock.c.member_(f"flc_{name}") if _has_core(lock.prog_) \
        else lock.member_(f"fl_{name}")


def _type(lock: drgn.Object, fd: int) -> int:
    kind = int(_field(lock, "type"))
    if kind not in (_F_RDLCK, _F_WRLCK):
        raise IntrospectionError(f"fd {fd}: a lock of unknown type {kind}")
    return kind
