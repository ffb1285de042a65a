"""Bringing VMs up and down: kernel, image, network, QEMU and agent in the right order."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from transmigrate.errors import MachineDead, MachineExists, TransmigrateError
from transmigrate.guest.agent import ExecResult
from transmigrate.orchestrate.host import Host
from transmigrate.progress import Progress, silent
from transmigrate.vm.image import ImageSpec
from transmigrate.vm.machine import Machine

__all__ = ["BootReport", "clean", "down", "exec_in", "running", "up"]

BOOT_TIMEOUT = 180.0


@dataclass(frozen=True)
class BootReport:
    machine: Machine
    boot_seconds: float
    """From QEMU's start to the guest agent's first answer."""


def up(host: Host, name: str, kernel_spec: str, *, image_spec: ImageSpec | None = None,
       memory_mib: int = 1024, cpus: int = 1, progress: Progress = silent) -> BootReport:
    """Boot a VM on ``kernel_spec``; return once its guest agent answers."""
    if any(m.name == name for m in host.machines.all()):
        raise MachineExists(f"a VM named {name!r} already exists")
    kernel = host.catalog.fetch(kernel_spec, progress=progress)
    image = host.image(image_spec or ImageSpec()).ensure(progress)
    accel = host.accelerator()
    progress(f"starting {name} on {kernel.release} ({accel.upper()})")
    start = time.monotonic()
    machine = host.machines.create(name, kernel, image.path, accel,
                                   memory_mib=memory_mib, cpus=cpus)
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
    """The machine ``name``, which must be running; a dead one is cleaned away."""
    machine = host.machines.get(name)
    if not machine.alive():
        tail = machine.console_tail()
        host.machines.remove(machine)
        raise MachineDead(f"vm {name!r} died: its QEMU is gone (console: {tail or 'empty'}); "
                          "its state was removed")
    return machine


def exec_in(host: Host, name: str, argv: Sequence[str], *, timeout: float = 600.0,
            input: bytes | None = None) -> ExecResult:
    machine = running(host, name)
    return host.agent(machine).exec(argv, timeout=timeout, input=input)


def down(host: Host, name: str) -> None:
    host.machines.remove(host.machines.get(name))


def clean(host: Host) -> list[str]:
    """Stop every VM and remove the network; return the names stopped."""
    names = []
    for machine in host.machines.all():
        host.machines.remove(machine)
        names.append(machine.name)
    with host.machines.locked():
        host.network.remove()
    return names
