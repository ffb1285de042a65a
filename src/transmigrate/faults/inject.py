"""Injecting faults into a running guest, and clearing what can be cleared.

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
from transmigrate.guest.agent import ExecResult, GuestAgent
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.progress import Progress, silent
from transmigrate.vm.kernels import Kernel

__all__ = [
    "CONTROL_FILE",
    "DEADLOCK_LOCK",
    "DEADLOCK_THREAD",
    "FAULTS",
    "GUEST_DIR",
    "HANG_DEVICE",
    "HANG_FUNCTION",
    "OOPS_FUNCTION",
    "ClearReport",
    "InjectReport",
    "clear",
    "fault_status",
    "inject",
    "load_module",
    "session_pids",
]

FAULTS = ("deadlock", "hung-driver", "fork-bomb", "oops", "panic")
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
T = TypeVar("T")
BOMB_SID = f"{GUEST_DIR}/bomb.sid"


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
    """hung-driver and fork-bomb: the guest session id of the processes started."""
    pids: tuple[int, ...] = ()
    """hung-driver: the readers blocked when inject returned."""
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClearReport:
    vm: str
    cleared: tuple[str, ...]
    """What was stopped: "fork-bomb", "hung-driver", "module"."""
    remaining: tuple[str, ...]
    """What could not be: "deadlock" (the VM must be stopped)."""


def _agent(host: Host, vm_name: str) -> tuple[GuestAgent, Kernel, int]:
    machine = lifecycle.running(host, vm_name)
    kernel = Kernel(machine.record.kernel, Path(machine.record.kernel_dir))
    return host.agent(machine), kernel, machine.record.cpus


def _sh(agent: GuestAgent, script: str, *, input: bytes | None = None,
        timeout: float = 60.0, check: bool = True) -> ExecResult:
    result = agent.exec(["sh", "-c", script], input=input, timeout=timeout)
    return result.check(f"`{script[:80]}`") if check else result


def _copy(agent: GuestAgent, source: Path, target: str, mode: str = "0644") -> None:
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    have = _sh(agent, f"sha256sum {target} 2>/dev/null", check=False).text.split()
    if have and have[0] == digest:
        return
    _sh(agent, f"mkdir -p {GUEST_DIR} && cat > {target}.part && chmod {mode} {target}.part "
               f"&& mv {target}.part {target}", input=data, timeout=120)


def load_module(host: Host, vm_name: str, progress: Progress = silent) -> Kernel:
    """Build (if needed), copy and insmod the fault module in VM ``vm_name``."""
    agent, kernel, _ = _agent(host, vm_name)
    _load(host, agent, kernel, progress)
    return kernel


def _load(host: Host, agent: GuestAgent, kernel: Kernel, progress: Progress) -> None:
    if _sh(agent, f"test -e {CONTROL_FILE}", check=False).exit_code == 0:
        return
    kernel = host.catalog.fetch(kernel.release, headers=True, progress=progress)
    ko = build_module(kernel, progress)
    progress(f"loading {MODULE_NAME} into the guest")
    target = f"{GUEST_DIR}/{MODULE_NAME}.ko"
    _copy(agent, ko, target)
    _sh(agent, f"insmod {target}")


def fault_status(host: Host, vm_name: str, timeout: float = 10.0) -> dict[str, int]:
    """The module's control file, as numbers (empty if the module is not loaded)."""
    agent, _, _ = _agent(host, vm_name)
    return _status(agent, timeout)


def _status(agent: GuestAgent, timeout: float = 10.0) -> dict[str, int]:
    result = _sh(agent, f"cat {CONTROL_FILE} 2>/dev/null", check=False, timeout=timeout)
    status = {}
    for line in result.text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            status[key] = int(value)
    return status


def session_pids(host: Host, vm_name: str, session: int) -> list[tuple[int, str, str, str]]:
    """(pid, stat, wchan, comm) of every process in guest session ``session``."""
    agent, _, _ = _agent(host, vm_name)
    return _session_pids(agent, session)


def _session_pids(agent: GuestAgent, session: int,
                  timeout: float = 30.0) -> list[tuple[int, str, str, str]]:
    result = _sh(agent, f"ps -s {session} -o pid=,stat=,wchan:32=,comm=", check=False,
                 timeout=timeout)
    rows = []
    for line in result.text.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and parts[0].isdigit():
            rows.append((int(parts[0]), parts[1], parts[2], parts[3]))
    return rows


def inject(host: Host, vm_name: str, fault: str, *, cpu: int | None = None,
           irqs_off: bool = False, readers: int = 16, reader_interval_ms: int = 0,
           bomb_seconds: int = 60, bomb_mib: int = 16, bomb_max: int = 0,
           bomb_delay_ms: int = 100, bomb_linear: bool = True,
           progress: Progress = silent) -> InjectReport:
    """Inject ``fault`` (one of :data:`FAULTS`) into VM ``vm_name``; return once it is triggered.

    - ``deadlock``: a kthread bound to ``cpu`` (default: the VM's last CPU)
      takes :data:`DEADLOCK_LOCK` twice and spins forever with preemption off
      (and interrupts off with ``irqs_off``). Cannot be cleared. On a 1-CPU VM
      the whole guest stops, so the trigger cannot be confirmed.
    - ``hung-driver``: ``readers`` processes (``cat`` of :data:`HANG_DEVICE`,
      in one new session, one every ``reader_interval_ms``) block in state D in
      :data:`HANG_FUNCTION`; then data is written to the device, which does not
      wake them. With an interval, returns as soon as the readers are starting.
    - ``oops``: ``BUG()`` in the module, in the context of a shell that writes
      the command: the kernel oopses, kills that shell and runs on, tainted.
    - ``panic``: the kernel's own ``panic()`` through ``/proc/sysrq-trigger``;
      the guest's pvpanic device then makes QEMU pause the VM, memory intact.
    - ``fork-bomb``: :data:`FORKBOMB_NAME` in its own session for
      ``bomb_seconds``, each child touching ``bomb_mib`` MiB, at most
      ``bomb_max`` processes (0: no limit), ``bomb_delay_ms`` between forks.
      By default only the first process forks: one more process and
      ``bomb_mib`` more MiB every ``bomb_delay_ms``, unbounded but steady. With
      ``bomb_linear=False`` every process forks (exponential growth): under TCG
      the guest, its agent included, then stops answering until
      ``bomb_seconds`` have passed, so :func:`clear` cannot help before that.
    """
    if fault not in FAULTS:
        raise FaultError(f"unknown fault {fault!r}; choose one of {', '.join(FAULTS)}")
    agent, kernel, cpus = _agent(host, vm_name)
    if fault == "fork-bomb":
        return _fork_bomb(host, agent, vm_name, kernel, seconds=bomb_seconds, mib=bomb_mib,
                          maximum=bomb_max, delay_ms=bomb_delay_ms, linear=bomb_linear,
                          progress=progress)
    if fault == "panic":
        triggered = time.monotonic()
        agent.spawn(["sh", "-c", "echo c > /proc/sysrq-trigger"])  # never answers
        return InjectReport(vm_name, "panic", kernel.release, triggered, None,
                            details={"trigger": "/proc/sysrq-trigger"})
    _load(host, agent, kernel, progress)
    if fault == "hung-driver":
        return _hung_driver(agent, vm_name, kernel, readers, reader_interval_ms)
    if fault == "oops":
        triggered = time.monotonic()
        killed = _sh(agent, f"echo oops > {CONTROL_FILE}", check=False)
        return InjectReport(vm_name, "oops", kernel.release, triggered, time.monotonic(),
                            details={"function": OOPS_FUNCTION,
                                     "writer_exit": str(killed.exit_code)})
    return _deadlock(agent, vm_name, kernel, cpus, cpu, irqs_off)


def _deadlock(agent: GuestAgent, vm_name: str, kernel: Kernel, cpus: int, cpu: int | None,
              irqs_off: bool) -> InjectReport:
    target = cpus - 1 if cpu is None else cpu
    if not 0 <= target < cpus:
        raise FaultError(f"vm {vm_name!r} has CPUs 0..{cpus - 1}, not {target}")
    if _status(agent).get("deadlock_cpu", -1) >= 0:
        raise FaultError(f"vm {vm_name!r} is already deadlocked")
    command = "deadlock-irq" if irqs_off else "deadlock"
    write = f"echo '{command} {target}' > {CONTROL_FILE}"
    triggered = time.monotonic()
    if cpus == 1:
        # The trigger wedges the only CPU: fire and forget.
        agent.spawn(["sh", "-c", write])
        return InjectReport(vm_name, "deadlock", kernel.release, triggered, None, cpu=target,
                            irqs_off=irqs_off, details={"thread": DEADLOCK_THREAD.format(
                                cpu=target), "note": "1 vCPU: the whole guest stops"})
    other = 0 if target != 0 else 1
    _sh(agent, f"taskset -c {other} sh -c {shlex.quote(write)}", timeout=30)
    returned = time.monotonic()
    confirmed = "unknown"
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _status(agent, timeout=5).get("deadlock_spinning") == 1:
                confirmed = "spinning"
                break
            time.sleep(0.05)
    except AgentError:
        pass  # with interrupts off the rest of the guest may soon stall too
    return InjectReport(vm_name, "deadlock", kernel.release, triggered, returned, cpu=target,
                        irqs_off=irqs_off, details={
                            "thread": DEADLOCK_THREAD.format(cpu=target), "state": confirmed})


def _hung_driver(agent: GuestAgent, vm_name: str, kernel: Kernel, readers: int,
                 interval_ms: int) -> InjectReport:
    if readers < 1:
        raise FaultError("the hung driver needs at least one reader")
    before = _status(agent).get("hang_readers", 0)
    pause = f"sleep {interval_ms / 1000:.3f}; " if interval_ms > 0 else ""
    sid_file = f"{READERS_SID}.{int(time.time() * 1000)}"
    loop = (f"echo $$ > {sid_file}; i=0; while [ $i -lt {readers} ]; do "
            f"cat {HANG_DEVICE} > /dev/null & i=$((i+1)); {pause}done; wait")
    triggered = time.monotonic()
    _sh(agent, f"mkdir -p {GUEST_DIR}; setsid -f sh -c {shlex.quote(loop)} "
               "< /dev/null > /dev/null 2>&1")
    session = _read_sid(agent, sid_file)
    _sh(agent, f"echo {session} >> {READERS_SID}")
    if interval_ms > 0:
        return InjectReport(vm_name, "hung-driver", kernel.release, triggered, None,
                            session=session, details={"device": HANG_DEVICE,
                                                      "function": HANG_FUNCTION})
    deadline = time.monotonic() + 60
    while _status(agent).get("hang_readers", 0) < before + readers:
        if time.monotonic() > deadline:
            raise FaultError(f"only {_status(agent).get('hang_readers')} readers blocked "
                             f"on {HANG_DEVICE} after 60 s")
        time.sleep(0.1)
    returned = time.monotonic()
    # The data arrives; the buggy driver does not wake anyone.
    _sh(agent, f"echo 'data for the readers' > {HANG_DEVICE}")
    pids = tuple(pid for pid, _, _, comm in _session_pids(agent, session) if comm == "cat")
    return InjectReport(vm_name, "hung-driver", kernel.release, triggered, returned,
                        session=session, pids=pids,
                        details={"device": HANG_DEVICE, "function": HANG_FUNCTION})


def _read_sid(agent: GuestAgent, path: str) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = _sh(agent, f"cat {path} 2>/dev/null", check=False).text.strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    raise FaultError(f"the guest never wrote {path}")


def _fork_bomb(host: Host, agent: GuestAgent, vm_name: str, kernel: Kernel, *, seconds: int,
               mib: int, maximum: int, delay_ms: int, linear: bool,
               progress: Progress) -> InjectReport:
    if seconds <= 0:
        raise FaultError("the fork bomb needs a duration in seconds")
    binary = build_forkbomb(host.cache, progress)
    target = f"{GUEST_DIR}/{FORKBOMB_NAME}"
    _copy(agent, binary, target, mode="0755")
    argv = [target, "--daemon", "--seconds", str(seconds), "--mib", str(mib),
            "--max", str(maximum), "--delay-ms", str(delay_ms), "--sid-file", BOMB_SID,
            *(["--linear"] if linear else [])]
    # Keep the host's only channel into the guest alive under the bomb.
    _sh(agent, "for p in $(pidof qemu-ga); do renice -n -20 -p $p; "
               "echo -1000 > /proc/$p/oom_score_adj; done > /dev/null", check=False)
    triggered = time.monotonic()
    result = agent.exec(argv, timeout=30)
    returned = time.monotonic()
    text = result.text.strip()
    if result.exit_code != 0 or not text.isdigit():
        raise FaultError(f"{FORKBOMB_NAME} did not start: {result.stderr.decode(errors='replace')}")
    session = int(text)
    return InjectReport(vm_name, "fork-bomb", kernel.release, triggered, returned,
                        session=session, details={
                            "program": target, "seconds": str(seconds), "mib": str(mib),
                            "growth": "linear" if linear else "exponential"})


def _retry(what: str, deadline: float, action: Callable[[], T]) -> T:
    """``action()``, retried while the guest agent is too busy to answer (a bomb's victim)."""
    while True:
        try:
            return action()
        except AgentError as exc:
            if time.monotonic() > deadline:
                raise FaultError(f"cannot {what}: {exc}") from exc
            time.sleep(0.5)


def _sessions(agent: GuestAgent, path: str) -> list[int]:
    text = _sh(agent, f"cat {path} 2>/dev/null", check=False).text
    return [int(s) for s in text.split() if s.isdigit()]


def _kill_session(agent: GuestAgent, session: int, wake: bool) -> bool:
    """SIGKILL the process group of ``session``'s leader (every process we started in it);
    True once none is left."""
    release = f"echo wake > {CONTROL_FILE} 2>/dev/null; " if wake else ""
    script = (f"kill -KILL -{session} 2>/dev/null; {release}"
              f"ps -s {session} -o pid= | wc -l")
    return _sh(agent, script, check=False, timeout=30).text.strip() == "0"


def clear(host: Host, vm_name: str, *, unload: bool = True, timeout: float = 120.0) -> ClearReport:
    """Stop the fork bombs and free the hung readers in ``vm_name``; unload the module.

    A deadlock cannot be cleared: it stays in ``remaining`` and the VM must be stopped.
    Retries while the guest is too loaded to answer, up to ``timeout`` seconds.
    """
    agent, _, _ = _agent(host, vm_name)
    deadline = time.monotonic() + timeout
    cleared: list[str] = []
    remaining: list[str] = []
    bombs = _retry("list the fork bombs", deadline, lambda: _sessions(agent, BOMB_SID))
    for session in bombs:
        while not _retry("kill the fork bomb", deadline,
                         partial(_kill_session, agent, session, False)):
            if time.monotonic() > deadline:
                raise FaultError(f"fork bomb session {session} survives SIGKILL")
            time.sleep(0.2)
    if bombs:
        _retry("forget the fork bombs", deadline, lambda: _sh(agent, f"rm -f {BOMB_SID}"))
        cleared.append("fork-bomb")
    status = _retry("read the fault module's state", deadline, lambda: _status(agent))
    readers = _retry("list the readers", deadline, lambda: _sessions(agent, READERS_SID))
    for session in readers:
        while not _retry("free the readers", deadline,
                         partial(_kill_session, agent, session, bool(status))):
            if time.monotonic() > deadline:
                raise FaultError(f"readers of session {session} survive SIGKILL")
            time.sleep(0.2)
    if readers:
        _sh(agent, f"rm -f {READERS_SID} {READERS_SID}.*")
        cleared.append("hung-driver")
    if status and status.get("deadlock_cpu", -1) >= 0:
        remaining.append("deadlock")
    elif status and unload:
        if status.get("hang_readers", 0):
            _sh(agent, f"echo wake > {CONTROL_FILE}")  # readers we did not start
        while _sh(agent, f"rmmod {MODULE_NAME}", check=False).exit_code != 0:
            if time.monotonic() > deadline:
                raise FaultError(f"{MODULE_NAME} stays in use in vm {vm_name!r}")
            time.sleep(0.2)
        cleared.append("module")
    return ClearReport(vm_name, tuple(cleared), tuple(remaining))
