"""Live kernel update: move a running service onto a fresh VM with the new kernel.

The policy: boot the standby first (the service keeps running meanwhile, and
the source's part of the precheck runs alongside), check what is to be moved,
pre-copy, then freeze, dump, hand over data and network, restore and verify
(with post-copy: and fetch the rest of the memory), and only then let the old
copy go and retire the old VM. Any failure before that rolls back to the old VM
(see migrate.engine); the standby is then discarded.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transmigrate.config import Service
from transmigrate.errors import MachineError, TransmigrateError
from transmigrate.guest.agent import GuestAgent
from transmigrate.migrate.criu import IMAGES_ROOT
from transmigrate.migrate.engine import MigrationFailed, StepHook, run_steps
from transmigrate.migrate.plan import GUEST_TOOLS, HOLD_DIR, Plan, Side
from transmigrate.migrate.precheck import PrecheckFailed, inspect_source
from transmigrate.migrate.precopy import CopyMode
from transmigrate.migrate.steps import migration_steps
from transmigrate.orchestrate.history import History
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.lifecycle import running, standby_pid_base, up
from transmigrate.orchestrate.logs import keep_logs
from transmigrate.orchestrate.services import oldest_process, service_root
from transmigrate.progress import Progress, silent
from transmigrate.vm.machine import Machine

__all__ = ["PrecheckFailed", "UpdateReport", "find_services", "recover_interrupted", "update"]


@dataclass(frozen=True)
class UpdateReport:
    name: str
    pids: list[int]
    """The moved trees' roots on the new VM: the same pids, unless a tree has its own
    pid namespace (then the pids inside are the same and the outer one is new)."""
    kernel_before: str
    kernel_after: str
    copy: str
    """How memory went: "pre-copy", "post-copy" or "stop-and-copy"."""
    steps: dict[str, float]
    """Seconds per step, the standby's boot included."""
    frozen_seconds: float
    total_seconds: float
    criu: list[dict[str, Any]]
    """Per tree, CRIU's own statistics under CRIU's names: pre-copy iterations, dump,
    restore."""
    carried: list[str]
    """Files outside the data volume copied to the new VM inside the freeze."""
    warnings: list[str]
    logs: str
    """The directory that keeps both VMs' consoles and CRIU's logs of this move."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_services(host: Host, name: str, *, pids: Sequence[int] = (),
                  processes: Sequence[str] = (), cgroups: Sequence[str] = (),
                  declared: Sequence[Service] = ()) -> list[int]:
    """The roots of the process trees to move: the pids, the oldest process of each
    name, every tree in each cgroup (v2, a path under /sys/fs/cgroup); with none of
    these, every declared service that runs (its holder, if transmigrate started it)."""
    agent = host.agent(running(host, name))
    roots: list[int] = []
    for pid in pids:
        if agent.exec(["kill", "-0", str(pid)]).exit_code != 0:
            raise TransmigrateError(f"no process {pid} in {name}")
        roots.append(pid)
    for process in processes:
        found = oldest_process(agent, process)
        if found is None:
            raise TransmigrateError(f"no process named {process} runs in {name}")
        roots.append(found)
    for cgroup in cgroups:
        roots += _cgroup_roots(agent, name, cgroup)
    if not (pids or processes or cgroups):
        if not declared:
            raise TransmigrateError(
                f"nothing to move in {name}: give --pid, --process or --cgroup, or declare "
                f"a service with vm = {name!r} in transmigrate.toml")
        roots = [pid for pid in (service_root(agent, s) for s in declared) if pid is not None]
        if not roots:
            raise TransmigrateError(f"none of the declared services "
                                    f"({', '.join(s.name for s in declared)}) runs in {name}")
    return sorted(set(roots), key=roots.index)


def _cgroup_roots(agent: GuestAgent, name: str, cgroup: str) -> list[int]:
    """The roots of the process trees that the cgroup (and its children) holds."""
    path = "/sys/fs/cgroup/" + cgroup.strip("/")
    listed = agent.exec(["sh", "-c", (
        f"[ -d {shlex.quote(path)} ] || exit 3; "
        f"for p in $(find {shlex.quote(path)} -name cgroup.procs -exec cat {{}} +); do "
        'echo "$p $(cut -d" " -f4 /proc/$p/stat 2>/dev/null)"; done')])
    if listed.exit_code == 3:
        raise TransmigrateError(f"no cgroup {cgroup} in {name}")
    parents: dict[int, int] = {}
    for line in listed.text.splitlines():
        fields = line.split()
        if len(fields) == 2:  # a process that exited meanwhile has no parent field
            parents[int(fields[0])] = int(fields[1])
    roots = sorted(pid for pid, parent in parents.items() if parent not in parents)
    if not roots:
        raise TransmigrateError(f"cgroup {cgroup} in {name} holds no process")
    return roots


def update(host: Host, name: str, kernel_spec: str, *, pids: Sequence[int],
           copy: str = "auto", strict: bool = False,
           service_check: Callable[[], None] | None = None,
           progress: Progress = silent, before_step: StepHook | None = None,
           standby: Machine | None = None) -> UpdateReport:
    """Move the process trees rooted at ``pids`` in VM ``name`` to a new VM on
    ``kernel_spec``, all frozen together. ``copy`` is a :class:`CopyMode` value;
    ``strict`` refuses, rather than warns about, changes to the old VM's root file
    system since it booted. ``standby``: a warm standby of ``name`` on that kernel
    (``recover.prepare_standby``) to move onto, rather than booting one; it is used up
    either way. A failed move keeps both VMs' logs (the error says where).
    """
    try:
        mode = CopyMode(copy)
    except ValueError:
        raise TransmigrateError(f"unknown copy mode {copy!r}; choose one of "
                                f"{', '.join(CopyMode)}") from None
    if not pids or len(set(pids)) != len(pids):
        raise TransmigrateError(f"cannot move the trees {list(pids)}: name each once")
    start = time.monotonic()
    recovered = recover_interrupted(host, name, progress)
    source = running(host, name)
    kernel = host.catalog.fetch(kernel_spec, progress=progress)
    source = host.machines.merge_data(source, progress)  # if the last update left it undone
    standby_name = f"{name}-next"
    pid_base = standby_pid_base(host, source)  # before the inspection takes the agent
    with ThreadPoolExecutor(max_workers=1) as pool:
        progress(f"inspecting what {name} moves while {standby_name} boots")
        inspecting = pool.submit(inspect_source, host.agent(source), pids)
        boot_start = time.monotonic()
        if standby is not None and standby.record.kernel == kernel.release:
            progress(f"moving onto the warm standby {standby.name}, as {standby_name}")
            target = host.machines.rename(standby, standby_name)
        else:
            target = up(host, standby_name, kernel.release,
                        memory_mib=source.record.memory_mib, cpus=source.record.cpus,
                        standby_for=source, pid_base=pid_base, progress=progress).machine
        boot_seconds = time.monotonic() - boot_start
        plan = Plan(source=Side(source.record, host.agent(source)),
                    target=Side(target.record, host.agent(target)),
                    network=host.network, pids=pids,
                    fence_target=lambda: host.machines.remove(target),
                    copy=mode, strict=strict, service_check=service_check)
        try:
            report = run_steps(plan, migration_steps(inspecting.result, progress), progress,
                               before_step)
        except BaseException as exc:
            logs = None if isinstance(exc, PrecheckFailed) else _logs_of(host, source, target)
            progress(f"discarding {standby_name}")
            host.machines.remove(target)
            _remove_images(host, source)
            if isinstance(exc, MigrationFailed) and logs is not None:
                raise MigrationFailed(f"{exc}; logs in {logs}") from exc
            raise
    logs = _logs_of(host, source, target)
    progress(f"retiring {name} ({source.record.kernel}); its logs are in {logs}")
    host.machines.remove(source)
    target = host.machines.take_over(target, name)
    _remove_images(host, target)
    warnings = ([recovered] if recovered else []) + list(report.warnings)
    merge_start = time.monotonic()
    try:
        host.machines.merge_data(target, progress)
    except MachineError as exc:
        warnings.append(f"{exc}; the service runs on, its newest data is safe in the "
                        "overlay, which the next update merges first")
    return UpdateReport(
        name=name, pids=[t.restored_pid or t.pid for t in report.trees],
        kernel_before=source.record.kernel,
        kernel_after=kernel.release, copy=report.copy,
        steps={"boot standby": round(boot_seconds, 3), **report.steps,
               "merge data": round(time.monotonic() - merge_start, 3)},
        frozen_seconds=round(report.frozen_seconds, 3),
        total_seconds=round(time.monotonic() - start, 3),
        criu=[asdict(tree) for tree in report.trees],
        carried=report.carried, warnings=warnings, logs=str(logs))


def recover_interrupted(host: Host, name: str, progress: Progress = silent) -> str | None:
    """Finish or undo an update of ``name`` that was killed: its standby (NAME-next) is
    still there. If the update had said "go", the old VM's copies are gone: the
    standby takes over. Else the trees resume on the old VM, its volume thawed and its
    NIC back on the bridge, and then the standby is stopped. What was done, or None."""
    standby = next((m for m in host.machines.all() if m.name == f"{name}-next"), None)
    if standby is None:
        return None
    with contextlib.closing(History.at(host.state)) as history:
        history.refuse_if_busy(name)  # not interrupted: under way in another process
    source = running(host, name)
    agent = host.agent(source)
    try:
        said = agent.run([f"{GUEST_TOOLS}/tm-migrate", "committed", HOLD_DIR],
                         what="asking how far the interrupted update went", timeout=30)
    except TransmigrateError as exc:
        raise TransmigrateError(
            f"an interrupted update of {name} left {standby.name}, and {name} cannot say "
            f"whether it had committed ({exc}); stop the VM that does not run the service "
            "(transmigrate down)") from exc
    if said.text.strip() == "committed":
        progress(f"an interrupted update of {name} had committed: finishing it")
        agent.exec(["sh", "-c", f"{GUEST_TOOLS}/tm-migrate decide go {HOLD_DIR}/*/"])
        host.machines.remove(source)
        target = host.machines.take_over(standby, name)
        with contextlib.suppress(MachineError):
            host.machines.merge_data(target, progress)
        return (f"an interrupted update of {name} had committed: finished, {name} runs "
                f"{target.record.kernel}")
    progress(f"an interrupted update of {name} had not committed: undoing it")
    # the standby goes last: a dump still sending pages to its page server would
    # wait for it past any timeout, its trees frozen
    agent.run([f"{GUEST_TOOLS}/tm-migrate", "abandon", HOLD_DIR],
              what="resuming the held trees", timeout=60)
    host.machines.remove(standby)
    host.network.attach(source.record.service_tap)
    _remove_images(host, source)
    return (f"an interrupted update of {name} was undone: {standby.name} removed, the "
            f"service runs on in {name}")


def _logs_of(host: Host, source: Machine, target: Machine) -> Path:
    """Keep what explains a move, done or failed, before a VM goes: both consoles and
    CRIU's logs from both VMs."""
    return keep_logs(host, f"update-{source.name}", [source, target],
                     [(source, IMAGES_ROOT), (target, IMAGES_ROOT)])


def _remove_images(host: Host, machine: Machine) -> None:
    with contextlib.suppress(TransmigrateError):
        host.agent(machine).exec(["rm", "-rf", IMAGES_ROOT])
