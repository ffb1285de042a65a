"""One running QEMU guest, and the registry of all of them on this host.

A machine's state directory (``<state>/vms/<id>``) holds its description,
QEMU's pid file, the QMP and agent sockets, the serial console log and the
writable overlay of the guest image. Everything about a machine can be found
again from that directory, so another shell, or a CLI that crashed, can still
list, reach and stop it. The directory is named by a fixed id, not by the VM's
name, because a standby VM takes over its predecessor's name after an update
while its QEMU keeps the socket paths it was started with. The guest's RAM is a
shared file in /dev/shm, so that a monitor on the host can read the guest
kernel's memory.

Each VM has two NICs: the service NIC, which carries the service's identity
(MAC and address) and is on the service bridge only while the VM serves, and a
NIC on the private migration link. It also has the service's data volume,
which only one VM at a time mounts. A standby sees the volume through a qcow2
overlay of its own: until it has taken the service over, nothing it writes
reaches the volume, so a failed update can always resume the old VM on a volume
that only the old VM wrote. Once it has taken over, the overlay is merged into
the volume, live (QEMU's active block-commit).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from transmigrate.errors import (
    CommandError,
    MachineDead,
    MachineError,
    MachineExists,
    MachineNotFound,
)
from transmigrate.polling import wait_for
from transmigrate.process import run
from transmigrate.progress import Progress, silent
from transmigrate.vm.accel import Accelerator
from transmigrate.vm.blockjobs import commit_active
from transmigrate.vm.kernels import Kernel
from transmigrate.vm.network import (
    MIGRATION_BRIDGE,
    Network,
    ServiceIdentity,
    guest_mac,
    migration_address,
    service_identity,
)
from transmigrate.vm.qemu_command import qemu_command
from transmigrate.vm.qmp import qmp_execute
from transmigrate.vm.record import MachineRecord

__all__ = ["Machine", "MachineRecord", "MachineRegistry"]

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_MAX_SLOTS = 200
_KILLED_EXIT_SECONDS = 10.0
"""How long a SIGKILLed QEMU may take to be gone (it unmaps the guest's RAM)."""


class Machine:
    """A VM known to the registry; it may be running or dead."""

    def __init__(self, directory: Path, record: MachineRecord) -> None:
        self.directory = directory
        self.record = record

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def qmp_socket(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.directory / "agent.sock"

    @property
    def agent_lock(self) -> Path:
        """Held while talking to the agent: its socket takes one client at a time."""
        return self.directory / "agent.lock"

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    @property
    def ram_path(self) -> Path:
        return Path(self.record.ram_path)

    @property
    def overlay(self) -> Path:
        return self.directory / "overlay.qcow2"

    @property
    def data_overlay(self) -> Path:
        """Where a standby's writes to the data volume go (see MachineRecord.data_overlay)."""
        return self.directory / "data.qcow2"

    @property
    def pid_file(self) -> Path:
        return self.directory / "qemu.pid"

    @property
    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        """Whether our QEMU still runs (checked by its pid and its own QMP path)."""
        pid = self.pid
        if pid is None:
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.qmp_socket).encode() in cmdline

    def require_alive(self) -> None:
        if not self.alive():
            raise MachineDead(
                f"vm {self.name!r} is not running: its QEMU is gone "
                f"(console: {self.console_tail() or 'empty'}); run 'transmigrate down {self.name}'")

    def console_tail(self) -> str:
        """The console's last line, or the line that names why the kernel panicked:
        a panic's last line is only its kernel offset."""
        try:
            lines = self.console_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        panics = [line for line in lines if "Kernel panic - not syncing" in line]
        return (panics or lines or [""])[-1].strip()

    def qmp(self, command: str, arguments: dict[str, object] | None = None,
            timeout: float = 10.0) -> object:
        self.require_alive()
        return qmp_execute(self.qmp_socket, command, arguments, timeout=timeout)

    def status(self) -> str:
        """QEMU's run state ('running', 'paused', 'guest-panicked', …) or 'dead'."""
        if not self.alive():
            return "dead"
        try:
            answer = self.qmp("query-status", timeout=3.0)
        except MachineError:
            return "unresponsive"
        return str(answer["status"]) if isinstance(answer, dict) else "unknown"

    def memory_footprint(self) -> dict[str, int]:
        """Host memory this VM uses: QEMU's resident set and the guest RAM actually backed."""
        footprint = {"rss_kib": 0, "pss_kib": 0, "ram_file_kib": 0}
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in ("Rss", "Pss"):
                        footprint[f"{key.lower()}_kib"] = int(value.split()[0])
        with contextlib.suppress(OSError):
            footprint["ram_file_kib"] = self.ram_path.stat().st_blocks // 2
        return footprint

    def merge_data(self, timeout: float = 600.0) -> None:
        """Merge the data overlay into the volume while the guest runs, then drop it."""
        commit_active(self.qmp, "data", self.record.data_volume, timeout=timeout,
                      owner=f"vm {self.name!r}")
        self.data_overlay.unlink(missing_ok=True)

    def _wait_gone(self, timeout: float) -> None:
        wait_for(lambda: not self.alive(), timeout=timeout,
                 what=f"vm {self.name!r}: its QEMU did not exit", error=MachineError)

    def stop(self, timeout: float = 10.0, *, keep_import: bool = False) -> None:
        """Stop QEMU (QMP quit, then SIGKILL by pid) and remove everything of this VM;
        its import disk too, unless ``keep_import`` (a boot to be tried again with it)."""
        pid = self.pid
        if self.alive():
            with contextlib.suppress(MachineError):
                qmp_execute(self.qmp_socket, "quit", timeout=3.0)
            try:
                self._wait_gone(timeout)
            except MachineError:
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self._wait_gone(_KILLED_EXIT_SECONDS)
        self.ram_path.unlink(missing_ok=True)
        if self.record.import_disk and not keep_import:  # a warm standby's, never filled
            Path(self.record.import_disk).unlink(missing_ok=True)
        shutil.rmtree(self.directory, ignore_errors=True)


class MachineRegistry:
    """All machines under ``<state>/vms``; creation and removal hold a lock."""

    def __init__(self, state: Path, network: Network, shm: Path) -> None:
        self.root = state / "vms"
        self.state = state
        self.network = network
        self.shm = shm

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.state.mkdir(parents=True, exist_ok=True)
        with open(self.state / "lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def all(self) -> list[Machine]:
        if not self.root.exists():
            return []
        machines = []
        for directory in sorted(self.root.iterdir()):
            with contextlib.suppress(OSError, ValueError, TypeError):
                record = MachineRecord(**json.loads((directory / "machine.json").read_text()))
                machines.append(Machine(directory, record))
        return machines

    def get(self, name: str) -> Machine:
        for machine in self.all():
            if machine.name == name:
                return machine
        raise MachineNotFound(f"no VM named {name!r}")

    def take_over(self, machine: Machine, name: str) -> Machine:
        """The standby ``machine`` serves now: it takes its predecessor's name, and its
        data overlay holds the service's newest data (see :meth:`merge_data`)."""
        return self.rename(machine, name,
                           data_overlay="current" if machine.record.data_overlay else "")

    def rename(self, machine: Machine, name: str, **changes: object) -> Machine:
        with self.locked():
            if any(m.name == name and m.record.id != machine.record.id for m in self.all()):
                raise MachineExists(f"a VM named {name!r} already exists")
            return self._update(machine, name=name, **changes)

    def merge_data(self, machine: Machine, progress: Progress = silent) -> Machine:
        """Merge ``machine``'s current data overlay, if it has one, into the volume (live)."""
        if machine.record.data_overlay != "current":
            return machine
        progress(f"merging the data {machine.name} wrote into its volume")
        machine.merge_data()
        with self.locked():
            return self._update(machine, data_overlay="")

    @staticmethod
    def _update(machine: Machine, **changes: object) -> Machine:
        record = MachineRecord(**{**asdict(machine.record), **changes})
        _write_record(machine.directory, record)
        return Machine(machine.directory, record)

    def create(self, name: str, kernel: Kernel, image: Path, accel: Accelerator, *,
               memory_mib: int, cpus: int, data_volume: Path,
               pid_base: int, identity: ServiceIdentity | None = None,
               standby: bool = False, import_disk: Path | None = None) -> Machine:
        """Start QEMU for a new VM; on any failure leave nothing behind.

        A standby VM takes an existing service ``identity`` but stays off the
        service bridge and leaves the data volume unmounted until handover.
        Processes started after boot get pids above ``pid_base``.
        """
        if not _NAME.match(name):
            raise MachineError(
                f"invalid VM name {name!r}: use lower-case letters, digits and '-', "
                "starting with a letter, at most 31 characters")
        with self.locked():
            machines = self.all()
            if any(m.name == name for m in machines):
                raise MachineExists(f"a VM named {name!r} already exists")
            used = {m.record.slot for m in machines}
            taken = {m.record.service_mac for m in machines}
            slot = next(s for s in range(_MAX_SLOTS)
                        if s not in used and service_identity(s).mac not in taken)
            identity = identity or service_identity(slot)
            self.network.ensure()
            vm_id = f"{name}-{secrets.token_hex(3)}"
            directory = self.root / vm_id
            directory.mkdir(parents=True)
            record = MachineRecord(
                id=vm_id, name=name, slot=slot, kernel=kernel.release,
                kernel_dir=str(kernel.directory), image=str(image), memory_mib=memory_mib,
                cpus=cpus, accel=str(accel), service_mac=identity.mac,
                service_address=identity.address, service_tap=f"tm-{slot}-s",
                migration_mac=guest_mac(slot, 1), migration_address=migration_address(slot),
                migration_tap=f"tm-{slot}-m", data_volume=str(data_volume),
                ram_path=str(self.shm / f"{self.network.name}-{vm_id}.ram"),
                started_at=time.time(), data_overlay="standby" if standby else "",
                import_disk=str(import_disk or ""))
            _write_record(directory, record)
            machine = Machine(directory, record)
            try:
                self._launch(machine, kernel, accel, standby=standby, pid_base=pid_base)
            except BaseException:
                machine.stop(timeout=3.0)
                self._forget_links(machine)
                raise
            return machine

    def _forget_links(self, machine: Machine, keep_network: bool = False) -> None:
        """Remove the network if no VM is left, else this VM's TAPs if they linger."""
        if not self.all() and not keep_network:
            self.network.remove()
        else:
            self.network.delete_link(machine.record.service_tap)
            self.network.delete_link(machine.record.migration_tap)

    def remove(self, machine: Machine, *, keep_network: bool = False,
               keep_import: bool = False) -> None:
        """Stop a machine and its TAPs; the last one out removes the network too,
        unless ``keep_network`` (a VM about to be replaced, with clients waiting).
        ``keep_import``: see :meth:`Machine.stop`."""
        with self.locked():
            machine.stop(keep_import=keep_import)
            self._forget_links(machine, keep_network)

    def _launch(self, machine: Machine, kernel: Kernel, accel: Accelerator, *,
                standby: bool, pid_base: int) -> None:
        record = machine.record
        machine.ram_path.unlink(missing_ok=True)
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", record.image,
             machine.overlay])
        if record.data_overlay:
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                 record.data_volume, machine.data_overlay])
        argv = [*self.network.prefix(),
                *qemu_command(record, machine, kernel, accel, pid_base=pid_base)]
        try:
            run(argv, timeout=60)
        except CommandError as exc:  # it runs under "ip netns exec": name QEMU, not ip
            said = exc.output.strip().splitlines()
            raise MachineError(f"QEMU did not start for {record.name!r} (exit {exc.returncode}): "
                               f"{said[-1] if said else 'no output'}") from exc
        self.network.attach(record.migration_tap, MIGRATION_BRIDGE)
        if not standby:
            self.network.attach(record.service_tap)


def _write_record(directory: Path, record: MachineRecord) -> None:
    tmp = directory / "machine.json.tmp"
    tmp.write_text(json.dumps(asdict(record), indent=1))
    tmp.replace(directory / "machine.json")
