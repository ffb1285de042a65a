"""The guest's tasks: who exists, in what state, and where blocked ones wait.

A sample walks the kernel's process list (``init_task.tasks``) and each
process's thread list (``signal->thread_head``) straight off guest memory. The
guest changes these lists while we read them, so every walk is bounded (a
maximum task count, cycle detection, every link checked against its back link)
and a torn walk is retried a few times before giving up with
:class:`IntrospectionError`: garbage in the guest can fail a sample, never hang
it.

Where a blocked task waits is the first function of its kernel stack outside
the scheduler and locking text (as the kernel's own ``wchan``). Unwinding a stack
needs drgn and costs a millisecond, so it is asked for per task, on demand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import drgn

from transmigrate.errors import IntrospectionError
from transmigrate.introspect.kernel import Guest, drgn_errors

__all__ = ["Task", "TaskReader", "TaskSample", "WaitSite", "wait_site"]

PF_KTHREAD = 0x0020_0000
"""``task_struct.flags`` bit of kernel threads, part of the kernel ABI since 2.6."""
_TASK_NOLOAD = 0x400
"""TASK_IDLE is TASK_UNINTERRUPTIBLE | TASK_NOLOAD (a macro, absent from DWARF)."""
_PID_LIMIT = 4 * 1024 * 1024
_STACK_FRAMES = 64


class _Torn(Exception):
    """A walk met a link that changed under it; the sample is retried."""


@dataclass(frozen=True, slots=True)
class Task:
    """One task (process or thread) as the kernel holds it."""

    pid: int
    tgid: int
    comm: str
    state: str
    """As ``ps`` prints it: R, S, D, T, t, X, Z, P or I."""
    ppid: int
    kernel_thread: bool
    address: int
    """The ``task_struct``'s kernel address, to ask :func:`wait_site` about it."""


@dataclass(frozen=True, slots=True)
class TaskSample:
    """Every task at one instant (within the walk's few hundred microseconds)."""

    tasks: tuple[Task, ...]
    monotonic_ns: int
    """Host clock when the walk ended."""

    @property
    def processes(self) -> tuple[Task, ...]:
        return tuple(task for task in self.tasks if task.pid == task.tgid)

    def in_state(self, state: str) -> tuple[Task, ...]:
        return tuple(task for task in self.tasks if task.state == state)


@dataclass(frozen=True, slots=True)
class WaitSite:
    """Where a task that is off CPU waits: its innermost non-scheduler kernel function."""

    pid: int
    function: str
    stack: tuple[str, ...]
    """Function names, innermost first, as far as the unwinder got."""


class TaskReader:
    """Offsets resolved once; :meth:`sample` then reads the task lists off guest memory."""

    def __init__(self, guest: Guest, *, max_tasks: int = 32768, retries: int = 5) -> None:
        self.guest = guest
        self.max_tasks = max_tasks
        self.retries = retries
        self.torn_walks = 0
        """Walks restarted because the guest changed a list under them (a health figure)."""
        self._known: dict[int, tuple[tuple[Any, ...], Task]] = {}
        """The previous walk's tasks by address, with the fields they were made from:
        most tasks do not change between samples, and reusing them halves a walk."""
        state = "__state" if guest.has("struct task_struct", "__state") else "state"
        self._task = guest.record("struct task_struct", (
            "tasks.next", "tasks.prev", "pid", "tgid", "comm", state, "exit_state",
            "flags", "real_parent", "signal", "thread_node.next", "thread_node.prev"))
        self._thread = guest.record("struct task_struct", ("thread_node.next",
                                                           "thread_node.prev"))
        self._parent = guest.record("struct task_struct", ("tgid",))
        self._signal = guest.record("struct signal_struct", ("thread_head.next",))
        with drgn_errors("cannot resolve task list offsets"):
            self._tasks_offset = drgn.offsetof(guest.prog.type("struct task_struct"), "tasks")
            self._thread_offset = drgn.offsetof(guest.prog.type("struct task_struct"),
                                                "thread_node")
            self._thread_head_offset = drgn.offsetof(
                guest.prog.type("struct signal_struct"), "thread_head")
            self._head = guest.address_of("init_task") + self._tasks_offset
            self._chars, self._report = _state_chars(guest)

    def sample(self, *, threads: bool = True) -> TaskSample:
        """All processes (and with ``threads``, all their threads) except the idle tasks."""
        problem = ""
        for _ in range(self.retries):
            try:
                tasks = self._walk(threads)
            except (_Torn, IntrospectionError) as exc:
                problem = str(exc)
                self.torn_walks += 1
                continue
            return TaskSample(tasks, time.monotonic_ns())
        raise IntrospectionError(
            f"guest task list unreadable after {self.retries} tries: {problem}")

    def _walk(self, threads: bool) -> tuple[Task, ...]:
        tasks: list[Task] = []
        seen: set[int] = set()
        parents: dict[int, int] = {}
        known, self._known = self._known, {}
        previous, node = self._head, self._task.read(self._head - self._tasks_offset)[0]
        while node != self._head:
            if node in seen:
                raise _Torn(f"process list loops at {node:#x}")
            if len(tasks) >= self.max_tasks:
                raise _Torn(f"more than {self.max_tasks} tasks")
            seen.add(node)
            address = node - self._tasks_offset
            fields = self._task.read(address)
            if fields[1] != previous:
                raise _Torn(f"process list link at {node:#x} does not point back")
            leader = self._make(address, fields, parents, known)
            thread_head = fields[9] + self._thread_head_offset
            if threads and not fields[10] == fields[11] == thread_head:
                self._walk_threads(address, thread_head, leader, tasks, parents, known)
            else:
                tasks.append(leader)
            previous, node = node, fields[0]
        return tuple(tasks)

    def _walk_threads(self, leader_address: int, head: int, leader: Task, tasks: list[Task],
                      parents: dict[int, int],
                      known: dict[int, tuple[tuple[Any, ...], Task]]) -> None:
        """The threads of a multi-threaded process, from its ``signal->thread_head``."""
        previous, node = head, self._signal.read(head - self._thread_head_offset)[0]
        count = 0
        while node != head:
            count += 1
            if count > self.max_tasks or len(tasks) >= self.max_tasks:
                raise _Torn(f"thread list of {leader.pid} too long or looping")
            address = node - self._thread_offset
            next_node, back = self._thread.read(address)
            if back != previous:
                raise _Torn(f"thread list link at {node:#x} does not point back")
            tasks.append(leader if address == leader_address
                         else self._make(address, self._task.read(address), parents, known))
            previous, node = node, next_node

    def _make(self, address: int, fields: tuple[Any, ...], parents: dict[int, int],
              known: dict[int, tuple[tuple[Any, ...], Task]]) -> Task:
        """A task from its fields; ``parents`` caches parent tgids within one walk, and
        a task whose fields are as in the previous walk is reused from ``known``."""
        own = fields[2:9]
        before = known.get(address)
        if before is not None and before[0] == own:
            self._known[address] = before
            return before[1]
        task = self._new_task(address, own, parents)
        self._known[address] = (own, task)
        return task

    def _new_task(self, address: int, fields: tuple[Any, ...],
                  parents: dict[int, int]) -> Task:
        pid, tgid, comm, state, exit_state, flags, parent = fields
        if not (0 < pid < _PID_LIMIT and 0 < tgid < _PID_LIMIT):
            raise _Torn(f"task at {address:#x} has pid {pid}, tgid {tgid}")
        report = (state | exit_state) & self._report
        char = self._chars[report.bit_length()]
        if char == "D" and state & ~report == _TASK_NOLOAD:
            char = "I"
        ppid = parents.get(parent)
        if ppid is None:
            ppid = parents[parent] = self._parent.read(parent)[0]
        return Task(pid, tgid, comm.split(b"\0", 1)[0].decode(errors="replace"), char,
                    ppid, bool(flags & PF_KTHREAD), address)


def _state_chars(guest: Guest) -> tuple[str, int]:
    """The kernel's own state letters (``task_state_array``) and its TASK_REPORT mask."""
    names = guest.prog["task_state_array"]
    chars = [names[index][0].value_() for index in range(len(names))]
    last = max(index for index, char in enumerate(chars) if bytes([char]) in b"RSDTtXZP")
    return bytes(chars).decode("ascii"), (1 << last) - 1


def wait_site(guest: Guest, task: Task) -> WaitSite | None:
    """Where ``task`` waits, from its stack; None if it is running now (no stable stack)."""
    prog = guest.prog
    with drgn_errors(f"cannot unwind the stack of task {task.pid}"):
        bounds = [(prog.symbol(f"__{kind}_text_start").address,
                   prog.symbol(f"__{kind}_text_end").address) for kind in ("sched", "lock")]
        try:
            trace = prog.stack_trace(drgn.Object(prog, "struct task_struct *",
                                                 value=task.address))
        except ValueError:
            return None
        frames = []
        for frame in list(trace)[:_STACK_FRAMES]:
            name = frame.name
            if not name or name.startswith("0x"):  # no DWARF for it: a module's function
                name = guest.module_symbol(frame.pc) or f"{frame.pc:#x}"
            frames.append((frame.pc, name))
    stack = tuple(name for _, name in frames)
    for pc, name in frames:
        if not any(start <= pc < end for start, end in bounds):
            return WaitSite(task.pid, name, stack)
    if not stack:
        raise IntrospectionError(f"task {task.pid} has an empty kernel stack")
    return WaitSite(task.pid, stack[-1], stack)
