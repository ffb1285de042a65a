"""The pre-copy policy stops when the dirty set is small or stops shrinking."""

from __future__ import annotations

from transmigrate.migrate.precopy import PreCopyPolicy

policy = PreCopyPolicy(max_iterations=8, small_enough_pages=64, min_shrink=0.10)


def test_first_iteration_always_runs() -> None:
    assert policy.should_continue([])


def test_continues_while_shrinking() -> None:
    assert policy.should_continue([10_000, 2_000, 500])


def test_stops_when_small() -> None:
    assert not policy.should_continue([10_000, 64])


def test_stops_when_no_longer_shrinking() -> None:
    assert not policy.should_continue([10_000, 90, 85])
    assert not policy.should_continue([10_000, 90, 120])


def test_stops_at_the_iteration_limit() -> None:
    assert not policy.should_continue([100_000 // 2**i for i in range(8)])


def test_post_copy_only_when_pre_copy_left_a_large_dirty_set() -> None:
    assert PreCopyPolicy(postcopy_above_pages=4096).should_postcopy([50_000, 48_000])
    assert not PreCopyPolicy(postcopy_above_pages=4096).should_postcopy([50_000, 60])
    assert not policy.should_postcopy([])
