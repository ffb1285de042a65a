"""QEMU's command line, checked without booting: what each VM is made of."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

from transmigrate.vm.accel import KVM, TCG
from transmigrate.vm.kernels import Kernel
from transmigrate.vm.qemu_command import qemu_command
from transmigrate.vm.record import MachineRecord

RECORD = MachineRecord(
    id="web-abc123", name="web", slot=3, kernel="6.1.0-57-cloud-amd64",
    kernel_dir="/cache/kernels/6.1.0-57-cloud-amd64", image="/cache/images/x/rootfs.img",
    memory_mib=512, cpus=2, accel="tcg", service_mac="52:54:00:00:00:03",
    service_address="198.18.0.13/15", service_tap="tm-3-s", migration_mac="52:54:00:01:00:03",
    migration_address="198.19.0.13/16", migration_tap="tm-3-m",
    data_volume="/var/lib/transmigrate/volumes/web.img",
    ram_path="/dev/shm/transmigrate-web-abc123.ram", started_at=0.0)
KERNEL = Kernel(RECORD.kernel, Path(RECORD.kernel_dir))


@dataclass(frozen=True)
class _Paths:
    overlay: Path = Path("/run/vms/web/overlay.qcow2")
    data_overlay: Path = Path("/run/vms/web/data.qcow2")
    agent_socket: Path = Path("/run/vms/web/agent.sock")
    qmp_socket: Path = Path("/run/vms/web/qmp.sock")
    console_log: Path = Path("/run/vms/web/console.log")
    pid_file: Path = Path("/run/vms/web/qemu.pid")


def _values(argv: list[str], option: str) -> list[str]:
    """Every value given to ``option``."""
    return [value for name, value in itertools.pairwise(argv) if name == option]


def _data_drive(argv: list[str]) -> str:
    return next(d for d in _values(argv, "-drive") if "id=data," in d)


def test_guest_ram_is_a_shared_file_for_the_monitor() -> None:
    argv = qemu_command(RECORD, _Paths(), KERNEL, TCG, pid_base=10_000)
    assert "memory-backend=ram0" in _values(argv, "-machine")[0]
    assert _values(argv, "-object") == [
        "memory-backend-file,id=ram0,size=512M,"
        "mem-path=/dev/shm/transmigrate-web-abc123.ram,share=on"]


def test_panics_pause_and_leave_the_kernel_findable() -> None:
    argv = qemu_command(RECORD, _Paths(), KERNEL, TCG, pid_base=10_000)
    devices = _values(argv, "-device")
    assert "pvpanic" in devices and "vmcoreinfo" in devices
    assert _values(argv, "-action") == ["panic=pause"]
    assert "-no-reboot" in argv
    assert "no_timer_check" in _values(argv, "-append")[0].split(), "no boot panic under load"


def test_active_vm_writes_its_volume() -> None:
    argv = qemu_command(RECORD, _Paths(), KERNEL, TCG, pid_base=10_000)
    assert _data_drive(argv).startswith(f"if=none,id=data,file={RECORD.data_volume},format=raw")
    assert "tm.data=mount" in _values(argv, "-append")[0]


def test_standby_writes_an_overlay_of_the_volume() -> None:
    standby = dataclasses.replace(RECORD, data_overlay="standby")
    argv = qemu_command(standby, _Paths(), KERNEL, TCG, pid_base=110_000)
    drive = _data_drive(argv)
    assert f"file={_Paths.data_overlay},format=qcow2" in drive
    assert RECORD.data_volume not in drive, "the volume is only the overlay's backing file"
    cmdline = _values(argv, "-append")[0]
    assert "tm.data=standby" in cmdline and "tm.pidbase=110000" in cmdline


def test_an_import_disk_is_attached_read_only_by_its_serial() -> None:
    assert not [d for d in _values(qemu_command(RECORD, _Paths(), KERNEL, TCG, pid_base=1),
                                   "-drive") if "id=import" in d]
    recovering = dataclasses.replace(RECORD, import_disk="/var/lib/x/images.img")
    argv = qemu_command(recovering, _Paths(), KERNEL, TCG, pid_base=1)
    assert "if=none,id=import,file=/var/lib/x/images.img,format=raw,readonly=on" in \
        _values(argv, "-drive")
    assert "virtio-blk-pci,drive=import,serial=tm-import" in _values(argv, "-device")


def test_accelerator_options_follow_the_choice() -> None:
    kvm = qemu_command(RECORD, _Paths(), KERNEL, KVM, pid_base=10_000)
    tcg = qemu_command(RECORD, _Paths(), KERNEL, TCG, pid_base=10_000)
    assert (_values(kvm, "-accel"), _values(kvm, "-cpu")) == (["kvm"], ["host"])
    assert _values(tcg, "-accel") == ["tcg,thread=multi"]


def test_vm_is_found_again_by_its_files() -> None:
    argv = qemu_command(RECORD, _Paths(), KERNEL, TCG, pid_base=10_000)
    assert _values(argv, "-pidfile") == [str(_Paths.pid_file)]
    assert _values(argv, "-qmp") == [f"unix:{_Paths.qmp_socket},server=on,wait=off"]
    assert f"file,id=console,path={_Paths.console_log}" in _values(argv, "-chardev")
    assert "-daemonize" in argv
