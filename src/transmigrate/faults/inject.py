"""Injecting faults into a running guest, and clearing what can be cleared.

Faults know one guest (:class:`FaultTarget`: its agent, kernel and CPUs), never
VM names or the host's bookkeeping: ``orchestrate.faults`` finds the guest.
Everything goes through the guest agent: the module and the bomb are copied
into :data:`GUEST_DIR`, the module is loaded with ``insmod``, and the fault is
triggered by writing to its control file ``/proc/transmigrate_faults``. Every
trigger is asynchronous: :func:`inject` returns while the fault unfolds, with
the host's monotonic time of the trigger for latency measurements.
"""

from __future__ import annotations

import hashlib
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

from transmigrate.errors import AgentError, FaultError
from transmigrate.faults.build import FORKBOMB_NAME, MODULE_NAME, build_forkbomb, build_module
from transmigrate.faults.specs import (
    Deadlock,
    FaultSpec,
    ForkBomb,
    HungDriver,
    MemoryBomb,
    Oops,
    Panic,
)
from transmigrate.guest.agent import ExecResult, GuestAgent
from transmigrate.polling import Deadline, wait_for
from transmigrate.progress import Progress, silent
from transmigrate.vm.kernels import Kernel, KernelCatalog

__all__ = [
    "CONTROL_FILE",
    "DEADLOCK_LOCK",
    "DEADLOCK_THREAD",
    "GUEST_DIR",
    "HANG_DEVICE",
    "HANG_FUNCTION",
    "OOPS_FUNCTION",
    "ClearReport",
    "FaultTarget",
    "InjectReport",
    "clear",
    "fault_status",
    "inject",
    "load_module",
    "session_pids",
]

GUEST_DIR = "/run/transmigrate-faults"
"""Where the module, the bomb and the session-id files live in the guest."""
CONTROL_FILE = f"/proc/{MODULE_NAME}"
HANG_DEVICE = "/dev/tm_hang"
HANG_FUNCTION = "tm_hang_read"
"""The kernel function the hung driver's readers sleep in (their wchan)."""
DEADLOCK_THREAD = "tm_deadlock/{cpu}"
"""The comm of the kthread that spins on the deadlocked CPU."""
DEADLOCK_LOCK = "tm_fault_lock"
"""The module's spinlock that is taken and never released."""
OOPS_FUNCTION = "tm_oops"
"""The module function whose ``BUG()`` oopses."""
READERS_SID = f"{GUEST_DIR}/readers.sid"
BOMB_SID = f"{GUEST_DIR}/bomb.sid"
T = TypeVar("T")


@dataclass(frozen=True)
class FaultTarget:
    """The guest a fault goes into, and what is needed to build for its kernel."""

    vm: str
    agent: GuestAgent
    kernel: Kernel
    cpus: int
    catalog: KernelCatalog
    """Fetches the kernel's headers, to build the module."""
    cache: Path
    """Where the fork bomb is built."""


@dataclass(frozen=True)
class InjectReport:
    """What was injected, where, and when."""

    vm: str
    fault: str
    kernel: str
    triggered_at: float
    """Host ``time.monotonic()`` just before the trigger was sent."""
    trigger_returned_at: float | None
    """Host ``time.monotonic()`` when the trigger was confirmed; None if it could not be."""
    cpu: int | None = None
    """deadlock: the CPU that spins."""
    irqs_off: bool = False
    session: int | None = None
    """hung-driver and the bombs: the guest session id of the processes started."""
    pids: tuple[int, ...] = ()
    """hung-driver: the readers blocked when inject returned."""
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClearReport:
    vm: str
    cleared: tuple[str, ...]
    """What was stopped: "bombs", "hung-driver", "module"."""
    remaining: tuple[str, ...]
    """What could not be: "deadlock" (the VM must be stopped)."""


def _try(agent: GuestAgent, script: str, timeout: float = 60.0) -> ExecResult:
    """A shell script whose failure is an answer (a file that is not there yet)."""
    return agent.exec(["sh", "-c", script], timeout=timeout)


def _copy(agent: GuestAgent, source: Path, target: str, mode: str = "0644") -> None:
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    have = _try(agent, f"sha256sum {target} 2>/dev/null").text.split()
    if have and have[0] == digest:
        return
    agent.sh(f"mkdir -p {GUEST_DIR} && cat > {target}.part && chmod {mode} {target}.part "
             f"&& mv {target}.part {target}", what=f"copying {source.name}", input=data,
             timeout=120)


def load_module(target: FaultTarget, progress: Progress = silent) -> None:
    """Build (if needed), copy and insmod the fault module, unless it is loaded."""
    if _try(target.agent, f"test -e {CONTROL_FILE}").exit_code == 0:
        return
    kernel = target.catalog.fetch(target.kernel.release, headers=True, progress=progress)
    ko = build_module(kernel, progress)
    progress(f"loading {MODULE_NAME} into the guest")
    path = f"{GUEST_DIR}/{MODULE_NAME}.ko"
    _copy(target.agent, ko, path)
    target.agent.run(["insmod", path])


def fault_status(target: FaultTarget, timeout: float = 10.0) -> dict[str, int]:
    """The module's control file, as numbers (empty if the module is not loaded)."""
    return _status(target.agent, timeout)


def _status(agent: GuestAgent, timeout: float = 10.0) -> dict[str, int]:
    status = {}
    for line in _try(agent, f"cat {CONTROL_FILE} 2>/dev/null", timeout).text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            status[key] = int(value)
    return status


def session_pids(target: FaultTarget, session: int,
                 timeout: float = 30.0) -> list[tuple[int, str, str, str]]:
    """(pid, stat, wchan, comm) of every process in guest session ``session``."""
    return _session_pids(target.agent, session, timeout)


def _session_pids(agent: GuestAgent, session: int,
                  timeout: float = 30.0) -> list[tuple[int, str, str, str]]:
    result = _try(agent, f"ps -s {session} -o pid=,stat=,wchan:32=,comm=", timeout)
    rows = []
    for line in result.text.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and parts[0].isdigit():
            rows.append((int(parts[0]), parts[1], parts[2], parts[3]))
    return rows


def inject(target: FaultTarget, spec: FaultSpec, progress: Progress = silent) -> InjectReport:
    """Inject the fault ``spec`` describes; return once it is triggered (see
    :mod:`transmigrate.faults.specs` for what each one does)."""
    match spec:
        case ForkBomb() | MemoryBomb():
            return _bomb(target, spec, progress)
        case Panic():
            triggered = time.monotonic()
            target.agent.spawn(["sh", "-c", "echo c > /proc/sysrq-trigger"])  # never answers
            return InjectReport(target.vm, spec.name, target.kernel.release, triggered, None,
                                details={"trigger": "/proc/sysrq-trigger"})
    load_module(target, progress)
    match spec:
        case HungDriver():
            return _hung_driver(target, spec)
        case Oops():
            triggered = time.monotonic()
            killed = _try(target.agent, f"echo oops > {CONTROL_FILE}")
            return InjectReport(target.vm, spec.name, target.kernel.release, triggered,
                                time.monotonic(), details={
                                    "function": OOPS_FUNCTION,
                                    "writer_exit": str(killed.exit_code)})
        case Deadlock():
            return _deadlock(target, spec)


def _deadlock(target: FaultTarget, spec: Deadlock) -> InjectReport:
    agent, cpus = target.agent, target.cpus
    if spec.all_cpus:
        if _status(agent).get("deadlock_cpu", -1) >= 0:
            raise FaultError(f"vm {target.vm!r} is already deadlocked")
        triggered = time.monotonic()
        # The trigger takes the writer's CPU too: fire and forget.
        agent.spawn(["sh", "-c", f"echo deadlock-all > {CONTROL_FILE}"])
        return InjectReport(target.vm, spec.name, target.kernel.release, triggered, None,
                            details={"thread": DEADLOCK_THREAD.format(cpu="*"),
                                     "note": "every CPU: the whole guest stops"})
    cpu = cpus - 1 if spec.cpu is None else spec.cpu
    if not 0 <= cpu < cpus:
        raise FaultError(f"vm {target.vm!r} has CPUs 0..{cpus - 1}, not {cpu}")
    if _status(agent).get("deadlock_cpu", -1) >= 0:
        raise FaultError(f"vm {target.vm!r} is already deadlocked")
    command = "deadlock-irq" if spec.irqs_off else "deadlock"
    write = f"echo '{command} {cpu}' > {CONTROL_FILE}"
    thread = DEADLOCK_THREAD.format(cpu=cpu)
    report = partial(InjectReport, target.vm, spec.name, target.kernel.release, cpu=cpu,
                     irqs_off=spec.irqs_off)
    triggered = time.monotonic()
    if cpus == 1:
        # The trigger wedges the only CPU: fire and forget.
        agent.spawn(["sh", "-c", write])
        return report(triggered, None, details={
            "thread": thread, "note": "1 vCPU: the whole guest stops"})
    other = 0 if cpu != 0 else 1
    agent.run(["taskset", "-c", str(other), "sh", "-c", write], what="the deadlock's trigger",
              timeout=30)
    returned = time.monotonic()
    try:
        spinning = wait_for(lambda: _status(agent, timeout=5).get("deadlock_spinning") == 1,
                            timeout=10, what="the deadlock did not start spinning",
                            error=FaultError)
    except (AgentError, FaultError):
        spinning = False  # with interrupts off the rest of the guest may soon stall too
    return report(triggered, returned, details={
        "thread": thread, "state": "spinning" if spinning else "unknown"})


def _hung_driver(target: FaultTarget, spec: HungDriver) -> InjectReport:
    agent = target.agent
    before = _status(agent).get("hang_readers", 0)
    pause = f"sleep {spec.interval_ms / 1000:.3f}; " if spec.interval_ms > 0 else ""
    sid_file = f"{READERS_SID}.{int(time.time() * 1000)}"
    loop = (f"echo $$ > {sid_file}; i=0; while [ $i -lt {spec.readers} ]; do "
            f"cat {HANG_DEVICE} > /dev/null & i=$((i+1)); {pause}done; wait")
    report = partial(InjectReport, target.vm, spec.name, target.kernel.release,
                     details={"device": HANG_DEVICE, "function": HANG_FUNCTION})
    triggered = time.monotonic()
    agent.sh(f"mkdir -p {GUEST_DIR}; setsid -f sh -c {shlex.quote(loop)} "
             "< /dev/null > /dev/null 2>&1", what="starting the readers")
    session = _read_sid(agent, sid_file)
    agent.sh(f"echo {session} >> {READERS_SID}")
    if spec.interval_ms > 0:
        return report(triggered, None, session=session)
    wait_for(lambda: _status(agent).get("hang_readers", 0) >= before + spec.readers,
             timeout=60, interval=0.1, error=FaultError,
             what=f"{spec.readers} readers did not block on {HANG_DEVICE}")
    returned = time.monotonic()
    # The data arrives; the buggy driver does not wake anyone.
    agent.sh(f"echo 'data for the readers' > {HANG_DEVICE}")
    pids = tuple(pid for pid, _, _, comm in _session_pids(agent, session) if comm == "cat")
    return report(triggered, returned, session=session, pids=pids)


def _read_sid(agent: GuestAgent, path: str) -> int:
    def session() -> int | None:
        text = _try(agent, f"cat {path} 2>/dev/null").text.strip()
        return int(text) if text.isdigit() else None

    return wait_for(session, timeout=30, error=FaultError, what=f"the guest did not write {path}")


def _bomb(target: FaultTarget, spec: ForkBomb | MemoryBomb,
          progress: Progress) -> InjectReport:
    """tm-forkbomb, forking or (a memory bomb) hogging, in a session of its own."""
    agent = target.agent
    binary = build_forkbomb(target.cache, progress)
    path = f"{GUEST_DIR}/{FORKBOMB_NAME}"
    _copy(agent, binary, path, mode="0755")
    if isinstance(spec, ForkBomb):
        mode = ["--max", str(spec.maximum), *(["--linear"] if spec.linear else [])]
        details = {"growth": "linear" if spec.linear else "exponential"}
    else:
        mode, details = ["--hog"], {"growth": f"{spec.mib} MiB every {spec.delay_ms} ms"}
    argv = [path, "--daemon", "--seconds", str(spec.seconds), "--mib", str(spec.mib),
            "--delay-ms", str(spec.delay_ms), "--sid-file", BOMB_SID, *mode]
    # Keep the host's only channel into the guest alive under the bomb.
    _try(agent, "for p in $(pidof qemu-ga); do renice -n -20 -p $p; "
                "echo -1000 > /proc/$p/oom_score_adj; done > /dev/null")
    triggered = time.monotonic()
    result = agent.exec(argv, timeout=30)
    returned = time.monotonic()
    text = result.text.strip()
    if result.exit_code != 0 or not text.isdigit():
        raise FaultError(f"{FORKBOMB_NAME} did not start: {result.stderr.decode(errors='replace')}")
    return InjectReport(target.vm, spec.name, target.kernel.release, triggered, returned,
                        session=int(text), details={
                            "program": path, "seconds": str(spec.seconds),
                            "mib": str(spec.mib), **details})


def _retry(what: str, deadline: Deadline, action: Callable[[], T]) -> T:
    """``action()``, retried while the guest agent is too busy to answer (a bomb's victim)."""
    while True:
        try:
            return action()
        except AgentError as exc:
            if deadline.expired():
                raise FaultError(f"cannot {what}: {exc}") from exc
            time.sleep(0.5)


def _sessions(agent: GuestAgent, path: str) -> list[int]:
    return [int(s) for s in _try(agent, f"cat {path} 2>/dev/null").text.split() if s.isdigit()]


def _kill_session(agent: GuestAgent, session: int, wake: bool, deadline: Deadline) -> None:
    """SIGKILL the process group of ``session``'s leader (every process we started in it)
    until none is left."""
    release = f"echo wake > {CONTROL_FILE} 2>/dev/null; " if wake else ""
    script = f"kill -KILL -{session} 2>/dev/null; {release}ps -s {session} -o pid= | wc -l"
    wait_for(lambda: _retry("kill a session", deadline,
                            lambda: _try(agent, script, timeout=30).text.strip() == "0"),
             timeout=deadline.remaining(), interval=0.2, error=FaultError,
             what=f"session {session} survived SIGKILL")


def clear(target: FaultTarget, *, unload: bool = True, timeout: float = 120.0) -> ClearReport:
    """Stop the bombs and free the hung readers; unload the module.

    A deadlock cannot be cleared: it stays in ``remaining`` and the VM must be stopped.
    Retries while the guest is too loaded to answer, up to ``timeout`` seconds.
    """
    agent = target.agent
    deadline = Deadline(timeout)
    cleared: list[str] = []
    remaining: list[str] = []
    bombs = _retry("list the bombs", deadline, lambda: _sessions(agent, BOMB_SID))
    for session in bombs:
        _kill_session(agent, session, False, deadline)
    if bombs:
        _retry("forget the bombs", deadline, lambda: agent.sh(f"rm -f {BOMB_SID}"))
        cleared.append("bombs")
    status = _retry("read the fault module's state", deadline, lambda: _status(agent))
    readers = _retry("list the readers", deadline, lambda: _sessions(agent, READERS_SID))
    for session in readers:
        _kill_session(agent, session, bool(status), deadline)
    if readers:
        agent.sh(f"rm -f {READERS_SID} {READERS_SID}.*")
        cleared.append("hung-driver")
    if status and status.get("deadlock_cpu", -1) >= 0:
        remaining.append("deadlock")
    elif status and unload:
        if status.get("hang_readers", 0):
            agent.sh(f"echo wake > {CONTROL_FILE}")  # readers we did not start
        wait_for(lambda: _try(agent, f"rmmod {MODULE_NAME}").exit_code == 0,
                 timeout=deadline.remaining(), interval=0.2, error=FaultError,
                 what=f"{MODULE_NAME} stayed in use in vm {target.vm!r}")
        cleared.append("module")
    return ClearReport(target.vm, tuple(cleared), tuple(remaining))
