"""Guard: act on what the monitor sees, so that a VM's declared services outlive its kernel.

A fault the kernel survives (a hung driver, a fork bomb, memory running out) moves
the services live to a standby kernel (``update``), the culprits killed first; if
the move fails or overruns its deadline, the VM is stopped and the services are
rebuilt from its memory instead. A fault it does not survive (a panic, an oops, a CPU
locked up) goes that way at once (``recover``, onto the warm standby). A CPU spinning
with preemption off is such a fault although the kernel runs on: no RCU grace period
ends, so whatever waits for one (a network namespace, an nftables table, ``criu
check``) hangs, and a live move with it (measured: its precheck hung for 123 s).
Either way a new warm standby boots next, so that a second fault is survived too.

Which fault gets which action, the live path's deadline, the standby's kernel and the
monitor's thresholds are a :class:`Policy`, read from a small TOML file.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transmigrate.config import Service
from transmigrate.detect.events import Event, Sample
from transmigrate.errors import AgentError, MachineNotFound, TransmigrateError
from transmigrate.guest.agent import GuestAgent
from transmigrate.orchestrate.history import History
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.monitor import Monitor, MonitorConfig, with_settings
from transmigrate.orchestrate.recover import (
    STANDBY_SUFFIX,
    prepare_standby,
    recover,
    warm_standby,
)
from transmigrate.orchestrate.update import find_services, recover_interrupted, update
from transmigrate.progress import Progress, silent
from transmigrate.vm.machine import Machine

__all__ = ["ACTIONS", "DEFAULT_ACTIONS", "FAULTS", "Decision", "Policy", "culprit_trees",
           "decide", "guard", "load_policy", "policy_from"]

RECOVER, MOVE, REPORT = "recover", "move", "report"
ACTIONS = (RECOVER, MOVE, REPORT)
DEFAULT_ACTIONS: Mapping[str, str] = {
    "panic": RECOVER, "oops": RECOVER, "lockup-all": RECOVER, "lockup": RECOVER,
    "hung-driver": MOVE, "fork-storm": MOVE, "memory-exhaustion": MOVE,
    "stopped": RECOVER,
    "vm-dead": REPORT,
}
"""What each fault gets. ``lockup-all``: every CPU locked up. ``stopped``: the VM was found
paused (a failover cut short). ``vm-dead``: QEMU is gone, and the memory with it."""
FAULTS = tuple(DEFAULT_ACTIONS)


@dataclass(frozen=True)
class Policy:
    actions: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ACTIONS))
    live_deadline_seconds: float = 300.0
    """A live move not done by then is rolled back, and the services recovered."""
    agent_deadline_seconds: float = 10.0
    """A live move whose guest agent does not answer by then is not tried: the kernel
    cannot hand anything over, and the services are recovered at once."""
    lockup_grace_seconds: float = 2.0
    """After a CPU's lockup, how long to wait for the others' before deciding (only
    when ``lockup`` and ``lockup-all`` get different actions)."""
    standby_kernel: str | None = None
    """The kernel the services go to (default: the VM's own)."""
    monitor: tuple[str, ...] = ()
    """Monitor settings, as ``monitor --set`` takes them (``hung-driver=100ms``, ...)."""


_POLICY_KEYS = {"actions", "live_deadline_seconds", "agent_deadline_seconds",
                "lockup_grace_seconds", "standby_kernel", "monitor"}


def load_policy(path: Path) -> Policy:
    """The policy in TOML ``path`` (:func:`policy_from`)."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TransmigrateError(f"policy {path}: {exc}") from exc
    return policy_from(data, f"policy {path}")


def policy_from(data: Mapping[str, Any], where: str) -> Policy:
    """The policy in ``data``: top-level keys as :class:`Policy`'s fields, ``actions`` and
    ``monitor`` as tables. A key it does not know is refused by name, after ``where``
    (the file, or the table of the configuration)."""
    unknown = sorted(set(data) - _POLICY_KEYS)
    if unknown:
        raise TransmigrateError(f"{where}: unknown key {unknown[0]!r}; known: "
                                f"{', '.join(sorted(_POLICY_KEYS))}")
    actions = data.get("actions", {})
    if not isinstance(actions, dict):
        raise TransmigrateError(f"{where}: actions must be a table")
    for fault, action in actions.items():
        if fault not in FAULTS:
            raise TransmigrateError(f"{where}: unknown key actions.{fault}; faults: "
                                    f"{', '.join(FAULTS)}")
        if action not in ACTIONS:
            raise TransmigrateError(f"{where}: actions.{fault} = {action!r}; choose "
                                    f"one of {', '.join(ACTIONS)}")
    monitor = data.get("monitor", {})
    if not isinstance(monitor, dict):
        raise TransmigrateError(f"{where}: monitor must be a table")
    settings = tuple(f"{key}={value}" for key, value in monitor.items())
    try:
        with_settings(MonitorConfig(), list(settings))
    except TransmigrateError as exc:
        raise TransmigrateError(f"{where}: monitor: {exc}") from exc
    seconds = {key: _positive(data, key, where) for key in (
        "live_deadline_seconds", "agent_deadline_seconds", "lockup_grace_seconds")
        if key in data}
    kernel = data.get("standby_kernel")
    if kernel is not None and not isinstance(kernel, str):
        raise TransmigrateError(f"{where}: standby_kernel must be a string")
    return Policy(actions={**DEFAULT_ACTIONS, **actions}, monitor=settings,
                  standby_kernel=kernel,
                  live_deadline_seconds=seconds.get("live_deadline_seconds",
                                                    Policy.live_deadline_seconds),
                  agent_deadline_seconds=seconds.get("agent_deadline_seconds",
                                                     Policy.agent_deadline_seconds),
                  lockup_grace_seconds=seconds.get("lockup_grace_seconds",
                                                   Policy.lockup_grace_seconds))


def _positive(data: Mapping[str, Any], key: str, where: str) -> float:
    value = data[key]
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise TransmigrateError(f"{where}: {key} must be a positive number of seconds")
    return float(value)


@dataclass
class Decision:
    """What guard decided on a fault, why, and how it went: one line of its log."""

    vm: str
    fault: str
    action: str
    summary: str
    evidence: dict[str, Any]
    culprits: list[int]
    """Processes the evidence blames; they are not moved (only declared services are)."""
    detected_at: float
    """Host wall-clock time the monitor saw the fault."""
    decision_seconds: float = 0.0
    """From the monitor's event to the decision (a lockup waits for the other CPUs)."""
    outcome: str = ""
    """'dry-run', 'moved', 'recovered', 'recovered after the live move failed', 'reported',
    'failed' or 'interrupted'."""
    action_seconds: float = 0.0
    """From the decision to the services running on the standby (or the failure)."""
    detail: str = ""
    kernel_after: str = ""
    steps: dict[str, float] = field(default_factory=dict)
    """Seconds per step of the move or the recovery that served (their reports')."""
    operation: int | None = None
    """The failover's id in the history, if it was acted on and kept."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(vm: str, events: Sequence[Event], policy: Policy, *, cpus: int) -> Decision:
    """The decision on the first of ``events`` (those that came in the lockup grace with
    it). Lockups on every CPU are ``lockup-all``: the kernel cannot hand anything over."""
    first = events[0]
    fault = first.kind
    if fault == "lockup":
        locked = {e.evidence.get("cpu") for e in events if e.kind == "lockup"}
        if len(locked) >= cpus:
            fault = "lockup-all"
    culprits: list[int] = []
    if first.kind == "hung-driver":
        culprits = [int(pid) for pid in first.evidence.get("pids", [])]
    elif first.kind == "lockup":
        culprits = sorted({int(e.evidence["pid"]) for e in events
                           if e.kind == "lockup" and e.evidence.get("pid")})
    elif first.kind in ("fork-storm", "memory-exhaustion") and "culprit" in first.evidence:
        culprits = [int(first.evidence["culprit"])]
    lag = max(0.0, (time.monotonic_ns() - first.monotonic_ns) / 1e9)
    return Decision(vm=vm, fault=fault, action=policy.actions.get(fault, REPORT),
                    summary=first.summary, evidence=dict(first.evidence), culprits=culprits,
                    detected_at=round(time.time() - lag, 3))


class _DeadlineExceeded(TransmigrateError):
    pass


def guard(host: Host, name: str, services: Sequence[Service], policy: Policy = Policy(), *,
          dry_run: bool = False, on_decision: Callable[[Decision], None] = lambda _: None,
          on_acting: Callable[[Decision], None] = lambda _: None,
          on_watching: Callable[[], None] = lambda: None,
          history: History | None = None, progress: Progress = silent,
          stop: threading.Event | None = None,
          on_sample: Callable[[Sample], None] | None = None) -> list[Decision]:
    """Keep a warm standby for VM ``name`` and act on the faults the monitor sees, until
    ``stop`` is set (or for ever). ``on_watching`` is called each time the monitor
    watches (again), the standby ready. Every decision goes to ``on_acting`` before it
    is carried out and to ``on_decision`` once it is; all of them are returned. Each
    one acted on is kept in ``history`` as a failover. Every sample of the monitor goes
    to ``on_sample``. ``dry_run``: decide and log, never act."""
    if not services:
        raise TransmigrateError(f"nothing to guard in {name}: declare its services in "
                                "transmigrate.toml (guard moves declared services)")
    stop = stop or threading.Event()
    machine = host.machines.get(name) if _exists(host, name) else _resume_recovery(host, name)
    kernel = host.catalog.fetch(policy.standby_kernel or machine.record.kernel,
                                progress=progress).release
    config = with_settings(MonitorConfig(), list(policy.monitor))
    decisions: list[Decision] = []
    watch: _FaultWatch | None = None
    try:
        while not stop.is_set():
            if not dry_run:
                interrupted = recover_interrupted(host, name, progress)
                if interrupted:
                    progress(interrupted)
                _ensure_standby(host, name, kernel, progress)
            machine = host.machines.get(name)
            state = machine.status()
            if state in ("paused", "guest-panicked") and not dry_run:
                events = [Event("stopped" if state == "paused" else "panic",
                                time.monotonic_ns(), f"{name} was found {state}",
                                {"source": "guard"})]
            else:
                if watch is None:
                    watch = _FaultWatch(host, name, config, progress, on_sample)
                    on_watching()
                events = watch.next_fault(stop, _lockup_grace(policy))
                if not events:
                    break
            decision = decide(name, events, policy, cpus=machine.record.cpus)
            decision.decision_seconds = round(
                (time.monotonic_ns() - events[0].monotonic_ns) / 1e9, 3)
            progress(f"{decision.fault} in {name}: {decision.summary} -> {decision.action}")
            try:
                if dry_run:
                    decision.outcome = "dry-run"
                else:
                    if watch is not None:  # it reads the VM that is about to go
                        watch.close()
                        watch = None
                    if history is not None:
                        decision.operation = history.start("failover", name, {
                            "fault": decision.fault, "action": decision.action,
                            "summary": decision.summary})
                    on_acting(decision)
                    _carry_out(host, name, services, kernel, policy, decision, progress)
            finally:  # a failed or interrupted action is logged too
                decisions.append(decision)
                if history is not None and decision.operation is not None:
                    _keep(history, decision, decision.operation)
                on_decision(decision)
            if decision.action == REPORT and not dry_run:
                break  # nothing left to watch or to move
    finally:
        if watch is not None:
            watch.close()
    return decisions


def _keep(history: History, decision: Decision, operation: int) -> None:
    """The failover's end on record; its downtime runs from the fault's detection to
    the services running on the standby."""
    outcome = {"interrupted": "interrupted", "failed": "failed", "reported": "failed"}.get(
        decision.outcome, "done")
    history.finish(operation, outcome, report=decision.as_dict(),
                   downtime_seconds=round(decision.decision_seconds + decision.action_seconds,
                                          3) if outcome == "done" else None,
                   error="" if outcome == "done" else decision.detail or decision.summary)


def _lockup_grace(policy: Policy) -> float:
    """How long a lockup waits for the other CPUs': not at all when it would not
    change the action."""
    same = policy.actions["lockup"] == policy.actions["lockup-all"]
    return 0.0 if same else policy.lockup_grace_seconds


def _exists(host: Host, name: str) -> bool:
    return any(m.name == name for m in host.machines.all())


def _resume_recovery(host: Host, name: str) -> Machine:
    """A guard killed while recovering ``name`` left it as NAME-dead (the newest of them),
    paused, its memory intact. The standby is discarded (what it may have restored
    never took over) and the VM takes its name back, to be recovered again."""
    dead = max((m for m in host.machines.all()
                if m.name == f"{name}-dead" or m.name.startswith(f"{name}-dead-")),
               key=lambda m: m.record.started_at, default=None)
    if dead is None:
        raise MachineNotFound(f"no VM named {name!r}")
    with contextlib.suppress(MachineNotFound):
        host.machines.remove(host.machines.get(f"{name}{STANDBY_SUFFIX}"), keep_network=True)
    return host.machines.rename(dead, name)


def _ensure_standby(host: Host, name: str, kernel: str, progress: Progress) -> None:
    """NAME-standby running on ``kernel``: kept if it is, else (re)booted."""
    standby = next((m for m in host.machines.all() if m.name == f"{name}{STANDBY_SUFFIX}"),
                   None)
    if standby is not None:
        state = standby.status()
        if state == "running" and standby.record.kernel == kernel:
            return
        progress(f"replacing {standby.name} ({standby.record.kernel}, {state})")
        host.machines.remove(standby, keep_network=True)
    progress(f"booting a warm standby for {name} on {kernel}")
    prepare_standby(host, name, kernel, progress=progress)


class _FaultWatch:
    """The monitor on ``name``, handing over its events one fault at a time."""

    def __init__(self, host: Host, name: str, config: MonitorConfig, progress: Progress,
                 on_sample: Callable[[Sample], None] | None = None) -> None:
        self._events: queue.Queue[Event] = queue.Queue()
        self._watch = Monitor.attach(host, name, config).start(self._events.put, on_sample)
        progress(f"guarding {name}")

    def next_fault(self, stop: threading.Event, lockup_grace: float) -> list[Event]:
        """The next event, with (after a lockup) those of the grace that follows; [] once
        ``stop`` is set."""
        while not stop.is_set():
            try:
                first = self._events.get(timeout=0.2)
            except queue.Empty:
                continue
            seen = [first]
            if first.kind == "lockup":
                until = time.monotonic() + lockup_grace
                while (left := until - time.monotonic()) > 0:
                    with contextlib.suppress(queue.Empty):
                        seen.append(self._events.get(timeout=left))
            return seen
        return []

    def close(self) -> None:
        with contextlib.suppress(TransmigrateError):
            self._watch.stop()


def _carry_out(host: Host, name: str, services: Sequence[Service], kernel: str,
               policy: Policy, decision: Decision, progress: Progress) -> None:
    start = time.monotonic()
    try:
        if decision.action == MOVE:
            try:
                decision.steps, killed = _move(host, name, services, kernel, policy,
                                               decision.culprits, progress)
                decision.outcome = "moved"
                if killed:
                    decision.detail = f"culprits killed before the move: {_pids(killed)}"
            except TransmigrateError as exc:
                progress(f"the live move failed ({exc}): recovering from memory")
                lost, decision.steps = _recover(host, name, services, kernel, progress)
                decision.detail = "; ".join(filter(None, [f"live move: {exc}", lost]))
                decision.outcome = "recovered after the live move failed"
        elif decision.action == RECOVER:
            decision.detail, decision.steps = _recover(host, name, services, kernel, progress)
            decision.outcome = "recovered"
        else:
            decision.outcome = "reported"
    except TransmigrateError as exc:
        decision.outcome = "failed"
        decision.detail = "; ".join(filter(None, [decision.detail, str(exc)]))
        raise
    except KeyboardInterrupt:
        decision.outcome = "interrupted"
        raise
    finally:
        decision.action_seconds = round(time.monotonic() - start, 3)
        with contextlib.suppress(TransmigrateError):
            decision.kernel_after = host.machines.get(name).record.kernel


def _move(host: Host, name: str, services: Sequence[Service], kernel: str, policy: Policy,
          culprits: Sequence[int], progress: Progress) -> tuple[dict[str, float], list[int]]:
    """Live, onto the warm standby, with a deadline checked before each step: one
    overrun rolls the move back; a guest agent that does not answer at the start fails
    it at once. The culprits are killed first, with what they forked. The steps, and
    the pids killed."""
    deadline = time.monotonic() + policy.live_deadline_seconds

    def in_time(step: str) -> None:
        if time.monotonic() > deadline:
            raise _DeadlineExceeded(f"the live move passed its deadline "
                                    f"({policy.live_deadline_seconds:.0f} s) before {step}")

    steps: dict[str, float] = {}
    mark = time.monotonic()

    def timed(step: str) -> None:
        nonlocal mark
        steps[step] = round(time.monotonic() - mark, 3)
        mark = time.monotonic()

    agent = host.agent(host.machines.get(name))
    try:
        agent.ping(timeout=policy.agent_deadline_seconds)
    except AgentError as exc:  # its every command would wait out its own timeout
        raise TransmigrateError(
            f"the guest agent did not answer within {policy.agent_deadline_seconds:g} s "
            f"({exc}): the kernel cannot hand anything over") from exc
    timed("agent answers")
    roots = find_services(host, name, declared=services)
    timed("find services")
    killed = _kill_culprits(agent, roots, culprits, progress)
    timed("kill culprits")
    report = update(host, name, kernel, pids=roots, progress=progress, before_step=in_time,
                    standby=warm_standby(host, name, kernel))
    return {**steps, **report.steps, "update": report.total_seconds}, killed


def culprit_trees(parents: Mapping[int, int], roots: Sequence[int],
                  culprits: Sequence[int]) -> set[int]:
    """The culprits and what they forked, given each process's parent, but for the moved
    trees: a service's root, and what is under it but not under a culprit inside its
    tree, are spared even when a culprit is above them."""
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    todo = [c for c in culprits if c in parents and c not in roots]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += [child for child in children.get(pid, []) if child not in roots]
    return found


def _pids(pids: Sequence[int], shown: int = 8) -> str:
    """``pids`` for a person: a fork storm's hundreds as their count and range."""
    if len(pids) <= shown:
        return ", ".join(map(str, pids))
    return f"{len(pids)} processes, {min(pids)} to {max(pids)}"


def _kill_culprits(agent: GuestAgent, roots: Sequence[int], culprits: Sequence[int],
                   progress: Progress, rounds: int = 5) -> list[int]:
    """Kill the culprits and all they forked, before the move: stopped first, round by
    round until no new child appears (a fork storm forks on while it is being
    stopped), then killed at once. Left to run, or only stopped, a bomb keeps the CPU
    and the memory the move needs: a memory bomb merely stopped held a 512 MiB guest
    at the edge of its memory, and the move's precheck ran out its 123 s there. Those
    inside a moved tree could not stay behind anyway (CRIU moves whole trees); the
    others would have ended with the old VM. The pids killed."""
    stopped: set[int] = set()
    for _ in range(rounds):
        parents = {p.pid: p.ppid for p in agent.processes()}
        subtree = culprit_trees(parents, roots, culprits) - stopped
        if not subtree:
            break
        agent.exec(["kill", "-STOP", *map(str, sorted(subtree))])
        stopped |= subtree
    if stopped:
        progress(f"killing {len(stopped)} culprit processes")
        agent.exec(["kill", "-KILL", *map(str, sorted(stopped))])
    return sorted(stopped)


def _recover(host: Host, name: str, services: Sequence[Service], kernel: str,
             progress: Progress) -> tuple[str, dict[str, float]]:
    """Recover the services from ``name``'s memory: what was not recovered, if anything,
    and the recovery's steps.
    A recovery that fails leaves the VM stopped, its memory intact: it is tried once
    more, onto a VM booted for it (the standby may be what failed)."""
    try:
        report = recover(host, name, kernel, services=services, abandoned=True,
                         progress=progress)
    except TransmigrateError as exc:
        if not _exists(host, name) or host.machines.get(name).status() == "dead":
            raise
        progress(f"recovery failed ({exc}): once more, onto a new VM")
        with contextlib.suppress(MachineNotFound):
            host.machines.remove(host.machines.get(f"{name}{STANDBY_SUFFIX}"),
                                 keep_network=True)
        report = recover(host, name, kernel, services=services, abandoned=True,
                         progress=progress)
    lost = "; ".join([*(f"not recovered: {v.pid} ({v.comm or '?'}): {v.reason}"
                        for v in report.processes if v.verdict in ("refused", "failed")),
                      *(f"lost: {loss}" for v in report.processes for loss in v.losses)])
    return lost, report.steps
