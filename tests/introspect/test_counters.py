"""Process, thread and fork counters read from guest memory follow the guest."""

from __future__ import annotations

import pytest

from transmigrate.introspect.counters import CounterReader, fork_rate, sum_per_cpu
from transmigrate.introspect.tasks import TaskReader

from .conftest import GUESTS, Attached


@pytest.mark.parametrize("fixture", GUESTS)
def test_counts_agree_with_the_task_list_and_forks_count(
        fixture: str, request: pytest.FixtureRequest) -> None:
    vm: Attached = request.getfixturevalue(fixture)
    counters = CounterReader(vm.guest)
    tasks = TaskReader(vm.guest)
    before = counters.sample()
    sample = tasks.sample()
    assert abs(before.threads - len(sample.tasks)) <= 2
    assert abs(before.processes - len(sample.processes)) <= 2
    vm.run("for i in 1 2 3 4 5 6 7 8 9 10; do /bin/true; done")
    after = counters.sample()
    assert after.total_forks - before.total_forks >= 10
    assert fork_rate(before, after) > 0


def test_per_cpu_process_counts_below_zero_wrap_as_in_the_kernel() -> None:
    """Seen on 6.12 in the soak: unsummed, one CPU's -12 made 88 processes 2**64 + 88."""
    assert sum_per_cpu([100, 2**64 - 12]) == 88
    assert sum_per_cpu([3, 4]) == 7
