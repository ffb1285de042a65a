"""Bringing VMs up and down: kernel, image, network, QEMU and agent in the right order."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transmigrate.errors import MachineDead, MachineExists, TransmigrateError
from transmigrate.guest.agent import ExecResult
from transmigrate.orchestrate.host import Host
from transmigrate.progress import Progress, silent
from transmigrate.vm.image import ImageSpec
from transmigrate.vm.machine import Machine
from transmigrate.vm.volume import create_volume

__all__ = ["BootReport", "clean", "down", "exec_in", "running", "standby_pid_base", "up"]

BOOT_TIMEOUT = 180.0
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
       memory_mib: int = 1024, cpus: int = 1, standby_for: Machine | None = None,
       pid_base: int | None = None, progress: Progress = silent) -> BootReport:
    """Boot a VM on ``kernel_spec``; return once its guest agent answers.

    With ``standby_for``, the VM takes that VM's service identity and data
    volume but stays off the service network and leaves the volume unmounted;
    its pids start at ``pid_base`` (by default :func:`standby_pid_base`).
    """
    if any(m.name == name for m in host.machines.all()):
        raise MachineExists(f"a VM named {name!r} already exists")
    kernel = host.catalog.fetch(kernel_spec, progress=progress)
    if standby_for is None:
        image = host.image(image_spec or ImageSpec()).ensure(progress).path
        volume = host.volume(name)
        if not volume.exists():
            progress(f"creating data volume {volume}")
            create_volume(volume)
        pid_base = FIRST_PID
    else:
        image = Path(standby_for.record.image)  # the same files on both sides
        volume = Path(standby_for.record.data_volume)
        pid_base = pid_base or standby_pid_base(host, standby_for)
    accel = host.accelerator()
    progress(f"starting {name} on {kernel.release} ({accel.upper()})")
    start = time.monotonic()
    machine = host.machines.create(
        name, kernel, image, accel, memory_mib=memory_mib, cpus=cpus, data_volume=volume,
        identity=standby_for.record.identity if standby_for else None,
        standby=standby_for is not None, pid_base=pid_base)
    try:
        progress(f"waiting for {name}'s guest agent")
        host.agent(machine).wait_ready(BOOT_TIMEOUT, machine.alive)
    except BaseException as exc:
        tail = machine.console_tail()
        host.machines.remove(machine)
        if isinstance(exc, TransmigrateError):
            raise type(exc)(f"{exc} (console: {tail or 'empty'})") from exc
        raise
    return BootReport(machine, time.monotonic() - start)


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
    machine = running(host, name)
    return host.agent(machine).exec(argv, timeout=timeout, input=input)


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
