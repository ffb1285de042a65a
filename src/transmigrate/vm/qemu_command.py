"""QEMU's command line for one VM, built from its record alone (no side effects).

Kept apart from starting QEMU so that what a VM is made of (shared RAM file,
data disk or overlay, NICs, agent channel, vmcoreinfo and pvpanic) can be
checked without booting one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from transmigrate.vm.accel import Accelerator
from transmigrate.vm.initramfs import MODULES_SERIAL, ROOT_SERIAL
from transmigrate.vm.kernels import Kernel
from transmigrate.vm.record import MachineRecord

__all__ = ["AGENT_PORT", "DATA_SERIAL", "IMPORT_SERIAL", "QEMU", "MachinePaths", "kernel_cmdline",
           "qemu_command"]

QEMU = "qemu-system-x86_64"
AGENT_PORT = "org.qemu.guest_agent.0"
DATA_SERIAL = "tm-data"
IMPORT_SERIAL = "tm-import"


class MachinePaths(Protocol):
    """Where one VM's files are (its state directory's layout; see ``Machine``)."""

    @property
    def overlay(self) -> Path: ...
    @property
    def data_overlay(self) -> Path: ...
    @property
    def agent_socket(self) -> Path: ...
    @property
    def qmp_socket(self) -> Path: ...
    @property
    def console_log(self) -> Path: ...
    @property
    def pid_file(self) -> Path: ...


def kernel_cmdline(record: MachineRecord, *, pid_base: int) -> str:
    """The guest kernel's command line: console, and what the guest's init sets up.

    ``no_timer_check``: on a busy host a TCG guest can miss the IO-APIC timer check's
    ticks and panic at boot ("IO-APIC + timer doesn't work"); libguestfs boots its
    appliance with it for that reason.
    """
    standby = record.data_overlay == "standby"
    return " ".join([
        "console=ttyS0", "loglevel=4", "panic=-1", "no_timer_check",
        f"tm.name={record.name}",
        f"tm.if={record.service_mac}@{record.service_address}",
        f"tm.if={record.migration_mac}@{record.migration_address}",
        f"tm.data={'standby' if standby else 'mount'}",
        f"tm.pidbase={pid_base}",
    ])


def _data_drive(record: MachineRecord, paths: MachinePaths) -> str:
    if not record.data_overlay:
        # The volume is written by one VM at a time, so QEMU's image locks are off.
        return f"file={record.data_volume},format=raw,file.locking=off,cache.direct=on"
    # The overlay is this QEMU's alone (and may be on tmpfs: no O_DIRECT).
    return (f"file={paths.data_overlay},format=qcow2,"
            "backing.file.locking=off,backing.file.cache.direct=on")


def qemu_command(record: MachineRecord, paths: MachinePaths, kernel: Kernel,
                 accel: Accelerator, *, pid_base: int) -> list[str]:
    """The argv that starts ``record``'s QEMU, daemonized; processes the guest starts
    after boot get pids above ``pid_base``."""
    return [
        QEMU,
        "-name", f"tm-{record.name},process=tm-{record.name}",
        "-machine", "q35,memory-backend=ram0", *accel.qemu_args(),
        "-smp", str(record.cpus), "-m", f"{record.memory_mib}M",
        "-object", (f"memory-backend-file,id=ram0,size={record.memory_mib}M,"
                    f"mem-path={record.ram_path},share=on"),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-action", "panic=pause",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(kernel.initramfs),
        "-append", kernel_cmdline(record, pid_base=pid_base),
        "-drive", f"if=none,id=root,file={paths.overlay},format=qcow2,discard=unmap",
        "-device", f"virtio-blk-pci,drive=root,serial={ROOT_SERIAL}",
        "-drive", f"if=none,id=modules,file={kernel.modules_image},format=raw,readonly=on",
        "-device", f"virtio-blk-pci,drive=modules,serial={MODULES_SERIAL}",
        "-drive", f"if=none,id=data,{_data_drive(record, paths)}",
        "-device", f"virtio-blk-pci,drive=data,serial={DATA_SERIAL}",
        *(["-drive", f"if=none,id=import,file={record.import_disk},format=raw,readonly=on",
           "-device", f"virtio-blk-pci,drive=import,serial={IMPORT_SERIAL}"]
          if record.import_disk else []),
        "-netdev", f"tap,id=svc0,ifname={record.service_tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=svc0,mac={record.service_mac}",
        "-netdev", f"tap,id=mig0,ifname={record.migration_tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=mig0,mac={record.migration_mac}",
        "-chardev", f"socket,id=agent,path={paths.agent_socket},server=on,wait=off",
        "-device", "virtio-serial-pci",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
        "-chardev", f"file,id=console,path={paths.console_log}",
        "-serial", "chardev:console",
        "-qmp", f"unix:{paths.qmp_socket},server=on,wait=off",
        "-device", "vmcoreinfo", "-device", "pvpanic",
        "-pidfile", str(paths.pid_file), "-daemonize",
    ]
