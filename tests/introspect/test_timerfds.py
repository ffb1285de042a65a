"""The time a timerfd has left, counted from the clocks at the stop (the reading itself
is compared with a real criu dump in tests/recover)."""

from __future__ import annotations

import time

from transmigrate.introspect.clocks import KernelClocks
from transmigrate.introspect.timerfds import TimerfdState

CLOCKS = KernelClocks(monotonic_ns=50 * 10**9, boottime_ns=60 * 10**9,
                      realtime_ns=1_800_000_000 * 10**9)


def _timer(clockid: int, expires_ns: int | None) -> TimerfdState:
    return TimerfdState(key=1, flags=0, clockid=clockid, settime_flags=0, ticks=0,
                        interval_ns=0, expires_ns=expires_ns)


def test_time_left_is_counted_on_the_timers_own_clock() -> None:
    assert _timer(time.CLOCK_MONOTONIC, 53 * 10**9).remaining_ns(CLOCKS) == 3 * 10**9
    assert _timer(time.CLOCK_BOOTTIME, 63 * 10**9).remaining_ns(CLOCKS) == 3 * 10**9
    assert _timer(time.CLOCK_REALTIME, (1_800_000_000 + 3) * 10**9).remaining_ns(CLOCKS) \
        == 3 * 10**9


def test_a_timer_due_fires_at_once_and_one_not_armed_stays_so() -> None:
    assert _timer(time.CLOCK_MONOTONIC, 49 * 10**9).remaining_ns(CLOCKS) == 1
    assert _timer(time.CLOCK_MONOTONIC, 0).remaining_ns(CLOCKS) == 1
    assert _timer(time.CLOCK_MONOTONIC, None).remaining_ns(CLOCKS) == 0
