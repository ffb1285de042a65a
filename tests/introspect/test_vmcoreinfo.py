"""The host finds the guest kernel's vmcoreinfo in the guest's RAM file."""

from __future__ import annotations

from pathlib import Path

import pytest

from transmigrate.errors import IntrospectionError
from transmigrate.introspect.vmcoreinfo import find_vmcoreinfo
from transmigrate.orchestrate.host import Host


@pytest.mark.parametrize("vm", ["old_vm", "new_vm"])
def test_osrelease_matches_booted_kernel(prepared: Host, vm: str,
                                         request: pytest.FixtureRequest) -> None:
    name = request.getfixturevalue(vm)
    machine = prepared.machines.get(name)
    info = find_vmcoreinfo(machine.ram_path)
    assert info.osrelease == machine.record.kernel
    assert info.fields["PAGESIZE"] == "4096"
    assert info.kernel_offset != 0, "Debian kernels boot with KASLR"
    assert info.symbol("swapper_pg_dir") > 0


def test_memory_without_a_kernel_is_an_error(tmp_path: Path) -> None:
    blank = tmp_path / "ram"
    blank.write_bytes(b"\0" * 65536 + b"OSRELEASE=not-aligned")
    with pytest.raises(IntrospectionError, match="no vmcoreinfo"):
        find_vmcoreinfo(blank)
