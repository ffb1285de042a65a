"""Out-of-guest detection on real kernels: each injected fault is caught, health stays quiet."""

from __future__ import annotations

import json
import os
import shlex
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.detect.events import Event, Sample
from transmigrate.detect.lockup import SPIN_FUNCTION
from transmigrate.errors import TransmigrateError
from transmigrate.faults import (
    DEADLOCK_LOCK,
    DEADLOCK_THREAD,
    HANG_FUNCTION,
    clear,
    inject,
    load_module,
)
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.monitor import (
    Monitor,
    MonitorConfig,
    parse_interval,
    with_settings,
)
from transmigrate.orchestrate.services import start_redis
from transmigrate.vm.image import ImageSpec

from ..conftest import cli

KERNELS = [ACTIVE_KERNEL, STANDBY_KERNEL]


class Watching:
    def __init__(self, host: Host, vm: str, interval_s: float = 0.01,
                 locks: tuple[str, ...] = ()) -> None:
        self.monitor = Monitor(host, vm, MonitorConfig(interval_s=interval_s, locks=locks))
        self.events: list[Event] = []
        self.stopped = False
        self.thread = threading.Thread(target=lambda: self.monitor.run(
            self.events.append, stop=lambda: self.stopped), daemon=True)
        self.thread.start()

    def wait(self, kind: str, timeout: float) -> Event:
        return self.wait_for(lambda e: e.kind == kind, timeout)

    def wait_for(self, match: Callable[[Event], bool], timeout: float) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events if match(e)]
            if found:
                return found[0]
            time.sleep(0.01)
        raise AssertionError(f"no matching event within {timeout} s; got {self.events}")

    def stop(self) -> None:
        self.stopped = True
        self.thread.join()
        self.monitor.close()


@pytest.fixture
def vm(prepared: Host, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"t-mon-{request.param.split('.')[1]}"
    lifecycle.up(prepared, name, request.param, memory_mib=640, cpus=2)
    yield name
    lifecycle.down(prepared, name)


@pytest.mark.parametrize("vm", KERNELS, indirect=True)
def test_deadlock_is_caught_on_its_cpu(prepared: Host, vm: str) -> None:
    load_module(prepared, vm)
    watching = Watching(prepared, vm, locks=(f"{DEADLOCK_LOCK}:spinlock", "tasklist_lock"))
    try:
        report = inject(prepared, vm, "deadlock", cpu=1)
        event = watching.wait("lockup", timeout=10)
    finally:
        watching.stop()
    assert event.evidence["cpu"] == 1
    assert event.evidence["comm"] == DEADLOCK_THREAD.format(cpu=1)
    assert event.evidence["rule"] == "spinning"
    assert 0 < event.evidence["ran_ms"] <= event.evidence["stuck_ms"]
    assert SPIN_FUNCTION.search(event.evidence["function"])
    assert event.monotonic_ns / 1e9 > report.triggered_at
    assert [lock["name"] for lock in event.evidence["locks_held"]] == [DEADLOCK_LOCK]
    assert [e.kind for e in watching.events] == ["lockup"]


@pytest.mark.parametrize("vm", KERNELS, indirect=True)
def test_oops_then_panic_are_caught_and_nothing_else(prepared: Host, vm: str) -> None:
    watching = Watching(prepared, vm)
    try:
        oops = inject(prepared, vm, "oops")
        oopsed = watching.wait("oops", timeout=10)
        assert lifecycle.exec_in(prepared, vm, ["true"]).exit_code == 0  # the kernel runs on
        panic = inject(prepared, vm, "panic")
        panicked = watching.wait("panic", timeout=10)
        paused = watching.wait_for(lambda e: e.evidence.get("source") == "pvpanic", timeout=10)
    finally:
        watching.stop()
    assert oops.details["writer_exit"] != "0"
    assert oopsed.monotonic_ns / 1e9 > oops.triggered_at
    assert panicked.monotonic_ns / 1e9 > panic.triggered_at
    assert panicked.evidence["cpu"] in (0, 1)
    assert paused.monotonic_ns >= panicked.monotonic_ns
    assert [e.kind for e in watching.events] == ["oops", "panic", "panic"]
    assert prepared.machines.get(vm).status() == "guest-panicked"


@pytest.mark.parametrize("vm", KERNELS, indirect=True)
def test_hung_driver_and_fork_bomb_are_caught(prepared: Host, vm: str) -> None:
    watching = Watching(prepared, vm)
    try:
        inject(prepared, vm, "hung-driver", readers=5)
        hung = watching.wait("hung-driver", timeout=15)
        clear(prepared, vm)
        # Small children, so that the bomb piles up before memory runs out in this guest.
        inject(prepared, vm, "fork-bomb", bomb_seconds=20, bomb_mib=4)
        storm = watching.wait("fork-storm", timeout=20)
        clear(prepared, vm)
    finally:
        watching.stop()
    assert hung.evidence["function"] == HANG_FUNCTION
    assert hung.evidence["blocked"] >= 3
    assert storm.evidence["growth"] >= 40
    assert "lockup" not in [e.kind for e in watching.events], \
        [e for e in watching.events if e.kind == "lockup"]


SOAK_SECONDS = float(os.environ.get("TRANSMIGRATE_SOAK_SECONDS", "600"))
"""The healthy soak's length: the issue's 10 minutes (shorten only while developing)."""
SOAK_IMAGE = ImageSpec(extra_packages=("gcc", "libc6-dev", "stress-ng"))
"""The guest image plus a compiler and stress-ng, for legitimate heavy load."""
SOAK_LOAD = {
    "redis-benchmark": "redis-benchmark -q -n 1000000000 -c 20",
    "fork-exec loop": "while :; do /bin/true; done",
    "compile": "cd /tmp && i=0; while [ $i -lt 3000 ]; do "
               "echo \"int f$i(int x) { return x * $i + $i; }\"; i=$((i+1)); done > big.c; "
               "while :; do gcc -O2 -c big.c -o big.o; done",
    "stress-ng": "stress-ng --cpu 1 --vm 1 --vm-bytes 96M --io 1 --fork 1 --hdd 1 "
                 "--hdd-bytes 32M --timeout 0",
    "file I/O and fsync": "while :; do dd if=/dev/zero of=/data/fill bs=1M count=64 "
                          "conv=fsync 2>/dev/null; done",
}


@pytest.fixture
def soak_vm(prepared: Host, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"t-soak-{request.param.split('.')[1]}"
    lifecycle.up(prepared, name, request.param, image_spec=SOAK_IMAGE, memory_mib=640, cpus=2)
    yield name
    lifecycle.down(prepared, name)


@pytest.mark.parametrize("soak_vm", KERNELS, indirect=True)
def test_healthy_guest_under_heavy_load_raises_nothing(prepared: Host, soak_vm: str) -> None:
    start_redis(prepared, soak_vm)
    for what, script in SOAK_LOAD.items():
        started = lifecycle.exec_in(prepared, soak_vm, [
            "sh", "-c", f"setsid sh -c {shlex.quote(script)} </dev/null >/dev/null 2>&1 &"])
        assert started.exit_code == 0, what
    watching = Watching(prepared, soak_vm)
    try:
        time.sleep(SOAK_SECONDS)
        running = lifecycle.exec_in(prepared, soak_vm, [
            "sh", "-c", "pgrep -c redis-benchmark; pgrep -c stress-ng; pgrep -c cc1 || true"])
    finally:
        watching.stop()
    assert watching.events == []
    counts = running.text.split()
    assert counts[0] != "0" and counts[1] != "0", f"load died: {running.text!r}"


def test_monitor_json_prints_one_event_per_line(prepared: Host, new_vm: str) -> None:
    done = cli("monitor", new_vm, "--json", "--duration", "2", "--interval", "5ms",
               "--set", "hung-driver=100ms", "--set", "lockup_min_ms=50")
    assert done.returncode == 0, done.stderr
    assert all(json.loads(line)["kind"] for line in done.stdout.splitlines())
    assert "samples" in done.stderr


def test_each_detector_samples_at_its_own_interval(prepared: Host, new_vm: str) -> None:
    config = with_settings(MonitorConfig(interval_s=0.01), ["hung-driver=200ms"])
    monitor = Monitor(prepared, new_vm, config)
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


def test_bad_monitor_input(prepared: Host) -> None:
    with pytest.raises(TransmigrateError, match="outside"):
        parse_interval("20s")
    with pytest.raises(TransmigrateError, match="no VM named"):
        Monitor(prepared, "t-none")
    done = cli("inject", "t-none", "deadlock")
    assert done.returncode != 0 and "no VM named" in done.stderr
