"""Fault injection on real 6.1 and 6.12 guests: the module builds and loads, and each fault
really happens (readers stuck in D, a CPU that stops scheduling, a growing bomb)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.faults import (
    DEADLOCK_THREAD,
    HANG_FUNCTION,
    MODULE_NAME,
    build_module,
    clear,
    fault_status,
    inject,
    session_pids,
)
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.process import run

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module", params=[ACTIVE_KERNEL, STANDBY_KERNEL], ids=["6.1", "6.12"])
def vm(request: pytest.FixtureRequest, prepared: Host) -> Iterator[str]:
    """A 2-vCPU guest per kernel; the deadlock test, last in this file, wedges it."""
    name = "t-fault-" + request.param.replace(".", "")[:6]
    lifecycle.up(prepared, name, request.param, memory_mib=512, cpus=2)
    yield name
    lifecycle.down(prepared, name)


def sh(host: Host, vm: str, script: str, timeout: float = 60) -> str:
    result = lifecycle.exec_in(host, vm, ["sh", "-c", script], timeout=timeout)
    assert result.exit_code == 0, result.stderr
    return result.text


def test_module_builds_for_the_kernel_and_is_cached(prepared: Host, vm: str) -> None:
    machine = prepared.machines.get(vm)
    kernel = prepared.catalog.fetch(machine.record.kernel, headers=True)
    ko = build_module(kernel)
    assert run(["modinfo", "-F", "vermagic", ko]).split()[0] == kernel.release
    mtime = ko.stat().st_mtime_ns
    assert build_module(kernel) == ko
    assert ko.stat().st_mtime_ns == mtime, "a second build reuses the cached module"


def test_hung_driver_readers_pile_up_in_d_and_stay_there(prepared: Host, vm: str) -> None:
    report = inject(prepared, vm, "hung-driver", readers=4)
    assert report.session is not None
    assert len(report.pids) == 4
    assert MODULE_NAME in sh(prepared, vm, "lsmod")
    time.sleep(1)
    sh(prepared, vm, f"kill -KILL {' '.join(map(str, report.pids))}")  # D: not even SIGKILL
    time.sleep(1)
    readers = [p for p in session_pids(prepared, vm, report.session) if p[3] == "cat"]
    assert sorted(p[0] for p in readers) == sorted(report.pids)
    assert all(stat.startswith("D") and wchan == HANG_FUNCTION for _, stat, wchan, _ in readers)
    status = fault_status(prepared, vm)
    assert status["hang_readers"] == 4
    assert status["hang_writes"] >= 1, "data was written and woke nobody"

    cleared = clear(prepared, vm)
    assert set(cleared.cleared) == {"hung-driver", "module"}
    assert session_pids(prepared, vm, report.session) == []
    assert MODULE_NAME not in sh(prepared, vm, "lsmod")


def _load(host: Host, vm: str) -> tuple[int, int]:
    """(processes, MemAvailable in KiB) of the guest."""
    out = sh(host, vm, "ls -d /proc/[0-9]* | wc -l; sed -n 's/^MemAvailable: *//p' "
                       "/proc/meminfo", timeout=30).split()
    return int(out[0]), int(out[1])


def test_fork_bomb_grows_and_clear_stops_it(prepared: Host, vm: str) -> None:
    procs0, avail0 = _load(prepared, vm)
    report = inject(prepared, vm, "fork-bomb", bomb_seconds=300, bomb_mib=16, bomb_max=16,
                    bomb_delay_ms=100)
    assert report.session is not None
    samples = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        samples.append(_load(prepared, vm))
        if samples[-1][0] >= procs0 + 15 and samples[-1][1] < avail0 - 150 * 1024:
            break
        time.sleep(0.3)
    procs, avail = samples[-1]
    assert procs >= procs0 + 15, samples
    assert avail < avail0 - 150 * 1024, samples
    assert samples[0][0] < procs, "the number of processes grew while we watched"

    cleared = clear(prepared, vm)
    assert "fork-bomb" in cleared.cleared
    assert session_pids(prepared, vm, report.session) == []
    procs1, avail1 = _load(prepared, vm)
    assert procs1 <= procs0 + 3
    assert avail1 > avail0 - 64 * 1024


def _sched_counts(host: Host, vm: str) -> dict[str, int]:
    """Each CPU's count of timeslices run (tasks switched in), from /proc/schedstat."""
    out = sh(host, vm, "grep '^cpu' /proc/schedstat", timeout=20)
    return {line.split()[0]: int(line.split()[9]) for line in out.splitlines()}


def test_deadlock_wedges_one_cpu_while_the_other_runs(prepared: Host, vm: str) -> None:
    """Last in the file: the guest's CPU 1 never comes back."""
    report = inject(prepared, vm, "deadlock", cpu=1)
    assert report.cpu == 1
    assert report.details["state"] == "spinning"
    ps = sh(prepared, vm, "ps -eo stat=,psr=,comm=")
    assert any(line.split()[1:] == ["1", DEADLOCK_THREAD.format(cpu=1)] and line.startswith("R")
               for line in ps.splitlines()), ps
    before = _sched_counts(prepared, vm)
    time.sleep(2)
    after = _sched_counts(prepared, vm)
    assert after["cpu1"] == before["cpu1"], "CPU 1 never schedules again"
    assert after["cpu0"] > before["cpu0"], "CPU 0 keeps running"
    agent = prepared.agent(prepared.machines.get(vm))
    pinned = agent.spawn(["taskset", "-c", "1", "true"])
    time.sleep(3)
    assert agent.poll(pinned) is None, "a process pinned to CPU 1 never gets to run"
    assert clear(prepared, vm).remaining == ("deadlock",)
