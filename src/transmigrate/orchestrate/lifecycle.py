"""Bringing VMs up and down: kernel, image, network, QEMU and agent in the right order."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from transmigrate.errors import (
    AgentError,
    BootPanic,
    MachineDead,
    MachineError,
    MachineExists,
    TransmigrateError,
)
from transmigrate.guest.agent import ExecResult
from transmigrate.orchestrate.host import Host
from transmigrate.polling import Deadline
from transmigrate.progress import Progress, silent
from transmigrate.vm.accel import KVM, TCG, Accelerator, forced_accelerator
from transmigrate.vm.image import ImageSpec
from transmigrate.vm.machine import Machine
from transmigrate.vm.volume import create_volume

__all__ = ["BootReport", "clean", "down", "exec_in", "failed_console", "running",
           "standby_pid_base", "up"]

BOOT_TIMEOUT = 180.0
KVM_SILENCE_SECONDS = 20.0
"""The guest's first console line (its init's "ready"; the kernel is quiet at loglevel 4)
comes ~4-5 s after QEMU starts under TCG on 2 cores, sooner under KVM: a KVM guest still
silent after this never ran, whatever the accelerator probe saw."""
_CONSOLE_POLL = 0.25
FIRST_PID = 10_000
"""Processes started after boot get pids above this; boot-time ones stay below."""
STANDBY_PID_MARGIN = 100_000
"""A standby's own processes start this far above its predecessor's last pid."""


@dataclass(frozen=True)
class BootReport:
    machine: Machine
    boot_seconds: float
    """From QEMU's start to the guest agent's first answer."""


def standby_pid_base(host: Host, machine: Machine) -> int:
    """Where a standby for ``machine`` starts its own pids: far above ``machine``'s."""
    last = host.agent(machine).run(["cat", "/proc/sys/kernel/ns_last_pid"]).text
    return int(last) + STANDBY_PID_MARGIN


def up(host: Host, name: str, kernel_spec: str, *, image_spec: ImageSpec | None = None,
       memory_mib: int = 1024, cpus: int = 1, data_mib: int = 4096,
       standby_for: Machine | None = None,
       pid_base: int | None = None, accel: Accelerator | None = None,
       import_disk: Path | None = None, progress: Progress = silent) -> BootReport:
    """Boot a VM on ``kernel_spec``; return once its guest agent answers.

    A new data volume is ``data_mib`` MiB (sparse). With ``standby_for``, the VM takes
    that VM's service identity and data
    volume but stays off the service network and leaves the volume unmounted;
    its pids start at ``pid_base`` (by default :func:`standby_pid_base`).
    ``import_disk`` (a raw disk image) is attached read-only, serial ``tm-import``.
    ``accel`` defaults to the host's (:meth:`Host.accelerator`). A kernel that panics
    while booting has nothing on it yet, so it is booted once more (6.12 guests panicked
    in interrupt context ~2 s into boot twice in several hundred boots on a busy TCG host; the
    console of a failed boot is kept, see :func:`failed_console`). A KVM guest
    that prints nothing is stopped and booted again under TCG, which is then
    the host's answer until it reboots (unless ``TRANSMIGRATE_ACCEL`` forces KVM).
    """
    if any(m.name == name for m in host.machines.all()):
        raise MachineExists(f"a VM named {name!r} already exists")
    kernel = host.catalog.fetch(kernel_spec, progress=progress)
    if standby_for is None:
        image = host.image(image_spec or ImageSpec()).ensure(progress).path
        volume = host.volume(name)
        if not volume.exists():
            progress(f"creating data volume {volume}")
            create_volume(volume, data_mib)
        pid_base = FIRST_PID
    else:
        image = Path(standby_for.record.image)  # the same files on both sides
        volume = Path(standby_for.record.data_volume)
        pid_base = pid_base or standby_pid_base(host, standby_for)

    def launch(under: Accelerator) -> Machine:
        progress(f"starting {name} on {kernel.release} ({under.upper()})")
        return host.machines.create(
            name, kernel, image, under, memory_mib=memory_mib, cpus=cpus, data_volume=volume,
            identity=standby_for.record.identity if standby_for else None,
            standby=standby_for is not None, pid_base=pid_base, import_disk=import_disk)

    def boot(under: Accelerator) -> BootReport:
        start = time.monotonic()
        machine = launch(under)
        if under == KVM and not _ran_under_kvm(host, machine):
            progress(f"{name} printed nothing under KVM: KVM runs no guest code here; booting "
                     "again under TCG, this host's choice until it reboots")
            host.record_accelerator(TCG, f"a KVM guest ({name}) printed nothing")
            start = time.monotonic()
            machine = launch(TCG)
        with _removed_on_failure(host, machine):
            progress(f"waiting for {name}'s guest agent")
            host.agent(machine).wait_ready(BOOT_TIMEOUT, machine.alive)
        return BootReport(machine, time.monotonic() - start)

    try:
        return boot(accel or host.accelerator())
    except BootPanic as exc:
        progress(f"{exc}; booting {name} once more")
        return boot(accel or host.accelerator())


def _console_speaks(machine: Machine) -> bool:
    """Whether the guest prints on its console before KVM_SILENCE_SECONDS, and before
    its QEMU dies or stops on an internal error (KVM failing to run it)."""
    deadline = Deadline(KVM_SILENCE_SECONDS)
    while not _console_size(machine):
        if deadline.expired() or machine.status() in ("dead", "internal-error"):
            return False
        time.sleep(_CONSOLE_POLL)
    return True


def _console_size(machine: Machine) -> int:
    try:
        return machine.console_log.stat().st_size
    except OSError:
        return 0


def _ran_under_kvm(host: Host, machine: Machine) -> bool:
    """Whether ``machine``, started under KVM, runs; if not, it is removed, or, when KVM
    is forced, that is the error."""
    with _removed_on_failure(host, machine):
        if _console_speaks(machine):
            return True
        if forced_accelerator() == KVM:
            raise MachineError(f"vm {machine.name!r} printed nothing under KVM, which "
                               "TRANSMIGRATE_ACCEL forces")
    host.machines.remove(machine, keep_network=True, keep_import=True)
    return False


@contextlib.contextmanager
def _removed_on_failure(host: Host, machine: Machine) -> Iterator[None]:
    """Remove ``machine`` if its boot fails, but not its import disk, which is still its
    caller's (a boot tried again attaches it again); our errors then also say what its
    console showed, or why it may have shown nothing."""
    try:
        yield
    except BaseException as exc:
        tail = machine.console_tail()
        kept = failed_console(host, machine.name)
        kept.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copyfile(machine.console_log, kept)
        host.machines.remove(machine, keep_import=True)  # the caller's, for a retry
        if not isinstance(exc, TransmigrateError):
            raise
        note = f"{exc} ({_console_note(tail, machine.record.accel)}; whole console: {kept})"
        if "Kernel panic" in tail:
            raise BootPanic(note) from exc
        raise type(exc)(note) from exc


def failed_console(host: Host, name: str) -> Path:
    """Where the console of VM ``name``'s last failed boot is kept, for diagnosis."""
    return host.state / "failed-boots" / f"{name}.console"


def _console_note(tail: str, accel: str) -> str:
    if tail:
        return f"console: {tail}"
    if accel == KVM:
        return ("console: empty: likely the accelerator, a KVM guest that never ran; "
                "set TRANSMIGRATE_ACCEL=tcg")
    return "console: empty"


def running(host: Host, name: str) -> Machine:
    """The machine ``name``, which must be running; a dead one is cleaned away, but its
    data volume is kept: it holds the service's data (``up`` of the same name reuses it)."""
    machine = host.machines.get(name)
    if not machine.alive():
        tail = machine.console_tail()
        host.machines.remove(machine)
        raise MachineDead(f"vm {name!r} died: its QEMU is gone (console: {tail or 'empty'}); "
                          f"its state was removed, its data volume kept at "
                          f"{machine.record.data_volume}")
    return machine


def exec_in(host: Host, name: str, argv: Sequence[str], *, timeout: float = 600.0,
            input: bytes | None = None) -> ExecResult:
    """Run ``argv`` in VM ``name``. If the VM is retired meanwhile (an update or a
    recovery put another in its place), say so: the command's fate is unknown."""
    machine = running(host, name)
    try:
        return host.agent(machine).exec(argv, timeout=timeout, input=input)
    except AgentError as exc:
        with host.machines.locked():  # a removal in progress holds it until its record is gone
            now = [m for m in host.machines.all() if m.name == name]
        if now and now[0].record.id == machine.record.id:
            raise
        raise AgentError(f"{name} was {'replaced by a new VM' if now else 'removed'} while "
                         f"the command ran (an update or a recovery?), so whether it finished "
                         f"is unknown; the agent said: {exc}") from exc


def down(host: Host, name: str) -> None:
    """Stop VM ``name`` and delete its service's data volume."""
    machine = host.machines.get(name)
    host.machines.remove(machine)
    _drop_unused_volume(host, Path(machine.record.data_volume))


def _drop_unused_volume(host: Host, volume: Path) -> None:
    if not any(m.record.data_volume == str(volume) for m in host.machines.all()):
        volume.unlink(missing_ok=True)


def clean(host: Host) -> list[str]:
    """Stop every VM, remove the network and every data volume (also those kept from VMs
    that died); return the names stopped."""
    names = []
    for machine in host.machines.all():
        host.machines.remove(machine)
        names.append(machine.name)
    for volume in host.volume("*").parent.glob(host.volume("*").name):
        volume.unlink()
    with host.machines.locked():
        host.network.remove()
    return names
