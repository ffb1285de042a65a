"""Watching a guest kernel from the host: sample its memory at an interval, run detectors.

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
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from transmigrate.detect.events import READERS, Detector, Event, Sample
from transmigrate.detect.forks import ForkStormDetector, MemoryExhaustionDetector
from transmigrate.detect.hung import HungDriverDetector
from transmigrate.detect.lockup import LockupDetector
from transmigrate.detect.panic import PanicDetector
from transmigrate.errors import IntrospectionError, MachineError, TransmigrateError
from transmigrate.introspect.counters import CounterReader
from transmigrate.introspect.cpus import CpuReader
from transmigrate.introspect.kernel import Guest, attach
from transmigrate.introspect.locks import LockReader, LockState
from transmigrate.introspect.mm import MemoryReader
from transmigrate.introspect.panic import PanicReader
from transmigrate.introspect.tasks import Task, TaskReader, wait_site
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.lifecycle import running
from transmigrate.vm.machine import Machine
from transmigrate.vm.vcpus import VcpuClock

__all__ = ["DETECTORS", "LOCKUP_MIN_MS", "LOCKUP_SPIN_MS", "Monitor", "MonitorConfig",
           "MonitorStats", "parse_interval", "with_settings"]

DETECTORS = ("lockup", "fork-storm", "memory-exhaustion", "hung-driver", "panic")
_STATUS_EVERY_NS = 1_000_000_000
LOCKUP_MIN_MS = {"kvm": 100.0, "tcg": 300.0}
"""Default lockup floors. Under TCG guest code runs many times slower: a healthy
kernel under the 10-minute soak once sat 110 ms in one preempt-off stretch (dd,
fsync). With KVM guest code runs at native speed (not measurable here: KVM
guests fail on this machine)."""
LOCKUP_SPIN_MS = {"kvm": 20.0, "tcg": 50.0}
"""Default floors for a CPU seen spinning on a lock. Under TCG a lock holder's
vCPU is a host thread that the host may not run for a scheduling period or two."""
_RIP_LOOKS = 7
"""Looks at a CPU's registers to name the function of an event."""
_SPIN_LOOKS = 3
"""Looks at a stuck CPU's registers to tell whether it spins on a lock (~2.5 ms each)."""


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


class Monitor:
    """Attached to one running VM; ``run`` samples until told to stop."""

    def __init__(self, host: Host, vm: str, config: MonitorConfig = MonitorConfig()) -> None:
        if not config.detectors:
            raise TransmigrateError("no detector to run")
        unknown = (set(config.detectors) | set(dict(config.detector_intervals))) - set(DETECTORS)
        if unknown:
            raise TransmigrateError(f"unknown detector {', '.join(sorted(unknown))}; "
                                    f"known: {', '.join(DETECTORS)}")
        self.machine: Machine = running(host, vm)
        self.config = config
        self.guest: Guest = attach(self.machine, catalog=host.catalog)
        self.detectors = self._detectors(config)
        needs = set().union(*(d.needs for d in self.detectors))
        self._readers: dict[str, Callable[[], Any]] = {}
        self._vcpus = VcpuClock(self.machine) if "vcpus" in needs else None
        if "cpus" in needs:
            self._readers["cpus"] = CpuReader(self.guest).sample
        if self._vcpus is not None:
            self._readers["vcpus"] = self._vcpus.sample
        if "tasks" in needs:
            self._readers["tasks"] = TaskReader(self.guest).sample
        if "memory" in needs:
            self._readers["memory"] = MemoryReader(self.guest).sample
        if "counters" in needs:
            self._readers["counters"] = CounterReader(self.guest).sample
        if "health" in needs:
            self._readers["health"] = PanicReader(self.guest).sample
        assert set(self._readers) <= set(READERS)
        self._locks = LockReader(self.guest, config.locks) if config.locks else None

    def _detectors(self, config: MonitorConfig) -> list[Detector]:
        accel = self.machine.record.accel
        built: dict[str, Detector] = {
            "lockup": LockupDetector(
                config.lockup_samples,
                _by_accel(config.lockup_min_ms, LOCKUP_MIN_MS, accel),
                _by_accel(config.lockup_spin_ms, LOCKUP_SPIN_MS, accel),
                where=lambda cpu: self._cpu_function(cpu, _SPIN_LOOKS)),
            "fork-storm": ForkStormDetector(config.fork_min_growth, config.fork_min_rate,
                                            config.fork_window_ms),
            "memory-exhaustion": MemoryExhaustionDetector(config.memory_min_free_fraction),
            "hung-driver": HungDriverDetector(self._wait_site, config.hung_min_tasks,
                                              config.hung_min_blocked_ms),
            "panic": PanicDetector(),
        }
        return [built[name] for name in config.detectors]

    def _wait_site(self, task: Task) -> str | None:
        try:
            site = wait_site(self.guest, task)
        except IntrospectionError:
            return None
        return site.function if site else None

    def sample(self, needs: frozenset[str] | None = None) -> tuple[Sample, frozenset[str]]:
        """One look at the guest: every reader, or those in ``needs``; and the readers
        whose read tore (their part of the sample is None). A torn task walk under a
        fork bomb must not cost the fork counters their sample."""
        readings, torn = {}, set()
        for name, read in self._readers.items():
            if needs is None or name in needs:
                try:
                    readings[name] = read()
                except IntrospectionError:
                    torn.add(name)
        return Sample(time.monotonic_ns(), **readings), frozenset(torn)

    def lock_states(self) -> tuple[LockState, ...]:
        """The named locks now; empty if none were named or a read tore."""
        if self._locks is None:
            return ()
        try:
            return self._locks.sample()
        except IntrospectionError:
            return ()

    def close(self) -> None:
        if self._vcpus is not None:
            self._vcpus.close()
        self.guest.close()

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
                ended = self._vm_ended()
                if ended is not None:
                    stats.events.append(ended)
                    on_event(ended)
                    break
        stats.wall_seconds = (time.monotonic_ns() - start_ns) / 1e9
        stats.cpu_seconds = time.process_time() - cpu_start
        return stats

    def _vm_ended(self) -> Event | None:
        """An event if the VM died or QEMU stopped it on a guest panic."""
        if not self.machine.alive():
            return Event("vm-dead", time.monotonic_ns(), f"{self.machine.name}: QEMU is gone")
        with contextlib.suppress(MachineError):
            status = self.machine.status()
            if status == "guest-panicked":
                return Event("panic", time.monotonic_ns(),
                             "guest panicked (pvpanic); QEMU paused it", {"source": "pvpanic"})
        return None

    def _enrich(self, event: Event) -> Event:
        if event.kind not in ("lockup", "hung-driver"):
            return event
        summary, evidence = event.summary, dict(event.evidence)
        held = [lock for lock in self.lock_states() if lock.held]
        if self._locks is not None:
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

    def _cpu_function(self, cpu: int, looks: int) -> str | None:
        """The kernel function CPU ``cpu`` executes: the most frequent of ``looks`` looks
        at QEMU's registers, since a stuck CPU with interrupts on is sometimes caught in
        its timer interrupt."""
        seen = Counter(f for f in (self._cpu_function_once(cpu) for _ in range(looks))
                       if f is not None)
        return seen.most_common(1)[0][0] if seen else None

    def _cpu_function_once(self, cpu: int) -> str | None:
        try:
            text = self.machine.qmp("human-monitor-command",
                                    {"command-line": "info registers -a"}, timeout=2.0)
        except MachineError:
            return None
        blocks = str(text).split("CPU#")
        for block in blocks[1:]:
            number, _, body = block.partition("\n")
            rip = re.search(r"RIP=([0-9a-f]{16})", body)
            if number.strip().rstrip(":") == str(cpu) and rip:
                return self._symbolize(int(rip.group(1), 16))
        return None

    def _symbolize(self, address: int) -> str:
        with contextlib.suppress(LookupError):
            return str(self.guest.prog.symbol(address).name)
        with contextlib.suppress(IntrospectionError):
            in_module = self.guest.module_symbol(address)
            if in_module:
                return in_module
        return f"{address:016x} (unknown)"
