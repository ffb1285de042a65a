"""The monitor's loop on recorded readers: scheduling, torn reads, enrichment, the end
of a VM, and the background watch. Real guests are in test_monitor.py."""

from __future__ import annotations

import time

import pytest

from transmigrate.detect.events import Event
from transmigrate.errors import IntrospectionError, TransmigrateError
from transmigrate.introspect.locks import LockState
from transmigrate.introspect.panic import KernelHealth
from transmigrate.introspect.tasks import Task, TaskSample
from transmigrate.orchestrate.monitor import GuestReaders, Monitor, MonitorConfig

from ..detect.samples import task

CONFIG = MonitorConfig(interval_s=0.005, detectors=("hung-driver", "panic"),
                       hung_min_tasks=3, hung_min_blocked_ms=30)
READERS = tuple(range(10, 15))


class Recorded:
    """Guest readings that change when the test says so; every third task walk tears."""

    def __init__(self) -> None:
        self.readers_blocked = False
        self.panic_cpu = -1
        self.walks = 0

    def tasks(self) -> TaskSample:
        self.walks += 1
        if self.walks % 3 == 0:
            raise IntrospectionError("a task list torn by the running guest")
        state = "D" if self.readers_blocked else "S"
        return TaskSample(tuple(task(pid, state) for pid in READERS), time.monotonic_ns())

    def health(self) -> KernelHealth:
        return KernelHealth(self.panic_cpu, 0, time.monotonic_ns())

    def readers(self, ended: list[Event] | None = None) -> GuestReaders:
        def site(blocked: Task) -> str | None:
            return "tm_hang_read" if blocked.pid in READERS else None

        return GuestReaders(
            {"tasks": self.tasks, "health": self.health}, label="recorded", wait_site=site,
            locks=lambda: (LockState("tm_fault_lock", "spinlock", held=True, waiters=True),),
            vm_ended=lambda: ended.pop() if ended else None)


def test_hung_readers_become_one_enriched_event_and_torn_walks_are_skipped() -> None:
    guest = Recorded()
    with Monitor(guest.readers(), CONFIG).start() as watch:
        time.sleep(0.1)
        assert watch.events == []
        guest.readers_blocked = True
        event = watch.wait("hung-driver", timeout=5)
    stats = watch.stop()
    assert event is not None, watch.events
    assert event.evidence["function"] == "tm_hang_read"
    assert event.evidence["locks_held"][0]["name"] == "tm_fault_lock"
    assert event.summary.endswith("held: tm_fault_lock")
    assert [e.kind for e in stats.events] == ["hung-driver"]
    assert stats.torn_samples >= 1
    assert stats.samples > stats.torn_samples


def test_after_a_panic_only_the_panic_is_reported() -> None:
    guest = Recorded()
    with Monitor(guest.readers(), CONFIG).start() as watch:
        guest.panic_cpu = 1
        assert watch.wait("panic", timeout=5) is not None
        guest.readers_blocked = True  # a consequence of the panic, not news
        time.sleep(0.2)
    assert [e.kind for e in watch.events] == ["panic"]
    assert watch.events[0].evidence["cpu"] == 1


def test_the_end_of_the_vm_ends_the_run() -> None:
    gone = Event("vm-dead", 0, "QEMU is gone")
    stats = Monitor(Recorded().readers([gone]), CONFIG).run(lambda _: None, duration_s=5)
    assert stats.events == [gone]
    assert stats.wall_seconds < 2


def test_detector_intervals_decide_what_each_sample_reads() -> None:
    guest = Recorded()
    config = MonitorConfig(interval_s=0.005, detectors=("hung-driver", "panic"),
                           detector_intervals=(("hung-driver", 0.05),))
    stats = Monitor(guest.readers(), config).run(lambda _: None, duration_s=0.5)
    assert 60 <= stats.samples <= 110
    assert 7 <= guest.walks <= 12


def test_a_failing_loop_is_raised_by_stop() -> None:
    def broken() -> KernelHealth:
        raise RuntimeError("reader bug")

    readers = GuestReaders({"health": broken, "tasks": Recorded().tasks})
    watch = Monitor(readers, CONFIG).start()
    with pytest.raises(RuntimeError, match="reader bug"):
        time.sleep(0.05)
        watch.stop()


def test_a_detector_without_its_reader_is_refused() -> None:
    with pytest.raises(TransmigrateError, match="no reader for tasks"):
        Monitor(GuestReaders({"health": Recorded().health}), CONFIG)
    with pytest.raises(TransmigrateError, match="unknown detector"):
        Monitor(Recorded().readers(), MonitorConfig(detectors=("telepathy",)))
