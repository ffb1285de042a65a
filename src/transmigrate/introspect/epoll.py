"""epoll instances as a stopped kernel holds them: what each one watches.

An ``eventpoll`` keeps its watched files in a red-black tree of ``epitem``s, each
naming the file and the descriptor it was added by, the events asked for and the
user's data word. CRIU re-adds them with ``epoll_ctl`` by descriptor number.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import drgn
from drgn.helpers.linux.rbtree import rbtree_inorder_for_each_entry

from transmigrate.errors import Unrecoverable

__all__ = ["EpollState", "EpollTarget", "read_epoll"]

_MAX_TARGETS = 65536
_MUTEX_FLAGS = 0x07
"""The flag bits in the low bits of a mutex's owner word."""
_EPOLLONESHOT = 1 << 30


@dataclass(frozen=True)
class EpollTarget:
    """One watched descriptor, as /proc/PID/fdinfo shows it (CRIU's eventpoll_tfd_entry)."""

    fd: int
    events: int
    data: int
    dev: int
    inode: int
    pos: int


@dataclass(frozen=True)
class EpollState:
    key: int
    """The ``struct file``."""
    flags: int
    targets: tuple[EpollTarget, ...]
    losses: tuple[str, ...] = ()
    """Watches the restore cannot have (of files this process closed since)."""


def read_epoll(file: drgn.Object, open_files: dict[int, int],
               waiting: Callable[[drgn.Object], bool]) -> EpollState:
    """Read the epoll instance open as ``file``. ``open_files`` maps each of the
    process's descriptors to its ``struct file``: a watched file no longer open under
    the descriptor it was added by cannot be re-added, and is named in ``losses``.

    Only what it watches is read (its red-black tree, changed under its mutex by
    epoll_ctl and by closing a watched file); the ready list, under its spinlock, is
    not: the restore's epoll_ctl polls each file anew. So the mutex may be held by a
    task that ``waiting`` says was inside epoll_wait (which hands out ready events and
    changes nothing in the tree, unless a watch is one-shot: delivering disarms it)."""
    poll = drgn.cast("struct eventpoll *", file.private_data)
    owner = int(poll.mtx.owner.counter) & ~_MUTEX_FLAGS
    try:
        delivering = bool(owner) and waiting(
            drgn.Object(file.prog_, "struct task_struct *", owner))
    except drgn.FaultError:
        delivering = False
    if owner and not delivering:
        raise Unrecoverable("is an epoll instance caught mid-update (its mutex held by a "
                            "change to what it watches)")
    targets: list[EpollTarget] = []
    losses: list[str] = []
    for item in rbtree_inorder_for_each_entry("struct epitem", poll.rbr.rb_root.address_of_(),
                                              "rbn"):
        if len(targets) >= _MAX_TARGETS:
            raise Unrecoverable("is an epoll instance with a corrupt tree")
        watched, fd = item.ffd.file, int(item.ffd.fd)
        if open_files.get(fd) != watched.value_():
            # Closed here since (a forked child closing its parent's descriptors): it
            # stays watched while open elsewhere, but nothing can re-add it by number.
            losses.append(f"an epoll watch on fd {fd}, closed since")
            continue
        if delivering and int(item.event.events) & _EPOLLONESHOT:
            raise Unrecoverable("is an epoll instance caught handing out events with a "
                                "one-shot watch (it may be disarmed for an event never "
                                "delivered)")
        inode = watched.f_inode
        targets.append(EpollTarget(fd=fd, events=int(item.event.events),
                                   data=int(item.event.data), dev=int(inode.i_sb.s_dev),
                                   inode=int(inode.i_ino), pos=int(watched.f_pos)))
    return EpollState(key=file.value_(), flags=int(file.f_flags) & ~os.O_CLOEXEC,
                      targets=tuple(targets), losses=tuple(losses))
