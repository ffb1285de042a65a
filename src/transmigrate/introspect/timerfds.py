"""timerfd files as a stopped kernel holds them.

A timerfd is an hrtimer in its ``private_data`` (``struct timerfd_ctx``): its clock, the
absolute time it fires next on that clock, its interval, and the expirations counted
and not yet read. CRIU rebuilds it with timerfd_settime() from the time left, so the
time left is what the image holds; it is counted from the clocks as the kernel last
saw them (``clocks.read_clocks``), which the restored process's clocks continue.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import drgn

from transmigrate.errors import Unrecoverable
from transmigrate.introspect.clocks import KernelClocks

__all__ = ["TimerfdState", "read_timerfd"]

_HRTIMER_STATE_ENQUEUED = 0x01
_CLOCKS = (time.CLOCK_REALTIME, time.CLOCK_MONOTONIC, time.CLOCK_BOOTTIME)
"""The hrtimer clocks; the alarm clocks (``*_ALARM``) are timers of the RTC driver."""


@dataclass(frozen=True)
class TimerfdState:
    key: int
    """The ``struct file``."""
    flags: int
    clockid: int
    settime_flags: int
    ticks: int
    """Expirations counted and not yet read."""
    interval_ns: int
    expires_ns: int | None
    """When it fires next, on its clock; None if it is not armed."""

    def remaining_ns(self, clocks: KernelClocks) -> int:
        """The time left as timerfd_gettime() would say at the stop: at least 1 ns for a
        timer that was due (it fires at once on restore), 0 for one not armed."""
        if self.expires_ns is None:
            return 0
        now = {time.CLOCK_REALTIME: clocks.realtime_ns,
               time.CLOCK_MONOTONIC: clocks.monotonic_ns,
               time.CLOCK_BOOTTIME: clocks.boottime_ns}[self.clockid]
        return max(self.expires_ns - now, 1)


def read_timerfd(file: drgn.Object) -> TimerfdState:
    context = drgn.cast("struct timerfd_ctx *", file.private_data)
    clockid = int(context.clockid)
    if clockid not in _CLOCKS:
        raise Unrecoverable(f"is a timerfd on clock {clockid} (an alarm: not supported)")
    timer = context.t.tmr
    interval = int(context.tintv)
    expires: int | None = None
    if int(timer.state) & _HRTIMER_STATE_ENQUEUED:
        expires = int(timer.node.expires)
    elif int(context.expired) and interval:
        # a periodic timer that fired is armed again only when it is read: due now
        expires = 0
    return TimerfdState(key=file.value_(), flags=int(file.f_flags) & ~os.O_CLOEXEC,
                        clockid=clockid, settime_flags=int(context.settime_flags),
                        ticks=int(context.ticks), interval_ns=interval, expires_ns=expires)
