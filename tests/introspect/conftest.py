"""Attached guests for the introspection tests: one per kernel, debug info cached once."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.guest.agent import ExecResult
from transmigrate.introspect.kernel import Guest, attach
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host

GUESTS = ["old_guest", "new_guest"]


@dataclass(frozen=True)
class Attached:
    """A test VM and the introspection attached to it."""

    host: Host
    name: str
    guest: Guest

    def run(self, script: str) -> ExecResult:
        return lifecycle.exec_in(self.host, self.name, ["sh", "-c", script], timeout=60)


@pytest.fixture(scope="session")
def debug_info(prepared: Host) -> Host:
    """Both kernels' -dbg vmlinux in the cache (a download of ~300 MB each, once)."""
    for kernel in (ACTIVE_KERNEL, STANDBY_KERNEL):
        prepared.catalog.fetch(kernel, debug=True)
    return prepared


@pytest.fixture(scope="session")
def old_guest(debug_info: Host, old_vm: str) -> Iterator[Attached]:
    with attach(debug_info.machines.get(old_vm), catalog=debug_info.catalog) as guest:
        yield Attached(debug_info, old_vm, guest)


@pytest.fixture(scope="session")
def new_guest(debug_info: Host, new_vm: str) -> Iterator[Attached]:
    with attach(debug_info.machines.get(new_vm), catalog=debug_info.catalog) as guest:
        yield Attached(debug_info, new_vm, guest)
