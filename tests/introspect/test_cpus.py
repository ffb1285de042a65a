"""Per-CPU liveness read from guest memory moves with the guest, on both kernels."""

from __future__ import annotations

import time

import pytest

from transmigrate.introspect.cpus import CpuReader

from .conftest import GUESTS, Attached


@pytest.mark.parametrize("fixture", GUESTS)
def test_cpus_match_the_guest_and_progress(fixture: str,
                                           request: pytest.FixtureRequest) -> None:
    vm: Attached = request.getfixturevalue(fixture)
    reader = CpuReader(vm.guest)
    first = reader.sample()
    assert len(first.cpus) == int(vm.run("nproc").text)
    vm.run("i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done")
    second = reader.sample()
    assert second.jiffies > first.jiffies
    for before, after in zip(first.cpus, second.cpus, strict=True):
        assert after.context_switches > before.context_switches
        assert after.clock_ns > before.clock_ns
        assert after.timer_interrupts is not None and before.timer_interrupts is not None
        assert after.timer_interrupts > before.timer_interrupts
        assert after.watchdog_touch_ts is not None and after.hrtimer_interrupts is not None
        assert after.preempt_count is not None


@pytest.mark.parametrize("fixture", GUESTS)
def test_current_task_is_seen_busy_and_idle(fixture: str,
                                            request: pytest.FixtureRequest) -> None:
    vm: Attached = request.getfixturevalue(fixture)
    reader = CpuReader(vm.guest)
    idle = reader.sample().cpus[0]
    assert idle.idle and idle.current_pid == 0 and idle.current_comm == "swapper/0"
    pid = int(vm.run("timeout 5 sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 & "
                     "echo $!").text)
    deadline = time.monotonic() + 4
    seen: set[tuple[str, bool]] = set()
    while time.monotonic() < deadline and not any(comm == "sh" for comm, _ in seen):
        cpu = reader.sample().cpus[0]
        seen.add((cpu.current_comm, cpu.idle))
        time.sleep(0.005)
    vm.run(f"kill {pid} 2>/dev/null; true")
    assert ("sh", False) in seen, seen
