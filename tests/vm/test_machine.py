"""VM lifecycle on real kernels: boot, reach, list, and stop without leftovers."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest

from transmigrate.config import ACTIVE_KERNEL
from transmigrate.errors import MachineDead, MachineExists, MachineNotFound
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.polling import wait_for
from transmigrate.vm.machine import Machine

from ..conftest import qemu_pids
from .test_qemu_command import RECORD


def test_boots_on_6_1(prepared: Host, old_vm: str) -> None:
    release = lifecycle.exec_in(prepared, old_vm, ["uname", "-r"]).text.strip()
    assert release == prepared.machines.get(old_vm).record.kernel
    assert release.startswith("6.1.0-")


def test_boots_on_6_12(prepared: Host, new_vm: str) -> None:
    release = lifecycle.exec_in(prepared, new_vm, ["uname", "-r"]).text.strip()
    assert release == prepared.machines.get(new_vm).record.kernel
    assert release.startswith("6.12.")


def test_machine_has_its_devices(prepared: Host, old_vm: str) -> None:
    machine = prepared.machines.get(old_vm)
    assert machine.status() == "running"
    assert machine.ram_path.stat().st_size == 512 * 1024 * 1024
    children = machine.qmp("qom-list", {"path": "/machine/peripheral-anon"})
    assert isinstance(children, list)
    types = {child["type"] for child in children}
    assert {"child<vmcoreinfo>", "child<pvpanic>"} <= types, types
    assert machine.console_log.stat().st_size > 0
    assert machine.record.service_tap in prepared.network.links()
    assert prepared.network.bridge_of(machine.record.migration_tap) == "tm-mig0"


def test_duplicate_name_is_refused(prepared: Host, old_vm: str) -> None:
    with pytest.raises(MachineExists, match="already exists"):
        lifecycle.up(prepared, old_vm, ACTIVE_KERNEL)


def test_killed_qemu_is_reported_and_cleaned(prepared: Host) -> None:
    report = lifecycle.up(prepared, "t-victim", ACTIVE_KERNEL, memory_mib=256)
    machine = report.machine
    pid = machine.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not machine.alive(), timeout=10, what="the killed QEMU did not go away")
    with pytest.raises(MachineDead, match="data volume kept"):
        lifecycle.exec_in(prepared, "t-victim", ["true"])
    assert prepared.volume("t-victim").exists(), "the service's data survives its VM"
    assert not machine.directory.exists()
    assert not machine.ram_path.exists()
    assert machine.record.service_tap not in prepared.network.links()
    assert pid not in qemu_pids()
    prepared.volume("t-victim").unlink()


def test_clean_removes_volumes_kept_from_dead_vms(host: Host, tmp_path: Path) -> None:
    other = dataclasses.replace(host, state=tmp_path / "state", data=tmp_path / "data",
                                network_name="tm-t-clean")
    kept = other.volume("gone")
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"data of a VM that died")
    assert lifecycle.clean(other) == []
    assert not kept.exists()


def test_down_removes_everything_and_twice_is_an_error(prepared: Host) -> None:
    machine = lifecycle.up(prepared, "t-short", ACTIVE_KERNEL, memory_mib=256).machine
    pid, ram, tap = machine.pid, machine.ram_path, machine.record.service_tap
    lifecycle.down(prepared, "t-short")
    assert pid not in qemu_pids()
    assert not Path(ram).exists() and not machine.directory.exists()
    assert tap not in prepared.network.links()
    with pytest.raises(MachineNotFound):
        lifecycle.down(prepared, "t-short")


def test_a_failed_boot_keeps_its_callers_import_disk(tmp_path: Path) -> None:
    """A boot tried again (after a panic, or under TCG after a silent KVM) attaches the
    same import disk: removing the failed machine leaves it; removing a machine for
    good takes it with it."""
    for keep, kept in ((True, True), (False, False)):
        disk = tmp_path / "standby.import"
        disk.write_bytes(b"images")
        directory = tmp_path / "vm"
        directory.mkdir()
        record = dataclasses.replace(RECORD, import_disk=str(disk),
                                     ram_path=str(tmp_path / "ram"))
        Machine(directory, record).stop(keep_import=keep)
        assert disk.exists() == kept and not directory.exists()
