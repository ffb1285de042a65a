"""Recovering processes from a guest whose kernel is dead, hung, or merely stopped.

The VM is stopped (QMP ``stop``): from then on nothing in it moves. Each chosen
process is read out of its RAM through the kernel's own types and written as
CRIU images on the host (:mod:`transmigrate.recover`); a standby restores them.
"""

from __future__ import annotations

import contextlib
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from transmigrate import paths
from transmigrate.config import Service
from transmigrate.errors import IntrospectionError, MachineError, TransmigrateError
from transmigrate.guest.agent import GuestAgent
from transmigrate.introspect.clocks import read_clocks
from transmigrate.introspect.kernel import Guest, attach
from transmigrate.introspect.pagecache import unwritten_files
from transmigrate.introspect.process import (
    FileState,
    ProcessState,
    Refusal,
    read_cmdline,
    read_tree,
)
from transmigrate.introspect.sockets import SocketState
from transmigrate.introspect.tasks import TaskReader
from transmigrate.migrate.criu import LOG_LEVEL
from transmigrate.migrate.plan import GUEST_TOOLS
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.lifecycle import STANDBY_PID_MARGIN, up
from transmigrate.orchestrate.logs import keep_logs
from transmigrate.orchestrate.services import start_service
from transmigrate.progress import Progress, silent
from transmigrate.recover.images import WRITEBACK, write_images, write_writeback
from transmigrate.vm.machine import Machine
from transmigrate.vm.qemu_command import IMPORT_SERIAL
from transmigrate.vm.registers import vcpu_states
from transmigrate.vm.volume import DATA_MOUNT, directory_disk

__all__ = ["DumpReport", "ProcessVerdict", "RecoverReport", "dead_name", "dump",
           "prepare_standby", "recover", "warm_standby"]

GUEST_IMAGES = "/run/transmigrate-import"
"""Where the new VM mounts the disk of images (read-only) it restores from."""
VOLUME_WRITEBACK = "volume-writeback.bin"
"""Beside the images: the data volume's pages its kernel had not written (tm-writeback)."""
RESTORE_WORK = "/var/lib/transmigrate/recover"
"""CRIU's working directory (its logs) per restored process in the new VM."""
_MOUNT_IMPORT = (
    f"for d in /sys/block/vd*; do s=; read -r s 2>/dev/null < $d/serial; "
    f"[ \"$s\" = {IMPORT_SERIAL} ] && dev=/dev/${{d##*/}}; done; "
    f"mkdir -p {GUEST_IMAGES} && blockdev --flushbufs \"$dev\" && "
    f"mount -o ro -t ext4 \"$dev\" {GUEST_IMAGES}")
"""Find the images disk by its serial (device names do not matter) and mount it; a warm
standby's was empty when it booted, so what its kernel cached of it is dropped first."""
_KERNEL_FILE_SYSTEMS = ("/proc/", "/sys/", "/dev/")
"""Files the new kernel makes itself (a /proc/PID one only once PID is restored)."""
STANDBY_SUFFIX = "-standby"
"""A warm standby for VM NAME is NAME-standby."""


@dataclass
class ProcessVerdict:
    pid: int
    comm: str = ""
    verdict: str = "refused"
    """"dumped", "restored", "restored with losses" (naming them), "refused" (not
    dumped), "restarted" (a declared service refused when its kernel was dead, started
    again from its data volume, as a reboot would) or "failed" (CRIU could not restore
    it on the new kernel, or a restart failed; only when the old kernel is dead, else
    the whole recovery fails and the old VM runs on)."""
    reason: str = ""
    losses: list[str] = field(default_factory=list)
    connections: int = 0
    """Established TCP connections, rebuilt in repair mode (``--tcp-established``)."""
    file_locks: int = 0
    """POSIX and flock locks its processes hold, taken again (``--file-locks``)."""
    relock: dict[int, list[str]] = field(default_factory=dict)
    """By pid: POSIX locks on files the process also maps, as tm-relock takes them
    again after the restore (CRIU's own mapping of the file drops them)."""
    cut: list[str] = field(default_factory=list)
    """Connections cut (see losses) whose peers are sent a reset, as tm-reset takes them."""
    listening: list[int] = field(default_factory=list)
    """TCP ports it listens on (for all addresses, or the service's)."""
    pages: int = 0
    images: str = ""
    needed_files: dict[str, int] = field(default_factory=dict)
    """The executable, mapped and open regular files that the new VM must have as they
    were (from the image both boot), by path, with their sizes: all but those on the
    data volume or a tmpfs, which go with the processes, and the kernel's own."""
    processes: list[int] = field(default_factory=list)
    """Every process of the tree rooted at ``pid``, parents first."""
    own_session: bool = True
    """Whether it leads its session; if not, CRIU gives it the restoring one's."""


@dataclass
class DumpReport:
    vm: str
    kernel: str
    processes: list[ProcessVerdict]
    steps: dict[str, float] = field(default_factory=dict)
    unwritten_read: bool = False
    """Whether the data volume's page cache was read, to be written back (recover)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stop_vm(machine: Machine) -> str:
    """Stop ``machine``'s vCPUs; its run state before (e.g. 'running', 'guest-panicked')."""
    state = machine.status()
    if state == "dead":
        raise MachineError(f"vm {machine.name!r} is gone (its QEMU exited): its memory "
                           "went with it")
    if state == "running":
        machine.qmp("stop")
    return state


def dump(host: Host, name: str, pids: list[int], out: Path, *, panicking: bool = False,
         progress: Progress = silent) -> DumpReport:
    """Checkpoint ``pids`` of VM ``name`` from the host, into ``out/<pid>/``: the VM is
    stopped while its memory is read, and runs on afterwards if it ran. ``panicking``
    lets the task that panicked the kernel be read too."""
    if not pids:
        raise TransmigrateError("name at least one process to dump (--pid)")
    machine = host.machines.get(name)
    steps: dict[str, float] = {}
    start = time.monotonic()
    before = stop_vm(machine)
    progress(f"{name} stopped (it was {before})")
    try:
        report = _checkpoint(host, machine, pids, out, steps, progress,
                             panicking=panicking)
    finally:
        if before == "running":
            machine.qmp("cont")
    steps["total"] = round(time.monotonic() - start, 3)
    return report


def _checkpoint(host: Host, machine: Machine, pids: Sequence[int], out: Path,
                steps: dict[str, float], progress: Progress,
                processes: Sequence[str] = (), panicking: bool = False,
                services: Sequence[Service] = (), unwritten: bool = False) -> DumpReport:
    """Read the processes out of ``machine``'s memory as CRIU images under ``out``;
    ``unwritten``: the data volume's page cache that its disk may lack too
    (:data:`VOLUME_WRITEBACK`)."""
    mark = time.monotonic()
    vcpus = vcpu_states(machine, machine.record.cpus)
    progress(f"reading {machine.name}'s kernel ({machine.record.kernel})")
    with attach(machine, catalog=host.catalog) as guest:
        steps["attach"] = round(time.monotonic() - mark, 3)
        report = DumpReport(machine.name, guest.release, [], steps)
        clocks = read_clocks(guest)
        for pid in [*pids, *_find_processes(guest, processes, services)]:
            mark = time.monotonic()
            verdict = ProcessVerdict(pid)
            report.processes.append(verdict)
            try:
                tree = read_tree(guest, pid, vcpus=vcpus, allow_panicking=panicking)
            except Refusal as exc:
                verdict.reason = exc.reason
                progress(f"refused {pid}: {exc.reason}")
                continue
            except IntrospectionError as exc:
                verdict.reason = str(exc)
                progress(f"refused {pid}: {exc}")
                continue
            root = tree[0]
            verdict.comm = root.leader.comm
            verdict.processes = [p.pid for p in tree]
            verdict.own_session = root.sid == root.pid
            verdict.losses = [f"process {p.pid}: {loss}" for p in tree for loss in p.losses]
            verdict.needed_files = {state.path: state.size for p in tree for state in (
                p.exe, *(m.file for m in p.mappings if m.file is not None),
                *(f for f, _ in p.files.values() if isinstance(f, FileState)
                  and stat.S_ISREG(f.mode)))
                if state.tmpfs is None
                and not state.path.startswith((f"{DATA_MOUNT}/", *_KERNEL_FILE_SYSTEMS))}
            sockets = list({f.key: f for p in tree for f, _ in p.files.values()
                            if isinstance(f, SocketState)}.values())
            verdict.connections = sum(1 for s in sockets if s.stream is not None)
            verdict.file_locks = sum(len(p.locks) for p in tree)
            verdict.relock = _locks_on_mapped_files(tree)
            verdict.cut = [s.cut.argument for s in sockets if s.cut is not None]
            service = machine.record.ip
            verdict.listening = sorted({s.src_port for s in sockets if s.state == "LISTEN"
                                        and s.src_addr in ("0.0.0.0", "::", service)})
            directory = out / str(pid)
            write_images(tree, clocks, guest.ram, directory)
            verdict.verdict, verdict.images = "dumped", str(directory)
            verdict.pages = sum(len(p.pages) for p in tree)
            steps[f"read {pid}"] = round(time.monotonic() - mark, 3)
            progress(f"dumped {pid} ({verdict.comm}"
                     + (f" and {len(tree) - 1} below it" if len(tree) > 1 else "")
                     + f"): {verdict.pages} pages in {steps[f'read {pid}']:.2f} s")
        if unwritten:
            report.unwritten_read = _read_unwritten(guest, out, steps, progress)
    return report


def _locks_on_mapped_files(tree: Sequence[ProcessState]) -> dict[int, list[str]]:
    """tm-relock's arguments, by pid, for the POSIX locks a process holds on a file it
    also maps (sqlite's -shm): ``criu restore`` maps the file through a descriptor it
    then closes, and a close drops the process's POSIX locks on the file."""
    relock = {}
    for process in tree:
        mapped = {m.file.path for m in process.mappings if m.file is not None}
        locks = [lock for lock in process.locks if lock.posix
                 and isinstance(state := process.files[lock.fd][0], FileState)
                 and state.path in mapped]
        if locks:
            relock[process.pid] = [f"{lock.fd}:{lock.type}:{lock.start}:{lock.length}"
                                   for lock in locks]
    return relock


def _read_unwritten(guest: Guest, out: Path, steps: dict[str, float],
                    progress: Progress) -> bool:
    """The data volume's pages its kernel had not written, for tm-writeback: what a
    service started again from the volume would otherwise lose. Not reading them is
    no reason to give up the recovery. Whether they were read."""
    mark = time.monotonic()
    try:
        files = unwritten_files(guest)
    except IntrospectionError as exc:
        progress(f"not writing back the volume's page cache: {exc}")
        return False
    if files:
        out.mkdir(parents=True, exist_ok=True)
        write_writeback(files, guest.ram, out / VOLUME_WRITEBACK)
        pages = sum(len(f.dirty) for f in files)
        progress(f"{pages} page(s) of {len(files)} file(s) on the volume not yet on its "
                 "disk: written back before anything starts")
    steps["read unwritten pages"] = round(time.monotonic() - mark, 3)
    return True


def _find_processes(guest: Guest, names: Sequence[str],
                    services: Sequence[Service] = ()) -> list[int]:
    """The oldest process of each name, and the root of each declared service (its
    tm-service holder, else its oldest process), from the kernel's task list."""
    if not names and not services:
        return []
    tasks = TaskReader(guest).sample(threads=False).tasks
    found = []

    def oldest(name: str) -> int | None:
        matches = sorted(t.pid for t in tasks if t.comm == name[:15] and not t.kernel_thread)
        return matches[0] if matches else None

    for name in names:
        pid = oldest(name)
        if pid is None:
            raise TransmigrateError(f"no process named {name} in the guest's memory")
        found.append(pid)
    for service in services:
        holders = [t.pid for t in tasks if t.comm == "tm-service"
                   and read_cmdline(guest, t.pid)[2:3] == [service.name]]
        pid = min(holders) if holders else oldest(service.process)
        if pid is None:
            raise TransmigrateError(f"service {service.name} does not run in the guest's "
                                    f"memory (no holder, no process {service.process})")
        found.append(pid)
    return found


@dataclass
class RecoverReport:
    vm: str
    kernel_before: str
    kernel_after: str
    state_before: str
    """The VM's run state when recovery stopped it ('running', 'guest-panicked', ...)."""
    processes: list[ProcessVerdict]
    steps: dict[str, float]
    stop_to_serving_seconds: float
    """From the VM's stop to every recovered process running on the new kernel."""
    stop_to_accepting_seconds: float | None
    """From the VM's stop to every port the processes listen on accepting a connection
    on the service address (None if none listens)."""
    warm_standby: bool
    """Whether a warm standby (``prepare_standby``) took over, or a new VM was booted."""
    dead_vm: str
    """The old VM, kept paused for diagnosis until ``down``."""
    memory_dump: str
    logs: str
    """The directory that keeps both VMs' consoles and CRIU's restore logs."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def recover(host: Host, name: str, kernel_spec: str | None = None, *,
            pids: Sequence[int] = (), processes: Sequence[str] = (),
            services: Sequence[Service] = (), panicking: bool = False,
            abandoned: bool = False, progress: Progress = silent) -> RecoverReport:
    """Recover processes of VM ``name`` (dead, hung or running) onto its warm standby
    on ``kernel_spec`` (default: the same kernel), or a new VM booted for it, which takes
    the name, the service address and the data volume. The old VM is never resumed after
    a restore; it stays paused as NAME-dead (-dead-2, ... if one is kept already). If
    nothing was restored, it keeps its name (and runs on, if it ran), and the new VM is
    removed. ``panicking``: the task that panicked the kernel in a system call too (the
    call is made again: it may crash the new kernel as well). ``abandoned``: the kernel
    is given up although it may run (the guard's decision), so what cannot be rebuilt is
    handled as for a dead one: a process CRIU cannot restore is failed and the others go
    on, and a refused declared service is started again from its data volume."""
    if not (pids or processes or services):
        raise TransmigrateError(f"name the processes to recover (--pid or --process), or "
                                f"declare services for {name} in transmigrate.toml")
    machine = host.machines.get(name)
    start = time.monotonic()
    before = stop_vm(machine)
    steps: dict[str, float] = {"stop": round(time.monotonic() - start, 3)}
    progress(f"{name} stopped (it was {before})")
    images = paths.data_dir() / "recover" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        checkpoint = _checkpoint(host, machine, pids, images, steps, progress, processes,
                                 panicking, services, unwritten=True)
    except BaseException:
        if before == "running":
            machine.qmp("cont")
        raise
    dumped = [v for v in checkpoint.processes if v.verdict == "dumped"]
    kernel_dead = abandoned or before not in ("running", "paused")
    restarts = [(service, verdict) for service, verdict in zip(
        services, checkpoint.processes[len(checkpoint.processes) - len(services):],
        strict=True) if kernel_dead and verdict.verdict == "refused" and service.start]
    if not dumped and not restarts:
        if before == "running":
            machine.qmp("cont")
        raise TransmigrateError("nothing to recover: " + "; ".join(
            f"{v.pid}: {v.reason}" for v in checkpoint.processes))
    images.mkdir(parents=True, exist_ok=True)  # empty when only restarts are left
    dead = host.machines.rename(machine, dead_name(host, name))
    try:
        target = _restore_on_standby(host, name, dead, kernel_spec or dead.record.kernel,
                                     dumped, images, steps, progress,
                                     keep_partial=kernel_dead)
        _restart(host, target, restarts, steps, progress, alone=not dumped,
                 written_back=checkpoint.unwritten_read)
        serving = time.monotonic() - start
        ports = sorted({port for v in dumped if v.verdict != "failed" for port in v.listening})
        accepting = None
        if ports:
            progress(f"waiting for port(s) {', '.join(map(str, ports))} on "
                     f"{target.record.ip}")
            _wait_accepting(host, target.record.ip, ports)
            accepting = round(time.monotonic() - start, 3)
    except BaseException:
        targets = [m for m in host.machines.all()
                   if m.name in (f"{name}-next", f"{name}{STANDBY_SUFFIX}")]
        logs = keep_logs(host, f"recover-{name}", [dead, *targets],
                         [(m, RESTORE_WORK) for m in targets])
        progress(f"recovery failed: {name} keeps its name, the new VM is removed; the logs "
                 f"are in {logs}")
        for standby in (f"{name}-next", f"{name}{STANDBY_SUFFIX}"):
            with contextlib.suppress(TransmigrateError):
                host.machines.remove(host.machines.get(standby), keep_network=True)
        host.machines.rename(dead, name)
        with contextlib.suppress(TransmigrateError):  # if the handover was made
            host.network.attach(dead.record.service_tap)
        if before == "running":
            dead.qmp("cont")
        raise
    logs = keep_logs(host, f"recover-{name}", [dead, target], [(target, RESTORE_WORK)])
    progress(f"{dead.name}'s and {target.name}'s logs are in {logs}")
    host.machines.take_over(target, name)
    if target.record.import_disk:  # QEMU holds it open; the images stay in their directory
        Path(target.record.import_disk).unlink(missing_ok=True)
    dump_path = dead.directory / "memory.kdump"
    with contextlib.suppress(MachineError):  # for diagnosis; the service does not wait
        dead.qmp("dump-guest-memory", {"paging": False, "protocol": f"file:{dump_path}",
                                       "format": "kdump-zlib", "detach": True})
    steps["total"] = round(time.monotonic() - start, 3)
    return RecoverReport(
        vm=name, kernel_before=checkpoint.kernel, kernel_after=target.record.kernel,
        state_before=before, processes=checkpoint.processes, steps=steps,
        stop_to_serving_seconds=round(serving, 3), stop_to_accepting_seconds=accepting,
        warm_standby="boot standby" not in steps,
        dead_vm=dead.name,
        memory_dump=str(dump_path), logs=str(logs))


def dead_name(host: Host, name: str) -> str:
    """The name a stopped VM keeps for diagnosis: NAME-dead, or NAME-dead-2, -3, ...
    when earlier ones are still kept."""
    taken = {m.name for m in host.machines.all()}
    return next(candidate for candidate in (
        f"{name}-dead", *(f"{name}-dead-{n}" for n in range(2, 1000)))
        if candidate not in taken)


def _restore_on_standby(host: Host, name: str, dead: Machine, kernel: str,
                        dumped: list[ProcessVerdict], images: Path,
                        steps: dict[str, float], progress: Progress,
                        keep_partial: bool) -> Machine:
    """Take NAME's warm standby on ``kernel`` and write the images onto its empty disk,
    or boot a new VM with the old one's identity and volume and the images on a disk of
    their own; write back the dirty page cache; restore; hand the address over.
    ``keep_partial``: a process CRIU fails to restore is marked failed and the others
    go on (the old kernel is dead: nothing runs there any more); else it fails all."""
    mark = time.monotonic()
    warm = warm_standby(host, name, kernel)
    if warm is not None:
        progress(f"writing the images onto {warm.name}'s disk (a warm standby on "
                 f"{warm.record.kernel})")
        directory_disk(images, Path(warm.record.import_disk), fill=True)
        steps["images disk"] = round(time.monotonic() - mark, 3)
        target = warm
    else:
        disk = directory_disk(images, images.with_suffix(".img"))
        steps["images disk"] = round(time.monotonic() - mark, 3)
        mark = time.monotonic()
        try:
            target = up(host, f"{name}-next", kernel, memory_mib=dead.record.memory_mib,
                        cpus=dead.record.cpus, standby_for=dead, import_disk=disk,
                        pid_base=max((p for v in dumped for p in v.processes), default=0)
                        + STANDBY_PID_MARGIN, progress=progress).machine
        finally:
            disk.unlink()  # QEMU holds it open; the images stay in their directory
        steps["boot standby"] = round(time.monotonic() - mark, 3)
    agent = host.agent(target)
    mark = time.monotonic()
    progress(f"mounting the data volume in {target.name} (its journal replays)")
    writebacks = " && ".join([  # the processes' own last: their sizes may be rewound
        *([f"{GUEST_TOOLS}/tm-writeback --missing-ok {GUEST_IMAGES}/{VOLUME_WRITEBACK}"]
          if (images / VOLUME_WRITEBACK).exists() else []),
        *(f"{GUEST_TOOLS}/tm-writeback {GUEST_IMAGES}/{v.pid}/{WRITEBACK}" for v in dumped
          if (images / str(v.pid) / WRITEBACK).exists())])
    agent.sh(f"{GUEST_TOOLS}/tm-data mount && {_MOUNT_IMPORT}"
             + (f" && {writebacks}" if writebacks else ""),
             what="mounting the volume and the images, writing back", timeout=120)
    steps["mount and write back"] = round(time.monotonic() - mark, 3)
    missing = _missing_files(agent, target.name, dumped)
    for verdict in dumped:
        if verdict.pid in missing:
            if not keep_partial:
                raise TransmigrateError(missing[verdict.pid])
            verdict.verdict, verdict.reason = "failed", missing[verdict.pid]
            progress(missing[verdict.pid])
            continue
        mark = time.monotonic()
        work = f"{RESTORE_WORK}/{verdict.pid}"
        progress(f"restoring {verdict.pid} ({verdict.comm}) on {target.record.kernel}")
        options = ("" if verdict.own_session else " --shell-job") + (
            " --tcp-established" if verdict.connections else "") + (
            " --file-locks" if verdict.file_locks else "")
        restored = agent.exec(["sh", "-c", f"mkdir -p {work} && exec criu restore -D "
                               f"{GUEST_IMAGES}/{verdict.pid} -W {work} --restore-detached"
                               f"{options} -o restore.log {LOG_LEVEL}"], timeout=300)
        if restored.exit_code != 0:
            log = agent.exec(["sh", "-c", f"grep -E 'Error|error' {work}/restore.log | "
                                          "head -1"]).text.strip()
            with contextlib.suppress(TransmigrateError, OSError):
                (images / str(verdict.pid) / "restore.log").write_bytes(
                    agent.exec(["cat", f"{work}/restore.log"]).stdout)
            failure = (f"criu restore of {verdict.pid} failed in {target.name}: "
                       f"{log or f'exit {restored.exit_code}'}")
            if not keep_partial:
                raise TransmigrateError(failure)
            verdict.verdict, verdict.reason = "failed", failure
            progress(failure)
            continue
        for pid, locks in verdict.relock.items():
            relocked = agent.exec([f"{GUEST_TOOLS}/tm-relock", str(pid), *locks])
            if relocked.exit_code != 0:
                verdict.losses.append(
                    f"process {pid}: its POSIX locks on files it maps are not held again: "
                    f"{relocked.stderr.decode(errors='replace').strip()}")
        verdict.verdict = "restored with losses" if verdict.losses else "restored"
        steps[f"restore {verdict.pid}"] = round(time.monotonic() - mark, 3)
    running = [v for v in dumped if v.verdict != "failed"]
    if dumped and not running:
        raise TransmigrateError("no process could be restored: " + "; ".join(
            v.reason for v in dumped))
    alive = agent.exec(["sh", "-c", " && ".join(["true", *(f"kill -0 {v.pid}"
                                                           for v in running)])])
    if alive.exit_code != 0:
        raise TransmigrateError(f"a restored process exited at once in {target.name}")
    host.network.detach(dead.record.service_tap)
    host.network.attach(target.record.service_tap)
    cut = [connection for v in running for connection in v.cut]
    if cut:  # their peers may be waiting for a reply that will not come
        reset = agent.exec([f"{GUEST_TOOLS}/tm-reset", *cut])
        progress(f"sent a reset to the peers of {len(cut)} connection(s) cut"
                 if reset.exit_code == 0 else f"could not reset the connections cut: "
                 f"{reset.stderr.decode(errors='replace').strip()}")
    return target


def _restart(host: Host, target: Machine, restarts: Sequence[tuple[Service, ProcessVerdict]],
             steps: dict[str, float], progress: Progress, *, alone: bool,
             written_back: bool) -> None:
    """Start the declared services that could not be rebuilt again on ``target``, from
    their data volume, as a reboot would: better than losing them with their kernel.
    ``written_back``: the volume has what their kernel had not written yet.
    One that does not start is failed; ``alone`` (nothing was restored): if none
    starts, the recovery fails."""
    for service, verdict in restarts:
        mark = time.monotonic()
        progress(f"starting {service.name} again on {target.name} from its data volume "
                 f"(refused: {verdict.reason})")
        try:
            root = start_service(host, replace(service, vm=target.name), timeout=60)
        except TransmigrateError as exc:
            verdict.verdict, verdict.reason = "failed", f"{verdict.reason}; restart: {exc}"
            progress(f"{service.name} did not start again: {exc}")
            continue
        verdict.verdict, verdict.processes = "restarted", [root]
        lost = "what it held in memory and its connections" if written_back else \
            "what it held in memory, its connections, and what its kernel had not written " \
            "to the volume"
        verdict.losses.append(f"{service.name} was started again from its data volume: "
                              f"{lost} are gone")
        steps[f"restart {service.name}"] = round(time.monotonic() - mark, 3)
    if alone and all(v.verdict == "failed" for _, v in restarts):
        raise TransmigrateError("nothing could be recovered or started again: " + "; ".join(
            v.reason for _, v in restarts))


def _wait_accepting(host: Host, address: str, ports: list[int]) -> None:
    """Until each port accepts a connection from the service network, as a client's."""
    done = host.network.run([sys.executable, "-m", "transmigrate.orchestrate.probe", address,
                             *map(str, ports), "--timeout", "60"], capture=True, timeout=90)
    if done.returncode != 0:
        raise TransmigrateError(f"the restored service does not accept connections: "
                                f"{done.stderr.decode(errors='replace').strip()}")


def prepare_standby(host: Host, name: str, kernel_spec: str | None = None, *,
                    progress: Progress = silent) -> Machine:
    """Boot a warm standby for VM ``name`` on ``kernel_spec`` (default: the same kernel):
    NAME-standby, with NAME's identity and volume (off the network, unmounted) and an
    empty disk that `recover` fills with the images, so a recovery does not wait for a
    boot. Its pids start far above NAME's."""
    active = host.machines.get(name)
    standby = f"{name}{STANDBY_SUFFIX}"
    if any(m.name == standby for m in host.machines.all()):
        raise TransmigrateError(f"{name} has a standby already ({standby})")
    disk = paths.data_dir() / "recover" / f"{standby}.import"
    disk.parent.mkdir(parents=True, exist_ok=True)
    with open(disk, "wb") as handle:  # sparse: the images of all of its memory fit
        handle.truncate((active.record.memory_mib * 5 // 4 + 256) << 20)
    try:
        machine = up(host, standby, kernel_spec or active.record.kernel,
                     memory_mib=active.record.memory_mib, cpus=active.record.cpus,
                     standby_for=active, import_disk=disk, progress=progress).machine
    except BaseException:
        disk.unlink(missing_ok=True)
        raise
    # CRIU's first run on a boot probes the kernel's features (1.5 s under TCG) and
    # keeps them in /run: done now, not while a recovered service waits for its
    # restore. The check's own answer does not matter.
    progress(f"letting CRIU learn {standby}'s kernel")
    host.agent(machine).exec(["criu", "check", "--feature", "mem_dirty_track"])
    return machine


def warm_standby(host: Host, name: str, kernel: str) -> Machine | None:
    """NAME's warm standby, if it runs on ``kernel``."""
    standby = next((m for m in host.machines.all() if m.name == f"{name}{STANDBY_SUFFIX}"),
                   None)
    if standby is None or standby.status() != "running" or not standby.record.import_disk:
        return None
    if host.catalog.resolve(kernel) != standby.record.kernel:
        return None
    return standby


def _missing_files(agent: GuestAgent, where: str,
                   dumped: list[ProcessVerdict]) -> dict[int, str]:
    """Why each process whose needed files (see ``ProcessVerdict.needed_files``) the
    new VM lacks or has otherwise cannot be restored there, by pid."""
    wanted = {path for v in dumped for path in v.needed_files}
    if not wanted:
        return {}
    listed = agent.exec(["stat", "-L", "-c", "%n %s", *sorted(wanted)])
    found = dict(line.rsplit(" ", 1) for line in listed.text.splitlines())
    missing = {}
    for verdict in dumped:
        for path, size in verdict.needed_files.items():
            if path not in found:
                missing[verdict.pid] = (
                    f"{verdict.pid}: {path} is not on {where}: it was on the old VM's root "
                    "file system only; put it in the guest image (--package, --files) or "
                    "on /data")
            elif int(found[path]) != size:
                missing[verdict.pid] = (f"{verdict.pid}: {path} differs on {where} "
                                        f"({found[path]} bytes, {size} on the old VM)")
    return missing
