"""Live kernel update: move a running service onto a fresh VM with the new kernel.

The policy: boot the standby first (the service keeps running meanwhile),
check what is to be moved, pre-copy, then freeze, dump, hand over data and
network, restore and verify (with post-copy: and fetch the rest of the memory),
and only then let the old copy go and retire the old VM. Any failure before
that rolls back to the old VM (see migrate.steps); the standby is then discarded.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from transmigrate.errors import TransmigrateError
from transmigrate.guest.agent import GuestAgent
from transmigrate.migrate.criu import IMAGES_ROOT
from transmigrate.migrate.precopy import COPY_MODES, PreCopyPolicy
from transmigrate.migrate.steps import Plan, Side, migration_steps, run_steps
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.lifecycle import running, up
from transmigrate.progress import Progress, silent
from transmigrate.vm.machine import Machine

__all__ = ["UpdateReport", "find_service", "update"]


@dataclass(frozen=True)
class UpdateReport:
    name: str
    pid: int
    """The moved tree's root on the new VM: the same pid, unless it has its own pid
    namespace (then the pids inside are the same and the outer one is new)."""
    kernel_before: str
    kernel_after: str
    copy: str
    """How memory went: "pre-copy", "post-copy" or "stop-and-copy"."""
    steps: dict[str, float]
    """Seconds per step, the standby's boot included."""
    frozen_seconds: float
    total_seconds: float
    criu: dict[str, Any]
    """CRIU's own statistics under CRIU's names: pre-copy iterations, dump, restore."""
    warnings: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_service(host: Host, name: str, *, pid: int | None = None,
                 process: str | None = None, cgroup: str | None = None,
                 declared: Sequence[str] = ()) -> int:
    """The root pid of what to move: a pid, the oldest process of a name, the one
    process tree in a cgroup (v2, its path under /sys/fs/cgroup), or the declared
    service. One update moves one process tree: more would be left behind when the
    old VM is retired, so that is refused."""
    agent = host.agent(running(host, name))
    if pid is not None:
        if agent.exec(["kill", "-0", str(pid)]).exit_code != 0:
            raise TransmigrateError(f"no process {pid} in {name}")
        return pid
    if cgroup is not None:
        return _cgroup_root(agent, name, cgroup)
    names = [process] if process else list(declared)
    if not names:
        raise TransmigrateError(
            f"nothing to move in {name}: give --pid, --process or --cgroup, or declare "
            f"[services] {name} = [...] in transmigrate.toml")
    found = {candidate: agent.exec(["pgrep", "-o", "-x", candidate]).text.split()
             for candidate in names}
    alive = {candidate: int(pids[0]) for candidate, pids in found.items() if pids}
    if not alive:
        raise TransmigrateError(f"no process named {', '.join(names)} runs in {name}")
    if len(alive) > 1:
        raise TransmigrateError(
            f"{name} runs {len(alive)} declared services "
            f"({', '.join(f'{n} pid {p}' for n, p in alive.items())}): one update moves "
            "one process tree, and the rest would die with the old VM")
    return next(iter(alive.values()))


def _cgroup_root(agent: GuestAgent, name: str, cgroup: str) -> int:
    """The root of the one process tree that the cgroup (and its children) holds."""
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
    if len(roots) > 1:
        raise TransmigrateError(
            f"cgroup {cgroup} in {name} holds {len(roots)} process trees (roots "
            f"{', '.join(map(str, roots))}): one update moves one tree")
    return roots[0]


def update(host: Host, name: str, kernel_spec: str, *, pid: int, copy: str = "auto",
           service_check: Callable[[], None] | None = None,
           progress: Progress = silent) -> UpdateReport:
    """Move process tree ``pid`` of VM ``name`` to a new VM on ``kernel_spec``.

    ``copy`` is one of :data:`COPY_MODES`.
    """
    if copy not in COPY_MODES:
        raise TransmigrateError(f"unknown copy mode {copy!r}; choose one of "
                                f"{', '.join(COPY_MODES)}")
    start = time.monotonic()
    source = running(host, name)
    kernel = host.catalog.fetch(kernel_spec, progress=progress)
    standby_name = f"{name}-next"
    boot_start = time.monotonic()
    target = up(host, standby_name, kernel.release, memory_mib=source.record.memory_mib,
                cpus=source.record.cpus, standby_for=source, progress=progress).machine
    boot_seconds = time.monotonic() - boot_start
    plan = Plan(source=Side(source.record, host.agent(source)),
                target=Side(target.record, host.agent(target)),
                network=host.network, pid=pid,
                fence_target=lambda: host.machines.remove(target),
                policy=PreCopyPolicy() if copy in ("auto", "pre") else None,
                postcopy={"auto": "auto", "post": "yes"}.get(copy, "no"),
                service_check=service_check)
    try:
        report = run_steps(plan, migration_steps(progress), progress)
    except BaseException:
        progress(f"discarding {standby_name}")
        host.machines.remove(target)
        _remove_images(host, source)
        raise
    progress(f"retiring {name} ({source.record.kernel})")
    host.machines.remove(source)
    target = host.machines.rename(target, name)
    _remove_images(host, target)
    return UpdateReport(
        name=name, pid=plan.restored_pid or pid, kernel_before=source.record.kernel,
        kernel_after=kernel.release, copy=report.copy,
        steps={"boot standby": round(boot_seconds, 3), **report.steps},
        frozen_seconds=round(report.frozen_seconds, 3),
        total_seconds=round(time.monotonic() - start, 3),
        criu={"precopy": [asdict(s) for s in report.precopy],
              "dump": asdict(report.dump) if report.dump else None,
              "restore": asdict(report.restore) if report.restore else None},
        warnings=report.warnings)


def _remove_images(host: Host, machine: Machine) -> None:
    with contextlib.suppress(TransmigrateError):
        host.agent(machine).exec(["rm", "-rf", IMAGES_ROOT])
