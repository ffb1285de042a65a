"""epoll instances as a stopped kernel holds them: what each one watches.

An ``eventpoll`` keeps its watched files in a red-black tree of ``epitem``s, each
naming the file and the descriptor it was added by, the events asked for and the
user's data word. CRIU re-adds them with ``epoll_ctl`` by descriptor number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import drgn
from drgn.helpers.linux.rbtree import rbtree_inorder_for_each_entry

from transmigrate.errors import Unrecoverable

__all__ = ["EpollState", "EpollTarget", "read_epoll"]

_MAX_TARGETS = 65536


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


def read_epoll(file: drgn.Object, open_files: dict[int, int]) -> EpollState:
    """Read the epoll instance open as ``file``. ``open_files`` maps each of the
    process's descriptors to its ``struct file``: a watched file no longer open under
    the descriptor it was added by cannot be re-added, and is named in ``losses``."""
    poll = drgn.cast("struct eventpoll *", file.private_data)
    if int(poll.mtx.owner.counter) or int(poll.lock.rlock.raw_lock.val.counter):
        raise Unrecoverable("is an epoll instance caught mid-update (its lock held)")
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
        inode = watched.f_inode
        targets.append(EpollTarget(fd=fd, events=int(item.event.events),
                                   data=int(item.event.data), dev=int(inode.i_sb.s_dev),
                                   inode=int(inode.i_ino), pos=int(watched.f_pos)))
    return EpollState(key=file.value_(), flags=int(file.f_flags) & ~os.O_CLOEXEC,
                      targets=tuple(targets), losses=tuple(losses))
