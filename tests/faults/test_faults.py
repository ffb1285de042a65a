"""Fault injection on real 6.1 and 6.12 guests: the module builds and loads, and each fault
really happens (readers stuck in D, a CPU that stops scheduling, a growing bomb)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.errors import FaultError
from transmigrate.faults import (
    DEADLOCK_THREAD,
    FAULTS,
    HANG_FUNCTION,
    MODULE_NAME,
    Deadlock,
    FaultTarget,
    ForkBomb,
    HungDriver,
    MemoryBomb,
    Oops,
    build_module,
    clear,
    fault_status,
    inject,
    session_pids,
    spec_for,
)
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.faults import fault_target
from transmigrate.orchestrate.host import Host
from transmigrate.process import run


def test_specs_by_name_take_only_their_own_options() -> None:
    assert FAULTS == ("deadlock", "hung-driver", "fork-bomb", "memory-bomb", "oops", "panic")
    assert spec_for("deadlock", cpu=1, irqs_off=None) == Deadlock(cpu=1)
    assert spec_for("fork-bomb", seconds=5) == ForkBomb(seconds=5)
    assert spec_for("oops") == Oops()
    for fault, options, message in (("meltdown", {}, "unknown fault 'meltdown'"),
                                    ("oops", {"cpu": 1}, "oops takes no cpu"),
                                    ("hung-driver", {"readers": 0}, "at least one reader"),
                                    ("fork-bomb", {"seconds": 0}, "a duration"),
                                    ("memory-bomb", {"mib": 0}, "a size in MiB"),
                                    ("deadlock", {"all_cpus": True, "cpu": 1},
                                     "neither a cpu nor irqs_off")):
        with pytest.raises(FaultError, match=message):
            spec_for(fault, **options)


def _up(host: Host, name: str, kernel: str) -> Iterator[FaultTarget]:
    lifecycle.up(host, name, kernel, memory_mib=512, cpus=2)
    yield fault_target(host, name)
    lifecycle.down(host, name)


@pytest.fixture(scope="module", params=[ACTIVE_KERNEL, STANDBY_KERNEL], ids=["6.1", "6.12"])
def vm(request: pytest.FixtureRequest, prepared: Host) -> Iterator[FaultTarget]:
    """A 2-vCPU guest per kernel for the faults that can be cleared."""
    yield from _up(prepared, "t-fault-" + request.param.replace(".", "")[:6], request.param)


@pytest.fixture
def wedged_vm(request: pytest.FixtureRequest, prepared: Host) -> Iterator[FaultTarget]:
    """A 2-vCPU guest of its own, for a deadlock that is never cleared."""
    yield from _up(prepared, "t-wedge-" + request.param.replace(".", "")[:6], request.param)


def sh(vm: FaultTarget, script: str, timeout: float = 60) -> str:
    return vm.agent.sh(script, timeout=timeout).text


def test_module_builds_for_the_kernel_and_is_cached(prepared: Host, vm: FaultTarget) -> None:
    kernel = prepared.catalog.fetch(vm.kernel.release, headers=True)
    ko = build_module(kernel)
    assert run(["modinfo", "-F", "vermagic", ko]).split()[0] == kernel.release
    mtime = ko.stat().st_mtime_ns
    assert build_module(kernel) == ko
    assert ko.stat().st_mtime_ns == mtime, "a second build reuses the cached module"


def test_hung_driver_readers_pile_up_in_d_and_stay_there(vm: FaultTarget) -> None:
    report = inject(vm, HungDriver(readers=4))
    assert report.session is not None
    assert len(report.pids) == 4
    assert MODULE_NAME in sh(vm, "lsmod")
    time.sleep(1)
    sh(vm, f"kill -KILL {' '.join(map(str, report.pids))}")  # D: not even SIGKILL
    time.sleep(1)
    readers = [p for p in session_pids(vm, report.session) if p[3] == "cat"]
    assert sorted(p[0] for p in readers) == sorted(report.pids)
    assert all(stat.startswith("D") and wchan == HANG_FUNCTION for _, stat, wchan, _ in readers)
    status = fault_status(vm)
    assert status["hang_readers"] == 4
    assert status["hang_writes"] >= 1, "data was written and woke nobody"

    cleared = clear(vm)
    assert set(cleared.cleared) == {"hung-driver", "module"}
    assert session_pids(vm, report.session) == []
    assert MODULE_NAME not in sh(vm, "lsmod")


def _load(vm: FaultTarget) -> tuple[int, int]:
    """(processes, MemAvailable in KiB) of the guest."""
    out = sh(vm, "ls -d /proc/[0-9]* | wc -l; sed -n 's/^MemAvailable: *//p' "
                       "/proc/meminfo", timeout=30).split()
    return int(out[0]), int(out[1])


def test_fork_bomb_grows_and_clear_stops_it(vm: FaultTarget) -> None:
    procs0, avail0 = _load(vm)
    report = inject(vm, ForkBomb(seconds=300, mib=16, maximum=16, delay_ms=100))
    assert report.session is not None
    samples = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        samples.append(_load(vm))
        if samples[-1][0] >= procs0 + 15 and samples[-1][1] < avail0 - 150 * 1024:
            break
        time.sleep(0.3)
    procs, avail = samples[-1]
    assert procs >= procs0 + 15, samples
    assert avail < avail0 - 150 * 1024, samples
    assert samples[0][0] < procs, "the number of processes grew while we watched"

    cleared = clear(vm)
    assert "bombs" in cleared.cleared
    assert session_pids(vm, report.session) == []
    procs1, avail1 = _load(vm)
    assert procs1 <= procs0 + 3
    assert avail1 > avail0 - 64 * 1024


def test_memory_bomb_grows_one_process_and_clear_stops_it(vm: FaultTarget) -> None:
    procs0, avail0 = _load(vm)
    report = inject(vm, MemoryBomb(seconds=300, mib=8, delay_ms=50))
    assert report.session is not None
    samples = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        samples.append(_load(vm))
        if samples[-1][1] < avail0 - 150 * 1024:
            break
        time.sleep(0.3)
    procs, avail = samples[-1]
    assert avail < avail0 - 150 * 1024, samples
    assert procs <= procs0 + 3, "one process grows; none are forked"
    assert len(session_pids(vm, report.session)) == 1

    assert "bombs" in clear(vm).cleared
    assert session_pids(vm, report.session) == []
    assert _load(vm)[1] > avail0 - 64 * 1024


def _sched_counts(vm: FaultTarget) -> dict[str, int]:
    """Each CPU's count of timeslices run (tasks switched in), from /proc/schedstat."""
    out = sh(vm, "grep '^cpu' /proc/schedstat", timeout=20)
    return {line.split()[0]: int(line.split()[9]) for line in out.splitlines()}


@pytest.mark.parametrize("wedged_vm", [ACTIVE_KERNEL, STANDBY_KERNEL], indirect=True)
def test_deadlock_wedges_one_cpu_while_the_other_runs(wedged_vm: FaultTarget) -> None:
    vm = wedged_vm
    report = inject(vm, Deadlock(cpu=1))
    assert report.cpu == 1
    assert report.details["state"] == "spinning"
    ps = sh(vm, "ps -eo stat=,psr=,comm=")
    assert any(line.split()[1:] == ["1", DEADLOCK_THREAD.format(cpu=1)] and line.startswith("R")
               for line in ps.splitlines()), ps
    before = _sched_counts(vm)
    time.sleep(2)
    after = _sched_counts(vm)
    assert after["cpu1"] == before["cpu1"], "CPU 1 never schedules again"
    assert after["cpu0"] > before["cpu0"], "CPU 0 keeps running"
    agent = vm.agent
    pinned = agent.spawn(["taskset", "-c", "1", "true"])
    time.sleep(3)
    assert agent.poll(pinned) is None, "a process pinned to CPU 1 never gets to run"
    assert clear(vm).remaining == ("deadlock",)
