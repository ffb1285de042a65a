"""Shared fixtures: an isolated host (own state dir and network namespace) and real guests.

Tests use the same download and image cache as the demo, so a second run is
fast, but their own run state, so they never touch an operator's VMs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.vm.image import ImageSpec

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / ".venv" / "bin" / "transmigrate"

os.environ.setdefault("TRANSMIGRATE_STATE", "/run/transmigrate-test")
os.environ.setdefault("TRANSMIGRATE_NETNS", "transmigrate-test")
os.environ.setdefault("TRANSMIGRATE_DATA", "/var/lib/transmigrate-test")


GUEST_FIXTURES = {"prepared", "old_vm", "new_vm", "old_guest", "new_guest"}
"""Every fixture that boots a guest depends on ``prepared`` (kernels and image ready);
the shared guests are also asked for by name (``request.getfixturevalue``)."""


REDIS_SERVICE = """
[services.kv]
vm = "{vm}"
process = "redis-server"
start = ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "",
         "--dir", "/data", "--appendonly", "yes"]
"""
"""transmigrate.toml declaring redis as a service of VM {vm}, its AOF on the data volume."""

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``vm`` every test that boots a guest, so ``-m "not vm"`` is the fast layer."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            used |= {value for value in callspec.params.values() if isinstance(value, str)}
        if GUEST_FIXTURES & used:
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def host() -> Host:
    """The tests' host; the fast layer only reads it, and never stops the VMs of a
    suite running beside it."""
    return Host.from_environment()


@pytest.fixture(scope="session")
def prepared(host: Host) -> Iterator[Host]:
    """Kernels fetched and the image built, once per session; no VM left from an
    earlier run, before or after."""
    lifecycle.clean(host)
    for kernel in (ACTIVE_KERNEL, STANDBY_KERNEL):
        host.catalog.fetch(kernel)
    host.image(ImageSpec()).ensure()
    yield host
    lifecycle.clean(host)


@pytest.fixture(scope="session")
def old_vm(prepared: Host) -> Iterator[str]:
    """A guest on the 6.1 kernel, shared by the tests that only read from it."""
    lifecycle.up(prepared, "t-old", ACTIVE_KERNEL, memory_mib=512)
    yield "t-old"
    lifecycle.down(prepared, "t-old")


@pytest.fixture(scope="session")
def new_vm(prepared: Host) -> Iterator[str]:
    """A guest on the 6.12 kernel, shared by the tests that only read from it."""
    lifecycle.up(prepared, "t-new", STANDBY_KERNEL, memory_mib=512)
    yield "t-new"
    lifecycle.down(prepared, "t-new")


def cli(*args: str, timeout: float = 300, input: str = "") -> subprocess.CompletedProcess[str]:
    """Run the real ``transmigrate`` command, as a user would, with ``input`` on stdin."""
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=timeout,
                          input=input, check=False)


def qemu_pids() -> set[int]:
    """Pids of every QEMU running for our test network namespace."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and b"/run/transmigrate-test/" in cmdline:
                pids.add(int(proc.name))
    return pids


@contextlib.contextmanager
def operated_on_elsewhere(path: Path, vm: str) -> Iterator[tuple[int, int]]:
    """An operation on ``vm`` in the history at ``path``, running in another living
    process for as long as the block runs: (that process's pid, the operation)."""
    other = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from transmigrate.orchestrate.history import History
        print(History(Path({str(path)!r})).start("update", {vm!r}, {{}}), flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert other.stdout is not None and other.stdin is not None
    try:
        yield other.pid, int(other.stdout.readline())
    finally:
        other.stdin.close()
        other.wait(timeout=30)


def left_running_by_a_dead_process(path: Path) -> int:
    """An operation started by a process that then died (it exits without finishing it)."""
    started = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        from pathlib import Path
        from transmigrate.orchestrate.history import History
        print(History(Path({str(path)!r})).start("update", "web", {{"kernel": "6.12.117"}}))
        """)], capture_output=True, text=True, check=True)
    return int(started.stdout)
