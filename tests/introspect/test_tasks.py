"""The task list read from guest memory equals the guest's own ``ps``; garbage fails fast."""

from __future__ import annotations

import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import drgn
import pytest

from transmigrate.errors import IntrospectionError
from transmigrate.introspect.kernel import Guest, attach
from transmigrate.introspect.tasks import TaskReader, TaskSample, wait_site

from .conftest import GUESTS, Attached

_AGENT_CHILDREN = {"ps", "sh"}
"""What the agent starts to run ``ps``: in ``ps``'s output, gone from memory after."""


def _names(sample: TaskSample) -> dict[int, str]:
    return {task.pid: task.comm for task in sample.tasks}


def _listed(vm: Attached, columns: str) -> dict[int, str]:
    out = vm.run(f"ps -e {columns}").text
    return {int(pid): name.strip()
            for pid, name in (line.split(None, 1) for line in out.splitlines())}


@pytest.mark.parametrize("fixture", GUESTS)
@pytest.mark.parametrize(("threads", "columns"), [(False, "-o pid=,comm="),
                                                  (True, "-L -o lwp=,comm=")])
def test_task_list_equals_ps(fixture: str, threads: bool, columns: str,
                             request: pytest.FixtureRequest) -> None:
    """Same pids; ps shows a kernel thread's full name, whose first 15 bytes are its comm."""
    vm: Attached = request.getfixturevalue(fixture)
    reader = TaskReader(vm.guest)
    before = _names(reader.sample(threads=threads))
    listed = _listed(vm, columns)
    after = _names(reader.sample(threads=threads))
    missing = {pid: name for pid, name in listed.items()
               if pid not in before and pid not in after and name not in _AGENT_CHILDREN}
    assert not missing, f"in ps, not in guest memory: {missing}"
    extra = {pid: before[pid] for pid in before.keys() & after.keys() - listed.keys()}
    assert not extra, f"in guest memory, not in ps: {extra}"
    renamed = {pid: (before[pid], listed[pid]) for pid in before.keys() & listed.keys()
               if not listed[pid].startswith(before[pid])}
    assert not renamed, f"names differ: {renamed}"


@pytest.mark.parametrize("fixture", GUESTS)
def test_states_parents_and_kernel_threads(fixture: str,
                                           request: pytest.FixtureRequest) -> None:
    vm: Attached = request.getfixturevalue(fixture)
    tasks = {task.pid: task for task in TaskReader(vm.guest).sample().tasks}
    assert tasks[1].ppid == 0 and not tasks[1].kernel_thread
    assert tasks[2].comm == "kthreadd" and tasks[2].kernel_thread
    assert all(task.state in "RSDTtXZPI" for task in tasks.values())
    assert all(task.ppid in tasks or task.ppid == 0 for task in tasks.values())


@pytest.mark.parametrize("fixture", GUESTS)
def test_a_sleeping_task_waits_in_nanosleep(fixture: str,
                                            request: pytest.FixtureRequest) -> None:
    vm: Attached = request.getfixturevalue(fixture)
    pid = int(vm.run("sleep 300 </dev/null >/dev/null 2>&1 & echo $!").text)
    reader = TaskReader(vm.guest)
    try:
        deadline = time.monotonic() + 5
        task = next(t for t in reader.sample().tasks if t.pid == pid)
        while task.state != "S" and time.monotonic() < deadline:
            time.sleep(0.01)
            task = next(t for t in reader.sample().tasks if t.pid == pid)
        site = wait_site(vm.guest, task)
        assert site is not None and "nanosleep" in site.function, site
        assert site.stack.index(site.function) > site.stack.index("schedule")
    finally:
        vm.run(f"kill {pid}")


@pytest.mark.parametrize("fixture", GUESTS)
def test_one_reader_follows_a_task_through_its_states(
        fixture: str, request: pytest.FixtureRequest) -> None:
    """Samples reuse unchanged tasks: a change of state must still show at once."""
    vm: Attached = request.getfixturevalue(fixture)
    pid = int(vm.run("sleep 300 </dev/null >/dev/null 2>&1 & echo $!").text)
    reader = TaskReader(vm.guest)

    def state() -> str:
        return next(t.state for t in reader.sample().tasks if t.pid == pid)

    try:
        assert state() in "RS"
        vm.run(f"kill -STOP {pid}")
        assert state() == "T"
        vm.run(f"kill -CONT {pid}; sleep 0.2")
        assert state() == "S"
    finally:
        vm.run(f"kill {pid}; sleep 0.2")
    assert pid not in {t.pid for t in reader.sample().tasks}


@pytest.fixture()
def snapshot(old_guest: Attached, tmp_path: Path) -> Iterator[tuple[Path, Guest]]:
    """A copy of the 6.1 guest's RAM, taken paused, attached like a live guest."""
    machine = old_guest.host.machines.get(old_guest.name)
    copy = tmp_path / "ram"
    machine.qmp("stop")
    try:
        shutil.copyfile(machine.ram_path, copy)
    finally:
        machine.qmp("cont")
    with attach(copy, old_guest.guest.vmlinux) as guest:
        yield copy, guest


def _poke(path: Path, guest: Guest, address: int, value: int) -> None:
    with open(path, "r+b") as ram:
        ram.seek(guest.offset(address, 8))
        ram.write(struct.pack("<Q", value))


def _second_task_link(guest: Guest) -> int:
    head = guest.address_of("init_task") + drgn.offsetof(
        guest.prog.type("struct task_struct"), "tasks")
    link: int = guest.prog.read_u64(head)
    return link


@pytest.mark.parametrize("corruption", ["garbage", "loop", "zeroed"])
def test_corrupted_task_list_fails_fast(snapshot: tuple[Path, Guest], corruption: str) -> None:
    path, guest = snapshot
    reader = TaskReader(guest)
    assert any(task.comm == "kthreadd" for task in reader.sample().tasks)
    link = _second_task_link(guest)
    target = {"garbage": 0x4141_4141_4141_4141, "loop": link,
              "zeroed": guest.page_offset + 0x1000}[corruption]
    _poke(path, guest, link, target)
    start = time.monotonic()
    with pytest.raises(IntrospectionError, match="task list unreadable"):
        reader.sample()
    assert time.monotonic() - start < 1.0
