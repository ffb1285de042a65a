"""Connections' state as a restore wants it (the sockets themselves are read against real
`criu dump` images in tests/recover/test_recover.py)."""

from __future__ import annotations

import pytest

from transmigrate.introspect.sockets import millisecond_timestamp


@pytest.mark.parametrize(("clock", "value"), [(1000, 1000), (1001, 1002), (2**32 - 1, 0)])
def test_timestamps_stay_in_milliseconds_and_never_go_back(clock: int, value: int) -> None:
    assert millisecond_timestamp(clock) == value
