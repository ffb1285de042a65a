"""Named locks read the same on both kernels; names that are not locks are refused."""

from __future__ import annotations

import pytest

from transmigrate.errors import IntrospectionError
from transmigrate.introspect.locks import LockReader, parse_lock

from .conftest import GUESTS, Attached


@pytest.mark.parametrize("fixture", GUESTS)
def test_each_kind_of_lock_reads_free_in_a_quiet_guest(
        fixture: str, request: pytest.FixtureRequest) -> None:
    vm: Attached = request.getfixturevalue(fixture)
    # A spinlock, a mutex and a rwlock that a quiet guest does not hold.
    reader = LockReader(vm.guest, ["module_mutex", "tasklist_lock", "cgroup_mutex",
                                   "swap_lock"])
    states = {lock.name: lock for lock in reader.sample()}
    assert {name: lock.kind for name, lock in states.items()} == {
        "module_mutex": "mutex", "tasklist_lock": "rwlock", "cgroup_mutex": "mutex",
        "swap_lock": "spinlock"}
    assert states["module_mutex"].held is False and states["module_mutex"].holder_pid is None
    assert states["tasklist_lock"].readers == 0


@pytest.mark.parametrize("fixture", GUESTS)
def test_names_that_are_not_locks_are_refused(
        fixture: str, request: pytest.FixtureRequest) -> None:
    vm: Attached = request.getfixturevalue(fixture)
    with pytest.raises(IntrospectionError, match="not a lock"):
        LockReader(vm.guest, ["jiffies"])
    with pytest.raises(IntrospectionError, match="no symbol 'tm_no_such_lock'"):
        LockReader(vm.guest, ["tm_no_such_lock:spinlock"])


def test_lock_names_are_parsed() -> None:
    assert parse_lock("tm_fault_lock:spinlock") == ("tm_fault_lock", "spinlock")
    assert parse_lock("cgroup_mutex") == ("cgroup_mutex", None)
    with pytest.raises(IntrospectionError, match="NAME:KIND"):
        parse_lock("x:semaphore")
