"""Watching a guest kernel from the host: sample its memory at an interval, run detectors.

The loop (:class:`Monitor`) takes its readers (:class:`GuestReaders`), so it
runs on recorded samples in tests; :meth:`Monitor.attach` wires them to a
running VM's RAM (introspect) and QEMU (vm).

The guest does no work for this: every sample is read straight out of its RAM
file. Each detector has its own interval (by default the monitor's); a sample
reads only what the detectors due at that moment need. A read torn by the
running guest is counted and skips the detectors that need it, never fatal. A
lockup event is enriched with the kernel function the stuck CPU executes, from
QEMU's view of its registers, symbolized with the kernel's debug info, and with
the state of the locks the operator named. Once the kernel has panicked, what
else trips is its consequence (the panicking CPU spins with preemption off):
only the panic is reported.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from types import TracebackType
from typing import Any

from transmigrate.detect.events import READERS, Detector, Event, Sample
from transmigrate.detect.forks import (
    MIB,
    ForkStormDetector,
    MemoryExhaustionDetector,
    biggest_grower,
    forking_tree,
)
from transmigrate.detect.hung import HungDriverDetector
from transmigrate.detect.lockup import SPIN_FUNCTION, LockupDetector
from transmigrate.detect.panic import PanicDetector
from transmigrate.errors import IntrospectionError, MachineError, TransmigrateError
from transmigrate.introspect.counters import CounterReader
from transmigrate.introspect.cpus import CpuReader
from transmigrate.introspect.kernel import attach
from transmigrate.introspect.locks import LockReader, LockState
from transmigrate.introspect.mm import MemoryReader, resident_bytes
from transmigrate.introspect.panic import PanicReader
from transmigrate.introspect.symbols import symbolize
from transmigrate.introspect.tasks import Task, TaskReader, wait_site
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.lifecycle import running
from transmigrate.polling import wait_for
from transmigrate.vm.machine import Machine
from transmigrate.vm.registers import instruction_pointer
from transmigrate.vm.vcpus import VcpuClock

__all__ = ["DETECTORS", "LOCKUP_MIN_MS", "LOCKUP_SPIN_MS", "GuestReaders", "Monitor",
           "MonitorConfig", "MonitorStats", "Watch", "guest_readers", "parse_interval",
           "readings", "with_settings"]

_DETECTOR_CLASSES: dict[str, type[Detector]] = {
    "lockup": LockupDetector, "fork-storm": ForkStormDetector,
    "memory-exhaustion": MemoryExhaustionDetector, "hung-driver": HungDriverDetector,
    "panic": PanicDetector}
DETECTORS = tuple(_DETECTOR_CLASSES)
_STATUS_EVERY_NS = 1_000_000_000
LOCKUP_MIN_MS = {"kvm": 100.0, "tcg": 300.0}
"""Default lockup floors. Under TCG guest code runs many times slower: a healthy
kernel under the 10-minute soak once sat 110 ms in one preempt-off stretch (dd,
fsync). With KVM guest code runs at native speed (not measurable here: KVM
guests fail on this machine)."""
LOCKUP_SPIN_MS = {"kvm": 20.0, "tcg": 300.0}
"""Default floors for a CPU seen spinning on a lock. Under TCG a lock holder's
vCPU is a host thread that the host may not run for a scheduling period or two;
with two loaded 2-vCPU guests on two host cores, a healthy 6.12 guest once spun
73 ms of run time on a lock (the suite's soak), so TCG's floor is the stuck
rule's."""
_RIP_LOOKS = 7
"""Looks at a CPU's registers to name the function of an event."""
_SPIN_LOOKS = 3
"""Looks at a stuck CPU's registers to tell whether it spins on a lock (~2.5 ms each)."""
_TREE_WALKS = 3
"""Task walks to name a fork storm's culprit; the storm can tear each one."""
_GROWTH_LOOK_S = 0.2
"""Between the two looks at every process's resident memory that name the biggest grower."""


def _by_accel(setting: float | None, defaults: dict[str, float], accel: str) -> float:
    """The operator's ``setting``, else the default for ``accel`` (TCG's if unknown)."""
    return setting if setting is not None else defaults.get(accel, defaults["tcg"])


def parse_interval(text: str) -> float:
    """'10ms', '1s', '0.5' (seconds) -> seconds; between 1 ms and 10 s."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|us)?\s*", text)
    if not match:
        raise TransmigrateError(f"cannot read interval {text!r}: use e.g. 10ms or 1s")
    value = float(match.group(1)) * {"ms": 1e-3, "us": 1e-6, "s": 1.0, None: 1.0}[match.group(2)]
    if not 0.001 <= value <= 10.0:
        raise TransmigrateError(f"interval {text} is outside 1 ms .. 10 s")
    return value


@dataclass(frozen=True)
class MonitorConfig:
    interval_s: float = 0.01
    detector_intervals: tuple[tuple[str, float], ...] = ()
    """(detector, seconds): a detector that samples at its own interval."""
    detectors: tuple[str, ...] = DETECTORS
    lockup_samples: int = 2
    lockup_min_ms: float | None = None
    """How long a CPU must look stuck; None: by accelerator (see LOCKUP_MIN_MS)."""
    lockup_spin_ms: float | None = None
    """How long a CPU must spin on a lock; None: by accelerator (see LOCKUP_SPIN_MS)."""
    fork_min_growth: int = 40
    fork_min_rate: float = 5.0
    fork_window_ms: float = 5000.0
    memory_min_free_fraction: float = 0.05
    hung_min_tasks: int = 3
    hung_min_blocked_ms: float = 500.0
    locks: tuple[str, ...] = ()
    """Locks to report with lockup and hung-driver events: NAME or NAME:KIND."""

    def interval_of(self, detector: str) -> float:
        return dict(self.detector_intervals).get(detector, self.interval_s)


_THRESHOLDS = {f.name: str(f.type) for f in fields(MonitorConfig)
               if f.name not in ("interval_s", "detector_intervals", "detectors", "locks")}
"""The numeric thresholds, by name, with their type's name."""


def with_settings(config: MonitorConfig, settings: list[str]) -> MonitorConfig:
    """``config`` with ``interval=10ms``, ``DETECTOR=100ms`` (its interval) or
    ``THRESHOLD=VALUE`` (a MonitorConfig field, e.g. ``lockup_min_ms=50``) applied."""
    changes: dict[str, Any] = {}
    intervals = dict(config.detector_intervals)
    for setting in settings:
        key, _, value = setting.partition("=")
        if not value:
            raise TransmigrateError(f"cannot read {setting!r}: use NAME=VALUE")
        if key == "interval":
            changes["interval_s"] = parse_interval(value)
        elif key in DETECTORS:
            intervals[key] = parse_interval(value)
        elif key in _THRESHOLDS:
            try:
                changes[key] = int(value) if _THRESHOLDS[key].startswith("int") \
                    else float(value)
            except ValueError:
                raise TransmigrateError(f"{key} wants a number, not {value!r}") from None
        else:
            raise TransmigrateError(f"unknown setting {key!r}; known: interval, "
                                    f"{', '.join(DETECTORS)}, {', '.join(_THRESHOLDS)}")
    return replace(config, detector_intervals=tuple(sorted(intervals.items())), **changes)


@dataclass
class MonitorStats:
    samples: int = 0
    torn_samples: int = 0
    """Samples with at least one torn read."""
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    events: list[Event] = field(default_factory=list)

    @property
    def cpu_fraction(self) -> float:
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds else 0.0


def _check(config: MonitorConfig) -> None:
    if not config.detectors:
        raise TransmigrateError("no detector to run")
    unknown = (set(config.detectors) | set(dict(config.detector_intervals))) - set(DETECTORS)
    if unknown:
        raise TransmigrateError(f"unknown detector {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(DETECTORS)}")


def _nothing(*_: object) -> None:
    return None


@dataclass(frozen=True)
class GuestReaders:
    """Everything the monitor reads from a guest, as callables."""

    samplers: Mapping[str, Callable[[], Any]]
    """One per reader of :data:`READERS` the detectors need; raise IntrospectionError
    on a read torn by the running guest."""
    label: str = "guest"
    """What is watched, for people: the VM and its kernel."""
    accel: str = "tcg"
    cpu_function: Callable[[int], str | None] = _nothing
    """The kernel function a CPU executes now (one look)."""
    wait_site: Callable[[Task], str | None] = _nothing
    """The kernel function a blocked task sleeps in."""
    resident: Callable[[Sequence[Task]], dict[int, int]] = lambda _: {}
    """Resident memory in bytes of each of these processes that still exists."""
    locks: Callable[[], tuple[LockState, ...]] | None = None
    """The named locks' states; None when no lock was named."""
    vm_ended: Callable[[], Event | None] = _nothing
    """An event once the VM is gone or paused by a panic."""
    close: Callable[[], None] = _nothing


def guest_readers(host: Host, vm: str, needs: frozenset[str],
                  locks: tuple[str, ...] = ()) -> GuestReaders:
    """Readers of the running VM ``vm``: its RAM through the kernel's types, QEMU's view
    of its vCPUs, and its QEMU's state."""
    machine = running(host, vm)
    guest = attach(machine, catalog=host.catalog)
    try:
        lock_reader = LockReader(guest, locks) if locks else None
    except IntrospectionError:
        guest.close()
        raise
    samplers: dict[str, Callable[[], Any]] = {}
    vcpus = VcpuClock(machine) if "vcpus" in needs else None
    if "cpus" in needs:
        samplers["cpus"] = CpuReader(guest).sample
    if vcpus is not None:
        samplers["vcpus"] = vcpus.sample
    if "tasks" in needs:
        samplers["tasks"] = TaskReader(guest).sample
    if "memory" in needs:
        samplers["memory"] = MemoryReader(guest).sample
    if "counters" in needs:
        samplers["counters"] = CounterReader(guest).sample
    if "health" in needs:
        samplers["health"] = PanicReader(guest).sample

    def cpu_function(cpu: int) -> str | None:
        address = instruction_pointer(machine, cpu)
        return None if address is None else symbolize(guest, address)

    def site(task: Task) -> str | None:
        try:
            found = wait_site(guest, task)
        except IntrospectionError:
            return None
        return found.function if found else None

    def close() -> None:
        if vcpus is not None:
            vcpus.close()
        guest.close()

    return GuestReaders(samplers, f"{vm} ({guest.release})", machine.record.accel,
                        cpu_function, site, lambda tasks: resident_bytes(guest, tasks),
                        lock_reader.sample if lock_reader else None,
                        _vm_ended(machine), close)


def _vm_ended(machine: Machine) -> Callable[[], Event | None]:
    """Whether ``machine`` died, or QEMU stopped it on a guest panic, as an event."""

    def ended() -> Event | None:
        if not machine.alive():
            return Event("vm-dead", time.monotonic_ns(), f"{machine.name}: QEMU is gone")
        with contextlib.suppress(MachineError):
            if machine.status() == "guest-panicked":
                return Event("panic", time.monotonic_ns(),
                             "guest panicked (pvpanic); QEMU paused it", {"source": "pvpanic"})
        return None

    return ended


class Monitor:
    """Runs detectors over samples from ``readers``; ``run`` samples until told to stop."""

    def __init__(self, readers: GuestReaders, config: MonitorConfig = MonitorConfig()) -> None:
        _check(config)
        self.config = config
        self.readers = readers
        self.detectors = self._detectors(config)
        missing = set().union(*(d.needs for d in self.detectors)) - set(readers.samplers)
        if missing:
            raise TransmigrateError(f"no reader for {', '.join(sorted(missing))}")
        assert set(readers.samplers) <= set(READERS)

    @classmethod
    def attach(cls, host: Host, vm: str, config: MonitorConfig = MonitorConfig()) -> Monitor:
        """A monitor of the running VM ``vm``."""
        _check(config)
        needs = frozenset().union(*(_DETECTOR_CLASSES[name].needs for name in config.detectors))
        if {"fork-storm", "memory-exhaustion"} & set(config.detectors):
            needs |= {"tasks"}  # their culprits are found in the task list
        return cls(guest_readers(host, vm, needs, config.locks), config)

    def _detectors(self, config: MonitorConfig) -> list[Detector]:
        accel = self.readers.accel
        built: dict[str, Detector] = {
            "lockup": LockupDetector(
                config.lockup_samples,
                _by_accel(config.lockup_min_ms, LOCKUP_MIN_MS, accel),
                _by_accel(config.lockup_spin_ms, LOCKUP_SPIN_MS, accel),
                where=lambda cpu: self._cpu_function(cpu, _SPIN_LOOKS, prefer=SPIN_FUNCTION)),
            "fork-storm": ForkStormDetector(config.fork_min_growth, config.fork_min_rate,
                                            config.fork_window_ms),
            "memory-exhaustion": MemoryExhaustionDetector(config.memory_min_free_fraction),
            "hung-driver": HungDriverDetector(self.readers.wait_site, config.hung_min_tasks,
                                              config.hung_min_blocked_ms),
            "panic": PanicDetector(),
        }
        return [built[name] for name in config.detectors]

    def sample(self, needs: frozenset[str] | None = None) -> tuple[Sample, frozenset[str]]:
        """One look at the guest: every reader, or those in ``needs``; and the readers
        whose read tore (their part of the sample is None). A torn task walk under a
        fork bomb must not cost the fork counters their sample."""
        readings, torn = {}, set()
        start_ns = time.monotonic_ns()
        for name, read in self.readers.samplers.items():
            if needs is None or name in needs:
                try:
                    readings[name] = read()
                except IntrospectionError:
                    torn.add(name)
        now_ns = time.monotonic_ns()
        return Sample(now_ns, (now_ns - start_ns) / 1e9, **readings), frozenset(torn)

    def lock_states(self) -> tuple[LockState, ...]:
        """The named locks now; empty if none were named or a read tore."""
        if self.readers.locks is None:
            return ()
        try:
            return self.readers.locks()
        except IntrospectionError:
            return ()

    def close(self) -> None:
        self.readers.close()

    def start(self, on_event: Callable[[Event], None] | None = None,
              on_sample: Callable[[Sample], None] | None = None) -> Watch:
        """Run in a background thread until the returned :class:`Watch` is stopped."""
        return Watch(self, on_event, on_sample)

    def run(self, on_event: Callable[[Event], None], *, duration_s: float | None = None,
            on_sample: Callable[[Sample], None] | None = None,
            stop: Callable[[], bool] = lambda: False) -> MonitorStats:
        """Run each detector at its interval until ``stop()``, ``duration_s`` or the
        VM's end. A detector that fell behind skips ahead rather than bursting."""
        stats = MonitorStats()
        interval_ns = {d.name: int(self.config.interval_of(d.name) * 1e9)
                       for d in self.detectors}
        start_ns = time.monotonic_ns()
        cpu_start = time.process_time()
        due_ns = dict.fromkeys(interval_ns, start_ns)
        next_status_ns = start_ns + _STATUS_EVERY_NS
        panicked = False
        while not stop():
            now = time.monotonic_ns()
            if duration_s is not None and now - start_ns >= duration_s * 1e9:
                break
            wake = min(due_ns.values())
            if now < wake:
                time.sleep((wake - now) / 1e9)
                now = time.monotonic_ns()
            due = [d for d in self.detectors if due_ns[d.name] <= now]
            for detector in due:
                due_ns[detector.name] += interval_ns[detector.name]
                if due_ns[detector.name] < now:
                    due_ns[detector.name] = now + interval_ns[detector.name]
            sample, torn = self.sample(frozenset().union(*(d.needs for d in due)))
            stats.samples += 1
            stats.torn_samples += bool(torn)
            if on_sample is not None:
                on_sample(sample)
            for detector in due:
                if detector.needs & torn:
                    continue
                for event in detector.observe(sample):
                    if panicked and event.kind != "oops":
                        continue
                    panicked = panicked or event.kind == "panic"
                    event = self._enrich(event)
                    stats.events.append(event)
                    on_event(event)
            if sample.monotonic_ns >= next_status_ns:
                next_status_ns = sample.monotonic_ns + _STATUS_EVERY_NS
                ended = self.readers.vm_ended()
                if ended is not None:
                    stats.events.append(ended)
                    on_event(ended)
                    break
        stats.wall_seconds = (time.monotonic_ns() - start_ns) / 1e9
        stats.cpu_seconds = time.process_time() - cpu_start
        return stats

    def _enrich(self, event: Event) -> Event:
        if event.kind == "fork-storm":
            return self._with_forking_tree(event)
        if event.kind == "memory-exhaustion":
            return self._with_biggest_grower(event)
        if event.kind not in ("lockup", "hung-driver"):
            return event
        summary, evidence = event.summary, dict(event.evidence)
        held = [lock for lock in self.lock_states() if lock.held]
        if self.readers.locks is not None:
            evidence["locks_held"] = [lock.as_dict() for lock in held]
        if event.kind == "lockup" and "function" in evidence:
            summary += f" in {evidence['function']}"
        elif event.kind == "lockup":
            function = self._cpu_function(int(event.evidence["cpu"]), _RIP_LOOKS)
            if function is not None:
                summary, evidence["function"] = f"{summary} in {function}", function
        if held:
            summary += f"; held: {', '.join(lock.name for lock in held)}"
        return Event(event.kind, event.monotonic_ns, summary, evidence)

    def _with_forking_tree(self, event: Event) -> Event:
        """``event`` naming the tree that made the storm's new processes (a task walk
        torn by the storm is tried again, a few times)."""
        read = self.readers.samplers.get("tasks")
        for _ in range(_TREE_WALKS):
            if read is None:
                break
            try:
                found = forking_tree(read(), int(event.evidence["growth"]))
            except IntrospectionError:
                continue
            if found is None:
                break
            root, size = found
            evidence = {**event.evidence, "culprit": root.pid, "culprit_comm": root.comm,
                        "culprit_tree": size}
            return Event(event.kind, event.monotonic_ns,
                         f"{event.summary}; made by {root.comm} (pid {root.pid}), "
                         f"{size} processes in its tree", evidence)
        return event

    def _with_biggest_grower(self, event: Event) -> Event:
        """``event`` naming the process whose resident memory grew most in
        :data:`_GROWTH_LOOK_S` (see ``biggest_grower``)."""
        read = self.readers.samplers.get("tasks")
        if read is None:
            return event
        try:
            processes = read().processes
        except IntrospectionError:
            return event
        before = self.readers.resident(processes)
        time.sleep(_GROWTH_LOOK_S)
        after = self.readers.resident(processes)
        pid = biggest_grower(before, after)
        if pid is None:
            return event
        comm = next(task.comm for task in processes if task.pid == pid)
        grew = (after[pid] - before.get(pid, after[pid])) // MIB
        evidence = {**event.evidence, "culprit": pid, "culprit_comm": comm,
                    "culprit_mib": after[pid] // MIB, "culprit_grew_mib": grew}
        return Event(event.kind, event.monotonic_ns,
                     f"{event.summary}; biggest grower {comm} (pid {pid}), "
                     f"{after[pid] // MIB} MiB resident, +{grew} MiB in "
                     f"{_GROWTH_LOOK_S:g} s", evidence)

    def _cpu_function(self, cpu: int, looks: int, prefer: re.Pattern[str] | None = None,
                      ) -> str | None:
        """The kernel function CPU ``cpu`` executes: the first of ``looks`` looks at its
        registers that matches ``prefer``, else the most frequent, since a stuck CPU with
        interrupts on is sometimes caught in its timer interrupt: one look into a lock's
        spin loop is enough to tell a CPU spinning (the suite once called a 6.12 guest's
        deadlock merely stuck when the most frequent look was elsewhere)."""
        seen: Counter[str] = Counter()
        for _ in range(looks):
            function = self.readers.cpu_function(cpu)
            if function is not None and prefer is not None and prefer.search(function):
                return function
            if function is not None:
                seen[function] += 1
        return seen.most_common(1)[0][0] if seen else None


def readings(latest: Mapping[str, Any]) -> dict[str, Any]:
    """What a person watches, from the newest reading of each reader (by name, as in
    :class:`Sample`): tasks by state, memory in MiB, processes, threads and forks so
    far, and per CPU what runs there, its context switches and preemption count."""
    shown: dict[str, Any] = {}
    tasks = latest.get("tasks")
    if tasks is not None:
        states: dict[str, int] = {}
        for task in tasks.tasks:
            states[task.state] = states.get(task.state, 0) + 1
        shown["tasks"] = dict(sorted(states.items()))
    memory = latest.get("memory")
    if memory is not None:
        shown["memory_free_mib"], shown["memory_total_mib"] = memory.free >> 20, memory.total >> 20
    counters = latest.get("counters")
    if counters is not None:
        shown.update(processes=counters.processes, threads=counters.threads,
                     forks=counters.total_forks)
    cpus = latest.get("cpus")
    if cpus is not None:
        shown["cpus"] = [{"cpu": cpu.cpu, "running": "idle" if cpu.idle else cpu.current_comm,
                          "switches": cpu.context_switches, "preempt": cpu.preempt_count}
                         for cpu in cpus.cpus]
    return shown


class Watch:
    """A monitor running in a background thread: the events so far, when each kind first
    arrived, and the latest sample. Stop it (or leave its ``with`` block) to get the
    stats; the monitor is closed then."""

    def __init__(self, monitor: Monitor, on_event: Callable[[Event], None] | None = None,
                 on_sample: Callable[[Sample], None] | None = None) -> None:
        self.monitor = monitor
        self.events: list[Event] = []
        self.received_at: dict[str, float] = {}
        """Host ``time.monotonic()`` when the first event of each kind arrived."""
        self.latest: Sample | None = None
        self.at_event: dict[str, Sample | None] = {}
        """The latest sample when the first event of each kind arrived."""
        self._on_event, self._on_sample = on_event, on_sample
        self._stopping = threading.Event()
        self._outcome: MonitorStats | BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        def on_event(event: Event) -> None:
            self.received_at.setdefault(event.kind, time.monotonic())
            self.at_event.setdefault(event.kind, self.latest)
            self.events.append(event)
            if self._on_event is not None:
                self._on_event(event)

        def on_sample(sample: Sample) -> None:
            self.latest = sample
            if self._on_sample is not None:
                self._on_sample(sample)

        try:
            self._outcome = self.monitor.run(on_event, on_sample=on_sample,
                                             stop=self._stopping.is_set)
        except BaseException as exc:  # handed to whoever stops the watch
            self._outcome = exc

    @property
    def running(self) -> bool:
        """Whether it still samples (it ends by itself when the VM does)."""
        return self._thread.is_alive()

    def wait(self, kind: str, timeout: float) -> Event | None:
        """The first event of ``kind``, waiting up to ``timeout`` seconds; None if none."""
        return self.wait_for(lambda event: event.kind == kind, timeout)

    def wait_for(self, match: Callable[[Event], bool], timeout: float) -> Event | None:
        """The first event that ``match``es, waiting up to ``timeout`` seconds; None if none."""
        def found() -> Event | None:
            return next((event for event in self.events if match(event)), None)

        try:
            return wait_for(found, timeout=timeout, interval=0.001, what="no such event")
        except TransmigrateError:
            return None

    def stop(self) -> MonitorStats:
        """Stop sampling and close the monitor (once; later calls return the same stats);
        a failure of the loop is raised here."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._thread.join()
            self.monitor.close()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
