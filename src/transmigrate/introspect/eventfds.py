"""eventfd and signalfd files as a stopped kernel holds them.

Both are anonymous-inode files whose whole state is a word in their
``private_data``: an eventfd's counter, a signalfd's signal mask (kept inverted by
the kernel). CRIU rebuilds each with one system call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import drgn

__all__ = ["EventfdState", "SignalfdState", "read_eventfd", "read_signalfd"]

_SIGSET_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class EventfdState:
    key: int
    """The ``struct file``."""
    flags: int
    counter: int


@dataclass(frozen=True)
class SignalfdState:
    key: int
    """The ``struct file``."""
    flags: int
    sigmask: int
    """The signals it reads, as signalfd() was given them."""


def read_eventfd(file: drgn.Object) -> EventfdState:
    context = drgn.cast("struct eventfd_ctx *", file.private_data)
    return EventfdState(key=file.value_(), flags=int(file.f_flags) & ~os.O_CLOEXEC,
                        counter=int(context.count))


def read_signalfd(file: drgn.Object) -> SignalfdState:
    context = drgn.cast("struct signalfd_ctx *", file.private_data)
    return SignalfdState(key=file.value_(), flags=int(file.f_flags) & ~os.O_CLOEXEC,
                         sigmask=~int(context.sigmask.sig[0]) & _SIGSET_MASK)
