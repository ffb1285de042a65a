"""Attaching to real 6.1 and 6.12 guests with the same code, and refusing what cannot work."""

from __future__ import annotations

from pathlib import Path

import drgn
import pytest

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.errors import IntrospectionError
from transmigrate.introspect.kernel import attach, debug_vmlinux
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host

from .conftest import GUESTS, Attached


@pytest.mark.parametrize("fixture", GUESTS)
def test_attach_finds_the_running_kernel(fixture: str, request: pytest.FixtureRequest) -> None:
    vm: Attached = request.getfixturevalue(fixture)
    guest = vm.guest
    assert guest.release == vm.host.machines.get(vm.name).record.kernel
    release = drgn.offsetof(guest.prog.type("struct new_utsname"), "release")
    name = drgn.offsetof(guest.prog.type("struct uts_namespace"), "name")
    raw = guest.read(guest.address_of("init_uts_ns") + name + release, 65)
    assert raw.split(b"\0")[0].decode() == guest.release
    assert len(guest.online_cpus()) == int(vm.run("nproc").text)


def test_wrong_debug_info_is_refused(debug_info: Host, old_vm: str) -> None:
    wrong = debug_info.catalog.fetch(STANDBY_KERNEL, debug=True).vmlinux_debug
    with pytest.raises(IntrospectionError, match=r"is not the debug info of guest kernel 6\.1\."):
        attach(debug_info.machines.get(old_vm), wrong)


def test_kernel_without_debug_info_is_a_clear_error(prepared: Host) -> None:
    with pytest.raises(IntrospectionError, match=r"no debug info for guest kernel 5\.99"):
        debug_vmlinux("5.99.0-1-cloud-amd64", prepared.catalog)


def test_vm_that_is_down_is_a_clear_error(debug_info: Host) -> None:
    machine = lifecycle.up(debug_info, "t-intro-down", ACTIVE_KERNEL, memory_mib=512).machine
    lifecycle.down(debug_info, "t-intro-down")
    with pytest.raises(IntrospectionError, match="'t-intro-down' is down"):
        attach(machine, catalog=debug_info.catalog)


def test_missing_ram_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IntrospectionError, match="no guest RAM file"):
        attach(tmp_path / "gone.ram", tmp_path / "vmlinux")
