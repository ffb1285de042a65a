"""The long-running controller behind ``transmigrate serve``: it boots the VMs the
configuration declares (``[vms.NAME]``) that are not there, runs operations on the VMs
in the background, one at a time per VM, guards the VMs the configuration names
(``[guard.NAME]``), keeps the history of all of it and counts it for Prometheus.

A guarded VM's guard stands aside while an update started here runs (the update
replaces the VM it watches) and takes up its watch again after it.

It also watches a VM live, on demand (:meth:`Controller.live`), with the monitor.
The VMs themselves are the host's state directory (``Host.machines``), as for every
one-shot command, so a controller killed and started again finds them; what it
adds on disk is the history (``<state>/history.sqlite``). At start it marks the
operations a dead controller left running as interrupted, and finishes or undoes
an update of each VM that was cut short, as the next CLI command would.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from transmigrate.config import Config, Service
from transmigrate.detect.events import READERS, Sample
from transmigrate.errors import IntrospectionError, MachineNotFound, TransmigrateError
from transmigrate.faults import spec_for
from transmigrate.orchestrate import guard as guard_job
from transmigrate.orchestrate import services
from transmigrate.orchestrate import update as update_job
from transmigrate.orchestrate.faults import inject_by_name
from transmigrate.orchestrate.history import Busy, History, Operation
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.monitor import Monitor, MonitorConfig, Watch, readings
from transmigrate.orchestrate.recover import STANDBY_SUFFIX, warm_standby
from transmigrate.vm.machine import Machine

__all__ = ["Controller", "LabOnly", "Selection", "VmView"]

_STEP_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_SAMPLE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
LIVE_INTERVAL_S = 0.25
"""How often the live view's monitor samples: several updates a second, at little cost."""
LIVE_LOCKS = ("tasklist_lock", "rtnl_mutex", "cgroup_mutex", "css_set_lock")
"""Locks the live view shows, held and waited for: the few whose holder stops the whole
system, not one service (forks and exits, network configuration, cgroups). Globals of
every kernel we run (6.1 and 6.12), found by name with their types in the DWARF."""


class LabOnly(TransmigrateError):
    """Asked for what only a lab's controller does (injecting faults)."""


@dataclass(frozen=True)
class VmView:
    """A VM as the controller shows it."""

    name: str
    kernel: str
    status: str
    address: str
    services: list[str]
    standby: str | None
    """Its warm standby's name, if one is booted."""
    operation: int | None
    """The operation running on it, if any."""
    guard: str | None
    """'starting', 'watching', 'acting', 'preparing a new standby', 'standing aside' or
    'stopped: why'; None if not guarded."""


@dataclass(frozen=True)
class Selection:
    """The process trees an update moves instead of the declared services: as
    ``transmigrate update`` takes them (--pid, --process, --cgroup)."""

    pids: tuple[int, ...] = ()
    processes: tuple[str, ...] = ()
    cgroups: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.pids or self.processes or self.cgroups)

    def as_request(self) -> dict[str, list[Any]]:
        return {key: list(value) for key, value in asdict(self).items() if value}


@dataclass
class _Guarding:
    """One VM's guard thread, and what it is doing."""

    policy: guard_job.Policy
    stop: threading.Event
    thread: threading.Thread | None = None
    state: str = "starting"
    failover: int | None = None
    """The failover operation it is carrying out, if any."""


class Controller:
    """Operations on ``host``'s VMs, for the services declared in ``config``."""

    def __init__(self, host: Host, config: Config,
                 log: Callable[[str], None] = lambda _: None, *, lab: bool = False) -> None:
        self.host, self.config, self.log = host, config, log
        self.lab = lab
        """Whether faults may be injected (:meth:`inject`): a lab's controller only."""
        self.history = History.at(host.state)
        self.registry = CollectorRegistry()
        self._operations = Counter(
            "transmigrate_operations", "Operations that ended, by kind and outcome.",
            ["kind", "outcome"], registry=self.registry)
        self._step_seconds = Histogram(
            "transmigrate_update_step_seconds", "Seconds per step of a live update.",
            ["step"], buckets=_STEP_BUCKETS, registry=self.registry)
        self._downtime = Histogram(
            "transmigrate_downtime_seconds",
            "How long the services were frozen or gone, per operation.",
            ["kind"], buckets=_STEP_BUCKETS, registry=self.registry)
        self._events = Counter(
            "transmigrate_events", "Faults the guards acted on, by kind.", ["kind"],
            registry=self.registry)
        self._decision_seconds = Histogram(
            "transmigrate_decision_seconds",
            "From a guard's monitor seeing a fault to its decision.", ["kind"],
            buckets=_STEP_BUCKETS, registry=self.registry)
        self._detection_seconds = Histogram(
            "transmigrate_detection_latency_seconds",
            "From a fault injected here (a lab's controller) to its guard's monitor seeing "
            "it.", ["kind"], buckets=_STEP_BUCKETS, registry=self.registry)
        self._sample_seconds = Histogram(
            "transmigrate_monitor_sample_seconds",
            "How long one look of a monitor at a guest's kernel took (guards and live views).",
            ["vm"], buckets=_SAMPLE_BUCKETS, registry=self.registry)
        self._injected: dict[str, float] = {}
        """VM -> wall-clock time of the fault last injected into it, until its guard acts."""
        self.registry.register(_ReadAtScrape(self))
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        self._progress: dict[int, list[str]] = {}
        self._threads: list[threading.Thread] = []
        self._watches: dict[str, Watch] = {}
        where = f"config {config.source}" if config.source else "config"
        self._guards = {name: _Guarding(guard_job.policy_from(table, f"{where}: guard.{name}"),
                                        threading.Event())
                        for name, table in config.guards.items()}
        for op in self.history.close_interrupted():
            self.log(f"operation={op.id} kind={op.kind} vm={op.vm} outcome=interrupted")
        for machine in self.host.machines.all():
            if machine.name.endswith(("-next", STANDBY_SUFFIX)) or "-dead" in machine.name:
                continue
            try:
                done = update_job.recover_interrupted(self.host, machine.name, self.log)
            except TransmigrateError as exc:
                self.log(f"vm={machine.name} error={exc!r}")
                continue
            if done:
                self.log(f"vm={machine.name} interrupted-update={done!r}")
        booting = self._boot_declared()
        for name in self._guards:
            if name not in booting:
                self._start_guard(name)

    def _boot_declared(self) -> set[str]:
        """Start booting each VM the configuration declares (``[vms.NAME]``) that is not
        there, in the background, with its services that start at boot; its guard, if
        it has one, starts once it is up. The names of those it boots."""
        names = {m.name for m in self.host.machines.all()}
        booting = set()
        for name, declared in self.config.vms.items():
            if name in names:
                continue
            if declared.kernel is None:
                self.log(f"vm={name} not-booted=\"vms.{name}.kernel is not declared\"")
                continue
            try:
                operation = self.history.start("up", name, {"kernel": declared.kernel})
            except Busy as exc:
                self.log(f"vm={name} not-booted={str(exc)!r}")
                continue
            with self._lock:
                self._running[name] = operation
                self._progress[operation] = []
            thread = threading.Thread(target=self._boot, args=(operation, name),
                                      name=f"up-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()
            booting.add(name)
        return booting

    def _boot(self, operation: int, name: str) -> None:
        self.log(f"operation={operation} kind=up vm={name} started")
        try:
            with self.history.recording(operation) as kept:
                booted = services.up_declared(self.host, self.config, name,
                                              progress=self._progress_of(operation))
                kept.report = booted.as_dict()
        except Exception as exc:  # on record already; the thread ends here
            self._operations.labels("up", "failed").inc()
            self.log(f"operation={operation} outcome=failed error={exc!r}")
        else:
            self._operations.labels("up", "done").inc()
            self.log(f"operation={operation} outcome=done "
                     f"boot={booted.boot.boot_seconds:.1f}s")
        finally:
            with self._lock:
                self._running.pop(name, None)
        if name in self._guards:
            self._start_guard(name)

    def _progress_of(self, operation: int) -> Callable[[str], None]:
        """What keeps ``operation``'s progress lines (for :meth:`progress`) and logs them."""
        def progress(line: str) -> None:
            with self._lock:
                self._progress[operation].append(line)
            self.log(f"operation={operation} {line}")
        return progress

    def vms(self) -> list[VmView]:
        machines = self.host.machines.all()
        names = {m.name for m in machines}
        return [self._view(m, names) for m in sorted(machines, key=lambda m: m.name)
                if not m.name.endswith(STANDBY_SUFFIX)]

    def vm(self, name: str) -> VmView:
        """One VM's view (its QEMU asked for its state, no other's)."""
        return self._view(self._machine(name), {m.name for m in self.host.machines.all()})

    def _machine(self, name: str) -> Machine:
        """The VM ``name``; a standby is shown with its VM, not on its own."""
        if name.endswith(STANDBY_SUFFIX):
            raise MachineNotFound(f"no VM named {name!r}")
        return self.host.machines.get(name)

    def _view(self, machine: Machine, names: set[str]) -> VmView:
        standby = f"{machine.name}{STANDBY_SUFFIX}"
        with self._lock:
            guarding = self._guards.get(machine.name)
            operation = self._running.get(machine.name) or (
                guarding.failover if guarding else None)
            guard_state = guarding.state if guarding else None
        return VmView(machine.name, machine.record.kernel, machine.status(),
                      machine.record.ip, [s.name for s in self.config.services_of(machine.name)],
                      standby if standby in names else None, operation, guard_state)

    def start_update(self, name: str, kernel: str, *, copy: str = "auto",
                     selection: Selection | None = None, strict: bool = False) -> int:
        """Start moving ``name``'s declared services (or the trees ``selection`` names) to
        ``kernel``; the operation's id. Refused at once for an unknown VM or kernel, a VM
        with nothing to move, or one with an operation running."""
        self._machine(name)
        release = self.host.catalog.resolve(kernel)
        selection = selection or Selection()
        declared = self.config.services_of(name)
        if not declared and not selection:
            raise TransmigrateError(f"nothing declared to move in {name}: declare its "
                                    "services in the configuration")
        request = {"kernel": release, "copy": copy, **selection.as_request(),
                   **({"strict": True} if strict else {})}
        with self._lock:
            guarding = self._guards.get(name)
            running = self._running.get(name) or (guarding.failover if guarding else None)
            if running is not None:
                raise Busy(f"{name} has operation {running} running")
            operation = self.history.start("update", name, request)
            self._running[name] = operation
            self._progress[operation] = []
        thread = threading.Thread(target=self._update, name=f"update-{name}", daemon=True,
                                  args=(operation, name, release, copy, declared, selection,
                                        strict))
        self._threads.append(thread)
        thread.start()
        return operation

    def inject(self, name: str, fault: str, **options: Any) -> Operation:
        """Inject ``fault`` (a name of :data:`FAULTS`) with ``options`` (as
        ``inject_by_name`` takes them; None: the default) into VM ``name``, in a lab
        only; the injection, on record as an operation, once the fault is triggered."""
        if not self.lab:
            raise LabOnly("faults are injected only in a lab: start the controller with "
                          "--lab")
        options = {key: value for key, value in options.items() if value is not None}
        spec_for(fault, **options)  # an unknown fault, or option, refused before the record
        self._machine(name)
        operation = self.history.start("inject", name, {"fault": fault, **options})
        self.log(f"operation={operation} kind=inject vm={name} fault={fault} started")
        try:
            report = inject_by_name(self.host, name, fault, **options)
        except TransmigrateError as exc:
            self.history.finish(operation, "failed", error=str(exc))
            raise
        with self._lock:
            self._injected[name] = time.time() - (time.monotonic() - report.triggered_at)
        self.history.finish(operation, "done", report=asdict(report))
        found = self.history.get(operation)
        assert found is not None
        return found

    def live(self, name: str) -> dict[str, Any]:
        """What the monitor reads in VM ``name`` now, and the faults it saw: a monitor is
        attached on the first asking (:data:`LIVE_INTERVAL_S`), and again once the VM it
        watched is gone (an update replaces the VM)."""
        self._machine(name)
        with self._lock:
            watch = self._watches.get(name)
        if watch is None or not watch.running:
            if watch is not None:
                with contextlib.suppress(TransmigrateError):
                    watch.stop()
            watch = self._attach_live(name).start(on_sample=self._sample_observer(name))
            with self._lock:
                self._watches[name] = watch
        sample = watch.latest
        latest = {} if sample is None else {
            reader: getattr(sample, reader) for reader in READERS
            if getattr(sample, reader) is not None}
        return {"vm": name, "at": time.time(), "readings": readings(latest),
                "locks": [lock.as_dict() for lock in watch.monitor.lock_states()],
                "events": [{"kind": e.kind, "summary": e.summary, "evidence": e.evidence}
                           for e in watch.events[-20:]]}

    def _sample_observer(self, name: str) -> Callable[[Sample], None]:
        """What counts each sample a monitor of VM ``name`` reads."""
        return lambda sample: self._sample_seconds.labels(name).observe(sample.read_seconds)

    def _attach_live(self, name: str) -> Monitor:
        """The live view's monitor, watching :data:`LIVE_LOCKS` too where the kernel
        has them all."""
        config = MonitorConfig(interval_s=LIVE_INTERVAL_S, locks=LIVE_LOCKS)
        try:
            return Monitor.attach(self.host, name, config)
        except IntrospectionError as exc:
            self.log(f"vm={name} live-locks=none error={exc!r}")
            return Monitor.attach(self.host, name, replace(config, locks=()))

    def operations(self, vm: str | None = None) -> list[Operation]:
        return self.history.recent(vm=vm)

    def operation(self, operation: int) -> Operation | None:
        return self.history.get(operation)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the operations under way (tests, and a clean shutdown)."""
        for thread in list(self._threads):
            thread.join(timeout)

    def close(self) -> None:
        """Stop the guards (a failover under way is finished first) and the live views."""
        for guarding in self._guards.values():
            guarding.stop.set()
        for guarding in self._guards.values():
            if guarding.thread is not None:
                guarding.thread.join()
        with self._lock:
            watches, self._watches = list(self._watches.values()), {}
        for watch in watches:
            with contextlib.suppress(TransmigrateError):
                watch.stop()
        self.history.close()

    def progress(self, operation: int, after: int = 0) -> list[str]:
        """The progress lines of an operation started here, from the ``after``-th on
        (none for one it did not start, or one from before it started)."""
        with self._lock:
            return self._progress.get(operation, [])[after:]

    def _update(self, operation: int, name: str, kernel: str, copy: str,
                declared: Sequence[Service], selection: Selection, strict: bool) -> None:
        start = time.monotonic()
        self.log(f"operation={operation} kind=update vm={name} kernel={kernel} started")
        progress = self._progress_of(operation)
        guarded = self._stand_aside(name)
        try:
            with self.history.recording(operation) as kept:
                roots = update_job.find_services(
                    self.host, name, pids=selection.pids, processes=selection.processes,
                    cgroups=selection.cgroups, declared=declared)
                standby = warm_standby(self.host, name, kernel) if guarded else None
                report = update_job.update(self.host, name, kernel, pids=roots, copy=copy,
                                           strict=strict, standby=standby, progress=progress)
                kept.report, kept.downtime_seconds = report.as_dict(), report.frozen_seconds
        except Exception as exc:  # on record already; the thread ends here
            self._operations.labels("update", "failed").inc()
            self.log(f"operation={operation} outcome=failed error={exc!r}")
        else:
            for step, seconds in report.steps.items():
                self._step_seconds.labels(step).observe(seconds)
            self._downtime.labels("update").observe(report.frozen_seconds)
            self._operations.labels("update", "done").inc()
            self.log(f"operation={operation} outcome=done frozen={report.frozen_seconds:.3f}s "
                     f"total={time.monotonic() - start:.1f}s")
        finally:
            with self._lock:
                self._running.pop(name, None)
            if guarded:
                self._start_guard(name)

    def _start_guard(self, name: str) -> None:
        guarding = self._guards[name]
        guarding.stop.clear()
        guarding.state = "starting"
        guarding.thread = threading.Thread(target=self._guard, args=(name, guarding),
                                           name=f"guard-{name}", daemon=True)
        guarding.thread.start()

    def _stand_aside(self, name: str) -> bool:
        """Stop ``name``'s guard, if it has one, once the failover it may be carrying
        out has ended; whether it had one."""
        guarding = self._guards.get(name)
        if guarding is None:
            return False
        guarding.stop.set()
        if guarding.thread is not None:
            guarding.thread.join()
        guarding.state = "standing aside"
        self.log(f"vm={name} guard=standing-aside")
        return True

    def _guard(self, name: str, guarding: _Guarding) -> None:
        """Run ``name``'s guard until told to stop, or until it can do no more."""

        def acting(decision: guard_job.Decision) -> None:
            with self._lock:
                guarding.state, guarding.failover = "acting", decision.operation
                injected = self._injected.pop(name, None)
            self._events.labels(decision.fault).inc()
            self._decision_seconds.labels(decision.fault).observe(decision.decision_seconds)
            if injected is not None and decision.detected_at >= injected:
                self._detection_seconds.labels(decision.fault).observe(
                    decision.detected_at - injected)
            self.log(f"operation={decision.operation} kind=failover vm={name} "
                     f"fault={decision.fault} action={decision.action} started")

        def watching() -> None:
            guarding.state = "watching"
            self.log(f"vm={name} guard=watching")

        def decided(decision: guard_job.Decision) -> None:
            with self._lock:
                guarding.state, guarding.failover = "preparing a new standby", None
            kept = self.history.get(decision.operation) if decision.operation else None
            if kept is None:
                return
            self._operations.labels("failover", kept.outcome).inc()
            if kept.downtime_seconds is not None:
                self._downtime.labels("failover").observe(kept.downtime_seconds)
            self.log(f"operation={kept.id} outcome={decision.outcome} "
                     f"fault={decision.fault} seconds={decision.action_seconds:.1f}")

        self.log(f"vm={name} guard=starting")
        try:
            guard_job.guard(self.host, name, self.config.services_of(name), guarding.policy,
                            on_acting=acting, on_decision=decided, on_watching=watching,
                            history=self.history, stop=guarding.stop,
                            on_sample=self._sample_observer(name),
                            progress=lambda line: self.log(f"vm={name} guard: {line}"))
        except Exception as exc:  # the guard can do no more: say why, on the page too
            guarding.state = f"stopped: {exc}"
            self.log(f"vm={name} guard=stopped error={exc!r}")
        else:
            if not guarding.stop.is_set():
                guarding.state = "stopped: the services could not be saved"
                self.log(f"vm={name} guard=stopped")


class _ReadAtScrape(Collector):
    """What Prometheus reads when it scrapes: ``transmigrate_vms{state}``, and from the
    history (every operation, the one-shot commands' and the demo's too)
    ``transmigrate_history_operations{kind,outcome}`` and
    ``transmigrate_last_downtime_seconds{vm,kind}``."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("transmigrate_vms", "VMs by QEMU's run state.",
                                   labels=["state"])
        counts: dict[str, int] = {}
        for view in self.controller.vms():
            counts[view.status] = counts.get(view.status, 0) + 1
        for state, count in sorted(counts.items()):
            family.add_metric([state], count)
        yield family
        history = self.controller.history
        kept = GaugeMetricFamily("transmigrate_history_operations",
                                 "Operations on record, whoever ran them, by kind and outcome.",
                                 labels=["kind", "outcome"])
        for kind, outcome, count in history.counts():
            kept.add_metric([kind, outcome], count)
        yield kept
        downtime = GaugeMetricFamily(
            "transmigrate_last_downtime_seconds",
            "The downtime of each VM's newest operation of a kind that measured one.",
            labels=["vm", "kind"])
        for vm, kind, seconds in history.last_downtimes():
            downtime.add_metric([vm, kind], seconds)
        yield downtime
