"""Out-of-guest detection on real kernels: each injected fault is caught, health stays quiet."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.detect.events import Sample
from transmigrate.detect.lockup import SPIN_FUNCTION
from transmigrate.errors import TransmigrateError
from transmigrate.faults import (
    DEADLOCK_LOCK,
    DEADLOCK_THREAD,
    HANG_FUNCTION,
    Deadlock,
    ForkBomb,
    HungDriver,
    Oops,
    Panic,
    clear,
    inject,
    load_module,
)
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.faults import fault_target
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.monitor import (
    Monitor,
    MonitorConfig,
    parse_interval,
    readings,
    with_settings,
)
from transmigrate.orchestrate.soak import SOAK_IMAGE, soak

from ..conftest import CLI, cli
from ..detect.samples import counters, cpu, cpus, memory, task, tasks

KERNELS = [ACTIVE_KERNEL, STANDBY_KERNEL]


def _watch(host: Host, vm: str, locks: tuple[str, ...] = ()) -> Monitor:
    return Monitor.attach(host, vm, MonitorConfig(interval_s=0.01, locks=locks))


@pytest.fixture
def vm(prepared: Host, request: pytest.FixtureRequest) -> Iterator[str]:
    """A 2-vCPU guest of its own: the fault tried on it is for good."""
    name = f"t-mon-{request.param.split('.')[1]}"
    lifecycle.up(prepared, name, request.param, memory_mib=640, cpus=2)
    yield name
    lifecycle.down(prepared, name)


@pytest.mark.parametrize("vm", KERNELS, indirect=True)
def test_deadlock_is_caught_on_its_cpu(prepared: Host, vm: str) -> None:
    target = fault_target(prepared, vm)
    load_module(target)
    with _watch(prepared, vm, (f"{DEADLOCK_LOCK}:spinlock", "tasklist_lock")).start() as watch:
        report = inject(target, Deadlock(cpu=1))
        event = watch.wait("lockup", timeout=10)
    assert event is not None, watch.events
    assert event.evidence["cpu"] == 1
    assert event.evidence["comm"] == DEADLOCK_THREAD.format(cpu=1)
    assert event.evidence["rule"] == "spinning", event.evidence
    assert 0 < event.evidence["ran_ms"] <= event.evidence["stuck_ms"]
    assert SPIN_FUNCTION.search(event.evidence["function"])
    assert event.monotonic_ns / 1e9 > report.triggered_at
    assert [lock["name"] for lock in event.evidence["locks_held"]] == [DEADLOCK_LOCK]
    assert [e.kind for e in watch.events] == ["lockup"]


@pytest.mark.parametrize("vm", KERNELS, indirect=True)
def test_oops_then_panic_are_caught_and_nothing_else(prepared: Host, vm: str) -> None:
    target = fault_target(prepared, vm)
    with _watch(prepared, vm).start() as watch:
        oops = inject(target, Oops())
        oopsed = watch.wait("oops", timeout=10)
        assert lifecycle.exec_in(prepared, vm, ["true"]).exit_code == 0  # the kernel runs on
        panic = inject(target, Panic())
        panicked = watch.wait("panic", timeout=10)
        paused = watch.wait_for(lambda e: e.evidence.get("source") == "pvpanic", timeout=10)
    assert oopsed is not None and panicked is not None and paused is not None, watch.events
    assert oops.details["writer_exit"] != "0"
    assert oopsed.monotonic_ns / 1e9 > oops.triggered_at
    assert panicked.monotonic_ns / 1e9 > panic.triggered_at
    assert panicked.evidence["cpu"] in (0, 1)
    assert paused.monotonic_ns >= panicked.monotonic_ns
    assert [e.kind for e in watch.events] == ["oops", "panic", "panic"]
    machine = prepared.machines.get(vm)
    assert machine.status() == "guest-panicked"
    assert "Kernel panic - not syncing" in machine.console_tail(), "the cause, not the offset"


@pytest.mark.parametrize("vm", KERNELS, indirect=True)
def test_hung_driver_and_fork_bomb_are_caught(prepared: Host, vm: str) -> None:
    target = fault_target(prepared, vm)
    with _watch(prepared, vm).start() as watch:
        inject(target, HungDriver(readers=5))
        hung = watch.wait("hung-driver", timeout=15)
        clear(target)
        # Small children, so that the bomb piles up before memory runs out in this guest.
        inject(target, ForkBomb(seconds=20, mib=4))
        storm = watch.wait("fork-storm", timeout=20)
        clear(target)
    assert hung is not None and storm is not None, watch.events
    assert hung.evidence["function"] == HANG_FUNCTION
    assert hung.evidence["blocked"] >= 3
    assert storm.evidence["growth"] >= 40
    assert "lockup" not in [e.kind for e in watch.events], \
        [e for e in watch.events if e.kind == "lockup"]


SOAK_SECONDS = float(os.environ.get("TRANSMIGRATE_SOAK_SECONDS", "120"))
"""The suite's healthy soak; bench/soak.py runs the ten-minute one."""


@pytest.fixture
def soak_vms(prepared: Host) -> Iterator[list[str]]:
    names = [f"t-soak-{kernel.split('.')[1]}" for kernel in KERNELS]
    try:
        for name, kernel in zip(names, KERNELS, strict=True):
            lifecycle.up(prepared, name, kernel, image_spec=SOAK_IMAGE, memory_mib=640, cpus=2)
        yield names
    finally:
        for name in names:
            lifecycle.down(prepared, name)


def test_healthy_guests_under_heavy_load_raise_nothing(prepared: Host,
                                                       soak_vms: list[str]) -> None:
    """Both kernels at once, each with two vCPUs on this host's two cores: contention for
    the host's CPUs must not look like a lockup either."""
    with ThreadPoolExecutor(len(soak_vms)) as pool:
        reports = list(pool.map(lambda vm: soak(prepared, vm, SOAK_SECONDS), soak_vms))
    for report in reports:
        assert report.events == (), report.vm
        assert report.samples > SOAK_SECONDS * 20, report
        assert all(report.load_running.values()), f"load died: {report}"


def test_monitor_json_prints_each_event_as_one_line(prepared: Host, new_vm: str) -> None:
    monitor = subprocess.Popen(
        [str(CLI), "monitor", new_vm, "--json", "--duration", "12", "--interval", "5ms",
         "--set", "hung-driver=100ms", "--detector", "hung-driver"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = fault_target(prepared, new_vm)
    try:
        time.sleep(3)  # attached and sampling
        inject(target, HungDriver(readers=4))
        out, err = monitor.communicate(timeout=60)
    finally:
        if monitor.poll() is None:
            monitor.kill()
        clear(target)
    assert monitor.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["kind"] for line in lines] == ["hung-driver"], out
    assert lines[0]["evidence"]["function"] == HANG_FUNCTION
    assert isinstance(lines[0]["monotonic_ns"], int) and lines[0]["summary"]
    assert "samples" in err


def test_each_detector_samples_at_its_own_interval(prepared: Host, new_vm: str) -> None:
    config = with_settings(MonitorConfig(interval_s=0.01), ["hung-driver=200ms"])
    monitor = Monitor.attach(prepared, new_vm, config)
    samples: list[Sample] = []
    try:
        stats = monitor.run(lambda e: None, duration_s=2.0, on_sample=samples.append)
    finally:
        monitor.close()
    with_tasks = [s for s in samples if s.tasks is not None]
    assert 150 <= stats.samples <= 210
    assert 8 <= len(with_tasks) <= 11
    assert all(s.cpus is not None for s in samples)


def test_settings_name_intervals_and_thresholds() -> None:
    config = with_settings(MonitorConfig(), ["interval=5ms", "hung-driver=100ms",
                                             "hung_min_tasks=4", "lockup_min_ms=50"])
    assert config.interval_of("lockup") == 0.005
    assert config.interval_of("hung-driver") == 0.1
    assert config.hung_min_tasks == 4 and config.lockup_min_ms == 50.0
    for bad, message in (("colour=red", "unknown setting"), ("hung_min_tasks=x", "a number"),
                         ("lockup=20s", "outside"), ("lockup", "NAME=VALUE")):
        with pytest.raises(TransmigrateError, match=message):
            with_settings(MonitorConfig(), [bad])


def test_readings_are_what_a_person_watches() -> None:
    shown = readings({
        "tasks": tasks(1, task(1, "S"), task(2, "R"), task(3, "D"), task(4, "D")).tasks,
        "memory": memory(1, free_mib=300, total_mib=512).memory,
        "counters": counters(1, forks=900, processes=4).counters,
        "cpus": cpus(1, cpu(0, 10, pid=2, comm="redis-server"), cpu(1, 5, idle=True)).cpus})
    assert shown == {
        "tasks": {"D": 2, "R": 1, "S": 1}, "memory_free_mib": 300, "memory_total_mib": 512,
        "processes": 4, "threads": 4, "forks": 900,
        "cpus": [{"cpu": 0, "running": "redis-server", "switches": 10, "preempt": 0},
                 {"cpu": 1, "running": "idle", "switches": 5, "preempt": 0}]}
    assert readings({}) == {}


def test_bad_monitor_input(prepared: Host) -> None:
    with pytest.raises(TransmigrateError, match="outside"):
        parse_interval("20s")
    with pytest.raises(TransmigrateError, match="no VM named"):
        Monitor.attach(prepared, "t-none")
    done = cli("inject", "t-none", "deadlock")
    assert done.returncode != 0 and "no VM named" in done.stderr
