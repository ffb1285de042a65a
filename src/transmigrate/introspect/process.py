"""A process as a stopped kernel holds it: everything CRIU would ask the kernel for.

Recovery reads a process out of a guest whose kernel can no longer answer (it
panicked, hung, or was simply stopped by the host): registers from the
``pt_regs`` the entry code saved at the top of the task's kernel stack, the FPU
state from its ``fpstate``, mappings from the maple tree, pages from the page
tables, open files, credentials, signal handlers, identity. The result is plain
data, written as CRIU images by :mod:`transmigrate.recover`.

The kernel may have died mid-update, so every structure is checked before it is
trusted, and whatever cannot be trusted or rebuilt raises :class:`Refusal` with
a one-line reason: a process is recovered exactly, or not at all.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import drgn
from drgn.helpers.linux.fs import d_path, for_each_file
from drgn.helpers.linux.list import list_for_each_entry
from drgn.helpers.linux.mm import for_each_vma, page_to_phys
from drgn.helpers.linux.pid import find_task, for_each_task, for_each_task_in_group
from drgn.helpers.linux.sched import task_cpu, task_on_cpu, task_state_to_char
from drgn.helpers.linux.xarray import xa_is_value, xa_load

from transmigrate.errors import IntrospectionError, Unrecoverable
from transmigrate.introspect.epoll import EpollState, read_epoll
from transmigrate.introspect.eventfds import (
    EventfdState,
    SignalfdState,
    read_eventfd,
    read_signalfd,
)
from transmigrate.introspect.filelocks import FileLockState, read_locks
from transmigrate.introspect.kernel import Guest
from transmigrate.introspect.namespaces import (
    IpcNamespaceState,
    TimeNamespaceState,
    read_ipc_namespace,
    read_time_namespace,
)
from transmigrate.introspect.pagecache import (
    TmpfsFile,
    dirty_pages,
    read_tmpfs_file,
    shmem_pages,
)
from transmigrate.introspect.pagetable import PAGE, PageTables, UnmovablePage
from transmigrate.introspect.panic import PanicReader
from transmigrate.introspect.pipes import PipeState, read_pipe
from transmigrate.introspect.sockets import SocketState, is_connection, read_socket
from transmigrate.introspect.timerfds import TimerfdState, read_timerfd
from transmigrate.introspect.unix import UnixSocketState, is_unix_socket, read_unix_socket
from transmigrate.vm.registers import VcpuState
from transmigrate.vm.volume import DATA_MOUNT

__all__ = ["FileState", "Mapping", "OpenFile", "ProcessState", "Refusal", "Registers",
           "SharedMemoryState", "ThreadState", "read_cmdline", "read_process", "read_tree",
           "saved_user_registers", "unfinished_call"]

# Kernel ABI constants (include/linux/sched.h, mm.h, uapi): stable across 6.1 and 6.12.
_PF_EXITING = 0x4
_PF_KTHREAD = 0x0020_0000
_PF_RANDOMIZE = 0x0040_0000
_VM_SHARED = 0x8
_VM_GROWSDOWN = 0x100
_VM_SPECIAL = 0x4000 | 0x400 | 0x400000 | 0x10000000  # IO, PFNMAP, HUGETLB, MIXEDMAP
_RWSEM_WRITER_LOCKED = 1
_ERESTARTSYS, _ERESTARTNOINTR, _ERESTARTNOHAND, _ENOSYS = 512, 513, 514, 38
_ERESTART_RESTARTBLOCK, _EINTR = 516, 4
_WRITES = {1: "write", 18: "pwrite64", 20: "writev", 40: "sendfile", 44: "sendto",
           46: "sendmsg", 275: "splice", 276: "tee", 278: "vmsplice", 296: "pwritev",
           307: "sendmmsg", 326: "copy_file_range", 328: "pwritev2"}
_READS = {0: "read", 19: "readv", 45: "recvfrom", 47: "recvmsg", 299: "recvmmsg"}
"""x86-64 system calls that move data, by number (their side effects cannot be undone)."""
_ON_ONE_FD = {0, 1, 18, 19, 20, 44, 45, 46, 47, 296, 299, 307, 328}
"""Those among them whose data moves through the one descriptor in their first argument."""
_WRITE = 1
_NAMING = {83: "mkdir", 84: "rmdir", 86: "link", 87: "unlink", 88: "symlink", 82: "rename",
           133: "mknod", 258: "mkdirat", 259: "mknodat", 263: "unlinkat", 264: "renameat",
           265: "linkat", 266: "symlinkat", 316: "renameat2",
           437: "openat2"}  # openat2: its flags are in the caller's memory
"""x86-64 system calls that change names in the file system, by number."""
_OPENS = {2: ("open", "si"), 257: ("openat", "dx")}
"""Opens, and the register that holds their flags."""
_EPOLL_WAITS = {232, 281, 441}
"""epoll_wait, epoll_pwait, epoll_pwait2."""
_WRITES_AT_POSITION = {1, 18, 20, 296}
"""write, pwrite64, writev, pwritev: into a file not opened to append, they write at
the file position (or the one given), which moves only once they return."""
_MAX_APPEND = 1 << 26
"""More than an append that was cut short can have written: the file is not as read."""
_SIGKILL, _SIGSTOP = 9, 19
_XFEATURE_PKRU = 9
_XFEATURE_X87, _XFEATURE_SSE, _XFEATURE_AVX_INDEX = 0x1, 0x2, 2
_TIF_NEED_FPU_LOAD = 14
_MAX_XSAVE = 1 << 16
_CRIU_AUXV_WORDS = 44
"""CRIU 3.17 reads at most this many words of /proc/PID/auxv (its AT_VECTOR_SIZE) and
refuses more at restore: 6.12's auxv (with AT_RSEQ_*) loses its AT_NULL pair, as in
CRIU's own dumps."""
_MAX_VMAS = 65536
_MAX_FDS = 65536
_MAX_THREADS = 4096
_MAX_PROCESSES = 4096
_MAX_TASKS = 1 << 22
_PIPEFS_MAGIC = 0x50495045
_TMPFS_MAGIC = 0x01021994
_O_CLOEXEC = 0o2000000
_PT_REGS = ("r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx",
            "dx", "si", "di", "orig_ax", "ip", "cs", "flags", "sp", "ss")
_USER_CS, _USER_SS = 0x33, 0x2B
_CRIU_VDSO_MARK = 0x4F53447655495243
"""CRIU's vdso mark (version 3, "CRIUvDSO"): its restorer writes it over the ELF header
of the kernel's vdso when it redirects the process's own (older) vdso to it."""


class Refusal(IntrospectionError):
    """This process cannot be recovered exactly; ``reason`` says why in one line."""

    def __init__(self, pid: int, reason: str) -> None:
        self.pid = pid
        self.reason = reason
        super().__init__(f"process {pid}: {reason}")


@dataclass(frozen=True)
class Registers:
    """A thread's user registers as it will resume: the syscall it was in set up to
    restart, as CRIU does for a task it seizes."""

    general: dict[str, int]
    """``struct pt_regs`` members by name (CRIU's ``user_x86_regs_entry`` order)."""
    fs_base: int
    gs_base: int
    fsindex: int
    gsindex: int
    ds: int
    es: int
    xsave: bytes
    """The XSAVE area in standard (non-compacted) layout: legacy 512 bytes, header,
    then each enabled component at its standard offset."""
    xfeatures: int
    """The components this thread's area holds (its XSTATE_BV)."""
    components: dict[int, tuple[int, int]]
    """(standard offset, size) in ``xsave`` of each extended user component the CPU has
    (what CRIU sizes its image arrays by)."""


@dataclass(frozen=True)
class FileState:
    """An open file (or a mapped one, or cwd/root): what CRIU's reg_file_entry holds."""

    path: str
    flags: int
    pos: int
    mode: int
    size: int
    key: int
    """The ``struct file`` (or, for cwd/root, the dentry): one image entry per key."""
    dirty: tuple[tuple[int, int], ...] = ()
    """For a file on the data volume (which the new VM mounts): (page index, physical
    address) of each page-cache page the volume may not have yet (see
    ``pagecache.dirty_pages``); with them, ``size`` is written back too."""
    tmpfs: TmpfsFile | None = None
    """For a file on a tmpfs: all of it, to make again on the new VM."""


OpenFile = (FileState | PipeState | EpollState | SocketState | UnixSocketState
            | EventfdState | SignalfdState | TimerfdState)
"""What a descriptor can be that recovery rebuilds."""


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    pgoff: int
    """In bytes, as /proc/PID/maps has it."""
    vm_flags: int
    kind: str
    """"anon", "file" (private), "shared-file" (MAP_SHARED, of a file on the data
    volume), "shared-anon" (MAP_SHARED | MAP_ANONYMOUS), "heap", "stack", "vdso" or
    "vvar"."""
    file: FileState | None
    shared: SharedMemoryState | None = None
    """For "shared-anon": its memory."""


@dataclass(frozen=True)
class SharedMemoryState:
    """Anonymous shared memory (shmem's "dev/zero"), which CRIU 3.17 dumps and restores
    as a memfd of that name: its size, owner and seals, and (offset, physical) of each
    page it has, whoever touched it."""

    key: int
    """The ``struct file`` its mappings share."""
    ino: int
    size: int
    uid: int
    gid: int
    seals: int
    pages: tuple[tuple[int, int], ...] = field(repr=False)


@dataclass(frozen=True)
class ThreadState:
    """What each thread has of its own."""

    tid: int
    comm: str
    registers: Registers
    clear_tid_address: int
    rseq: tuple[int, int, int] | None
    """(abi pointer, abi size, signature), or None if the thread has not registered."""
    blocked: int
    credentials: dict[str, object]
    nice: int
    policy: int
    rt_priority: int
    sigaltstack: tuple[int, int, int]
    pdeath_signal: int
    robust_list: tuple[int, int]
    """The robust futex list's head and length (set_robust_list)."""


@dataclass
class ProcessState:
    pid: int
    ppid: int
    pgid: int
    sid: int
    threads: list[ThreadState]
    """The leader first: its comm and blocked mask are the process's."""
    sigactions: list[tuple[int, int, int, int]]
    """Per signal 1..64 minus SIGKILL and SIGSTOP: (handler, flags, restorer, mask)."""
    personality: int
    rlimits: list[tuple[int, int]]
    mm: dict[str, object]
    mappings: list[Mapping]
    pages: list[tuple[int, int]] = field(repr=False)
    """(virtual, physical) of every page CRIU would dump, in address order."""
    files: dict[int, tuple[OpenFile, bool]]
    """By descriptor: the file, and whether it is close-on-exec."""
    exe: FileState
    cwd: FileState
    root: FileState
    umask: int
    task_flags: int
    """PF_RANDOMIZE, the one ``task_struct.flags`` bit CRIU keeps."""
    loginuid: int
    oom_score_adj: int
    child_subreaper: bool
    losses: list[str] = field(default_factory=list)
    """What the restored process will not have, in a few words each."""
    children: list[int] = field(default_factory=list)
    """Its child processes (forked by any of its threads)."""
    ipc_namespace: IpcNamespaceState | None = None
    """Its IPC namespace, if it is not the VM's."""
    time_namespace: TimeNamespaceState | None = None
    """Its time namespace, if it is not the VM's (CRIU restored it once)."""
    locks: list[FileLockState] = field(default_factory=list)
    """The file locks it holds (POSIX and flock)."""

    @property
    def leader(self) -> ThreadState:
        return self.threads[0]


def read_process(guest: Guest, pid: int, *, vcpus: dict[int, VcpuState] | None = None,
                 allow_panicking: bool = False) -> ProcessState:
    """Read process ``pid`` out of ``guest``, whose vCPUs are stopped.

    ``vcpus`` is what each stopped vCPU holds: a task that was running user code on
    one has its registers there, and a task that was on one at all its FPU
    registers. Without it, such a task is refused.
    """
    if pid == 1:
        raise Refusal(pid, "it is the guest's init, which a restore cannot replace")
    prog = guest.prog
    try:
        task = find_task(prog, pid)
    except (drgn.FaultError, ValueError, LookupError) as exc:
        raise Refusal(pid, f"the kernel's pid table cannot be read ({exc})") from exc
    if not task:
        raise IntrospectionError(f"no process {pid} in the guest")
    try:
        return _Reader(guest, task, pid, vcpus or {}, allow_panicking).read()
    except (drgn.FaultError, drgn.ObjectAbsentError, OverflowError) as exc:
        raise Refusal(pid, f"its kernel state is torn or corrupt ({exc})") from exc


def read_tree(guest: Guest, pid: int, *, vcpus: dict[int, VcpuState] | None = None,
              allow_panicking: bool = False) -> list[ProcessState]:
    """Process ``pid`` and every process below it (what ``criu dump -t PID`` takes),
    each parent before its children, all in one time namespace (CRIU restores one). A
    refusal of any of them refuses the tree."""
    tree = [read_process(guest, pid, vcpus=vcpus, allow_panicking=allow_panicking)]
    for process in tree:  # grows as it goes: breadth first
        for child in process.children:
            if len(tree) >= _MAX_PROCESSES:
                raise Refusal(pid, "its process tree is corrupt (too many processes)")
            try:
                tree.append(read_process(guest, child, vcpus=vcpus,
                                         allow_panicking=allow_panicking))
            except IntrospectionError as exc:
                reason = exc.reason if isinstance(exc, Refusal) else str(exc)
                raise Refusal(pid, f"its child {child}: {reason}") from exc
            if tree[-1].time_namespace != tree[0].time_namespace:
                raise Refusal(pid, f"its child {child} lives in another time namespace "
                                   "(not supported yet)")
    _check_unix_peers(pid, tree)
    return tree


def _check_unix_peers(pid: int, tree: list[ProcessState]) -> None:
    """Refuse a tree with a UNIX socket whose peer it does not hold: the restore
    could not connect it again."""
    sockets = [(process.pid, fd, state) for process in tree
               for fd, (state, _) in process.files.items()
               if isinstance(state, UnixSocketState)]
    held = {state.ino for _, _, state in sockets}
    for owner, fd, state in sockets:
        if state.peer and state.peer not in held:
            who = "its" if owner == pid else f"its child {owner}'s"
            raise Refusal(pid, f"{who} fd {fd} is a UNIX socket whose peer is outside the "
                               "process tree (not supported yet)")


def saved_user_registers(task: drgn.Object) -> drgn.Object:
    """The ``pt_regs`` the entry code saved at the top of ``task``'s kernel stack: its
    user registers, and for a system call its number (``orig_ax``) and arguments."""
    prog = task.prog_
    try:
        thread_size = int(prog["THREAD_SIZE"])
    except LookupError:
        thread_size = 16384
    regs = prog.type("struct pt_regs")
    return drgn.Object(prog, regs, address=int(task.stack.value_()) + thread_size - regs.size)


def unfinished_call(task: drgn.Object) -> int | None:
    """The system call ``task`` was inside and had not finished (the entry code's
    -ENOSYS still stands for its result), by number; None if none, or if it finished or
    chose to restart."""
    regs = saved_user_registers(task)
    number = int(regs.orig_ax) & 0xFFFF_FFFF_FFFF_FFFF
    if number >= 1 << 63 or \
            int(regs.ax) & 0xFFFF_FFFF_FFFF_FFFF != (-_ENOSYS) & 0xFFFF_FFFF_FFFF_FFFF:
        return None
    return number


def read_cmdline(guest: Guest, pid: int) -> list[str]:
    """Process ``pid``'s arguments, from its own memory (what /proc/PID/cmdline shows);
    empty if they cannot be read (a kernel thread, pages not present)."""
    try:
        task = find_task(guest.prog, pid)
        mm = task.mm
        if not task or not mm:
            return []
        start, end = int(mm.arg_start), int(mm.arg_end)
        if not 0 < end - start <= 1 << 17:
            return []
        first = start & ~(PAGE - 1)
        pages = dict(PageTables.of(guest, int(mm.pgd)).pages(first, end))
        data = b"".join(bytes(guest.ram.read(pages[page], PAGE)) if page in pages
                        else b"" for page in range(first, end, PAGE))
    except (drgn.FaultError, IntrospectionError, ValueError):
        return []
    if len(data) < end - first:
        return []
    return [arg.decode(errors="replace") for arg in
            data[start - first:end - first].rstrip(b"\0").split(b"\0")]


class _Reader:
    def __init__(self, guest: Guest, task: drgn.Object, pid: int,
                 vcpus: dict[int, VcpuState], allow_panicking: bool) -> None:
        self.guest = guest
        self.prog = guest.prog
        self.task = task
        self.pid = pid
        self.vcpus = vcpus
        self.allow_panicking = allow_panicking
        self.cut: dict[int, str] = {}
        """Connections to cut, by descriptor, and why (see :func:`read_socket`)."""
        self.rewound: dict[int, int] = {}
        """Files (``struct file``) an append was cut short in, and the size to write
        them back at: where the append began (see ``_write_again``)."""
        # What every thread needs from the kernel, looked up once.
        self.panic_cpu = PanicReader(guest).sample().panic_cpu
        self.cpu_xfeatures = int(self.prog["fpu_user_cfg"].max_features)
        self.xstate_offsets = [int(x) for x in self.prog["xstate_offsets"]]
        self.xstate_sizes = [int(x) for x in self.prog["xstate_sizes"]]
        flags = guest.variable("xstate_flags")
        self.xstate_aligned = [bool(int(f) & 2) for f in flags] if flags is not None else None
        self.file_operations = {
            self.prog.object(name).address_of_().value_(): name
            for name in ("pipefifo_fops", "eventpoll_fops", "socket_file_ops", "eventfd_fops",
                         "signalfd_fops", "timerfd_fops")}

    def refuse(self, reason: str) -> Refusal:
        return Refusal(self.pid, reason)

    def read(self) -> ProcessState:
        task = self.task
        self._check_task()
        tasks = self._threads()
        threads = [self._thread(thread) for thread in tasks]
        files, locks = self._files()
        mm = task.mm
        mappings = list(self._mappings(mm))
        pgid, sid = self._group_ids()
        children = self._children(tasks)
        try:
            ipc_namespace = read_ipc_namespace(self.prog, task)
            time_namespace = read_time_namespace(self.prog, task)
        except Unrecoverable as exc:
            raise self.refuse(f"it {exc}") from exc
        return ProcessState(
            pid=self.pid, ppid=int(task.real_parent.tgid), pgid=pgid, sid=sid,
            threads=threads, sigactions=self._sigactions(),
            personality=int(task.personality),
            rlimits=[(int(r.rlim_cur), int(r.rlim_max)) for r in task.signal.rlim],
            mm=self._mm(mm), mappings=mappings, pages=self._pages(mm, mappings),
            children=children, ipc_namespace=ipc_namespace,
            time_namespace=time_namespace, files=files, locks=locks,
            losses=[loss for state, _ in files.values()
                    if isinstance(state, SocketState | EpollState) for loss in state.losses],
            exe=self._file(mm.exe_file, "the executable"),
            cwd=self._path(task.fs.pwd), root=self._path(task.fs.root),
            umask=int(task.fs.umask),
            task_flags=int(task.flags) & _PF_RANDOMIZE, loginuid=int(task.loginuid.val),
            oom_score_adj=int(task.signal.oom_score_adj),
            child_subreaper=bool(task.signal.is_child_subreaper))

    # -- the task itself -------------------------------------------------------------

    def _check_task(self) -> None:
        task = self.task
        flags = int(task.flags)
        if flags & _PF_KTHREAD:
            raise self.refuse("it is a kernel thread")
        if int(task.tgid) != self.pid:
            raise self.refuse(f"it is a thread of process {int(task.tgid)}; name the process")
        if flags & _PF_EXITING or int(task.exit_state):
            raise self.refuse("it was exiting")
        if int(task.in_execve):
            raise self.refuse("it was in execve")
        if int(task.ptrace):
            raise self.refuse("it is being traced")
        if not task.mm:
            raise self.refuse("it has no memory (a kernel thread or a zombie)")
        if int(task.mm.mm_users.counter) != int(task.signal.nr_threads):
            sharing = self._sharing_memory()
            if sharing:
                raise self.refuse(f"its memory is shared with process {sharing} (vfork or "
                                  "CLONE_VM)")
        if int(task.mm.mmap_lock.count.counter) & _RWSEM_WRITER_LOCKED:
            raise self.refuse("its memory map was being changed (mmap_lock held for writing)")
        if int(task.files.file_lock.rlock.raw_lock.val.counter):
            raise self.refuse("its file table was being changed (file_lock held)")
        pending = int(task.signal.shared_pending.signal.sig[0])
        if pending:
            raise self.refuse(f"it has signals pending ({pending:#x})")

    def _sharing_memory(self) -> int | None:
        """Another process that uses its memory map, if any. Its user count says more
        only when something else holds the map for a moment (reading /proc/PID/stat,
        khugepaged), so the task list says who."""
        mm = self.task.mm.value_()
        for count, task in enumerate(for_each_task(self.prog)):
            if count >= _MAX_TASKS:
                raise self.refuse("the kernel's task list is corrupt (too long)")
            if task.mm.value_() == mm and int(task.tgid) != self.pid:
                return int(task.tgid)
        return None

    def _threads(self) -> list[drgn.Object]:
        """The leader and its threads, each checked; the walk is bounded."""
        count = int(self.task.signal.nr_threads)
        if not 1 <= count <= _MAX_THREADS:
            raise self.refuse(f"its thread count ({count}) is corrupt")
        threads = [self.task]
        for thread in for_each_task_in_group(self.task):
            if thread.value_() != self.task.value_():
                threads.append(thread)
            if len(threads) > count:
                raise self.refuse("its thread list is corrupt (longer than its count)")
        if len(threads) != count:
            raise self.refuse(f"its thread list is corrupt ({len(threads)} of {count})")
        return threads

    def _children(self, threads: list[drgn.Object]) -> list[int]:
        """The processes its threads forked; a child that exited unreaped is refused."""
        children: list[int] = []
        for thread in threads:
            for child in list_for_each_entry("struct task_struct",
                                             thread.children.address_of_(), "sibling"):
                if len(children) >= _MAX_PROCESSES:
                    raise self.refuse("its child list is corrupt (too long)")
                if int(child.exit_state):
                    raise self.refuse(f"its child {int(child.pid)} has exited unreaped "
                                      "(a zombie; not supported yet)")
                children.append(int(child.tgid))
        return children

    def _check_thread(self, task: drgn.Object, tid: int) -> None:
        who = "it" if tid == self.pid else f"its thread {tid}"
        if int(task.flags) & _PF_EXITING or int(task.exit_state):
            raise self.refuse(f"{who} was exiting")
        if task.mm.value_() != self.task.mm.value_():
            raise self.refuse(f"{who} does not share its memory (corrupt thread list)")
        if (self.panic_cpu >= 0 and task_on_cpu(task) and task_cpu(task) == self.panic_cpu
                and not self.allow_panicking and self._in_syscall(task)):
            raise self.refuse(f"{who} is the task that panicked the kernel (its syscall "
                              "could crash the new one too)")
        changing = self._changing_names(task)
        if changing:
            raise self.refuse(f"{who} was inside {changing}() when the kernel stopped: it "
                              "may have changed the file system already, and doing it again "
                              "would fail (the name exists, or no longer does)")
        moving = self._moving_data(task)
        if moving:
            call, fd = moving
            file = self._file_at(fd) if fd is not None else None
            if fd is not None and file is not None and self._is_connection(file):
                self.cut[fd] = (f"{'the process' if tid == self.pid else f'its thread {tid}'}"
                                f" was inside {call}() on it when the kernel stopped")
            elif file is None or not self._write_again(task, file):
                raise self.refuse(f"{who} was inside {call}() when the kernel stopped: "
                                  "whether its data went through is unknown, and doing it "
                                  "again could write it twice")
        if self._live_fpu(task) and task_cpu(task) not in self.vcpus:
            raise self.refuse(f"{who} was on vCPU {task_cpu(task)} with its registers "
                              "there, and the vCPU's state was not read")
        vcpu = self.vcpus.get(task_cpu(task)) if task_on_cpu(task) else None
        if vcpu is not None and vcpu.avx512:
            raise self.refuse(f"{who} was on vCPU {task_cpu(task)}, whose AVX-512 state "
                              "is not read yet")
        pending = int(task.pending.signal.sig[0])
        if pending:
            raise self.refuse(f"{who} has signals pending ({pending:#x})")

    def _thread(self, task: drgn.Object) -> ThreadState:
        tid = int(task.pid)
        self._check_thread(task, tid)
        return ThreadState(
            tid=tid, comm=task.comm.string_().decode(errors="replace"),
            registers=self._registers(task), clear_tid_address=int(task.clear_child_tid),
            rseq=self._rseq(task), blocked=int(task.blocked.sig[0]),
            credentials=self._credentials(task), nice=int(task.static_prio) - 120,
            policy=int(task.policy), rt_priority=int(task.rt_priority),
            sigaltstack=(int(task.sas_ss_sp), int(task.sas_ss_size), int(task.sas_ss_flags)),
            pdeath_signal=int(task.pdeath_signal),
            robust_list=(int(task.robust_list), 24 if task.robust_list else 0))

    def _group_ids(self) -> tuple[int, int]:
        if int(self.task.thread_pid.level) != 0:  # CRIU would give it the outer pid
            raise self.refuse("it lives in a pid namespace of its own (not supported yet)")
        pids = self.task.signal.pids
        ids = []
        for kind in ("PIDTYPE_PGID", "PIDTYPE_SID"):
            pid = pids[self.prog.constant(kind).value_()]
            if int(pid.level) != 0:
                raise self.refuse("it lives in a pid namespace of its own (not supported yet)")
            ids.append(int(pid.numbers[0].nr))
        return ids[0], ids[1]

    def _in_syscall(self, task: drgn.Object) -> bool:
        """Whether the task entered the kernel by a system call (not an interrupt, an
        exception or an NMI that came while it ran user code)."""
        orig_ax = int(saved_user_registers(task).orig_ax) & 0xFFFF_FFFF_FFFF_FFFF
        return orig_ax < 1 << 63  # -1 for every other entry

    def _in_epoll_wait(self, task: drgn.Object) -> bool:
        """Whether ``task`` (of any process) was inside epoll_wait, epoll_pwait(2)."""
        regs = saved_user_registers(task)
        return int(regs.orig_ax) & 0xFFFF_FFFF_FFFF_FFFF in _EPOLL_WAITS

    def _changing_names(self, task: drgn.Object) -> str | None:
        """The system call, if ``task`` was inside one that creates, removes or renames a
        name in the file system, which once done cannot be done again: mkdir, unlink,
        rename, link, symlink, mknod, and an exclusive create (``O_CREAT | O_EXCL``)."""
        number = unfinished_call(task)
        if number is None:
            return None
        regs = saved_user_registers(task)
        if number in _OPENS:
            flags = int(regs.member_(_OPENS[number][1]))
            exclusive = flags & (os.O_CREAT | os.O_EXCL) == os.O_CREAT | os.O_EXCL
            return _OPENS[number][0] if exclusive else None
        return _NAMING.get(number)

    def _moving_data(self, task: drgn.Object) -> tuple[str, int | None] | None:
        """The system call, and the descriptor its data moves through (when it has one),
        if ``task`` was inside one that moves data and may have moved some of it already:
        a write of any kind (the kernel copies before it can block), or a read that was
        running rather than waiting (it may have taken bytes off a queue). Restarting
        either could write twice or lose bytes."""
        number = unfinished_call(task)
        if number is None:
            return None
        fd = int(saved_user_registers(task).di) & 0xFFFF_FFFF if number in _ON_ONE_FD else None
        if number in _WRITES:
            return _WRITES[number], fd
        if number in _READS and (task_on_cpu(task) or task_state_to_char(task) == "R"):
            return _READS[number], fd
        return None

    def _file_at(self, fd: int) -> drgn.Object | None:
        """The file open as ``fd``, if any."""
        fdt = self.task.files.fdt
        if not 0 <= fd < min(int(fdt.max_fds), 1 << 20):
            return None
        file = fdt.fd[fd]
        return file if file else None

    def _is_connection(self, file: drgn.Object) -> bool:
        """Whether ``file`` is an established TCP connection (which can be cut)."""
        return (self.file_operations.get(file.f_op.value_()) == "socket_file_ops"
                and is_connection(file))

    def _write_again(self, task: drgn.Object, file: drgn.Object) -> bool:
        """Whether ``task``'s write into the regular ``file``, cut short, can be made
        again with nothing written twice. At a position of its own, yes: the file
        position moves only once the call returns, so the same bytes land on the same
        ones. An append (``write``) to a file on the data volume, only if what the file
        holds past its position (where the last append ended) is exactly the start of
        what the call writes: then the file is written back without it (``rewound``)."""
        regs = saved_user_registers(task)
        number = int(regs.orig_ax) & 0xFFFF_FFFF_FFFF_FFFF
        inode = file.f_inode
        if not stat.S_ISREG(int(inode.i_mode)):
            return False
        if not int(file.f_flags) & os.O_APPEND:
            return number in _WRITES_AT_POSITION
        if number != _WRITE or not self._name(file.f_path).startswith(f"{DATA_MOUNT}/"):
            return False
        start, size = int(file.f_pos), int(inode.i_size)
        if not start <= size <= start + min(int(regs.dx), _MAX_APPEND):
            return False
        if size > start:
            written = self._cached(inode, start, size)
            if written is None or written != self._user_bytes(task.mm, int(regs.si),
                                                               size - start):
                return False
        self.rewound[file.value_()] = start
        return True

    def _cached(self, inode: drgn.Object, start: int, end: int) -> bytes | None:
        """Bytes ``start`` to ``end`` of ``inode`` from its page cache; None if a page of
        them is not cached."""
        data = bytearray()
        for index in range(start // PAGE, (end - 1) // PAGE + 1):
            entry = xa_load(inode.i_mapping.i_pages.address_of_(), index)
            if not entry or xa_is_value(entry):
                return None
            page = drgn.cast("struct page *", entry)
            physical = int(page_to_phys(page))
            if int(page.index) != index or not self.guest.ram.covers(physical, PAGE):
                return None
            data += self.guest.ram.read(physical, PAGE)
        first = start // PAGE * PAGE
        return bytes(data[start - first:end - first])

    def _user_bytes(self, mm: drgn.Object, address: int, length: int) -> bytes | None:
        """``length`` bytes of the process's memory at ``address``; None if a page of
        them is not present."""
        first, end = address & ~(PAGE - 1), address + length
        pages = dict(PageTables.of(self.guest, int(mm.pgd)).pages(first, end))
        data = bytearray()
        for page in range(first, end, PAGE):
            if page not in pages or not self.guest.ram.covers(pages[page], PAGE):
                return None
            data += self.guest.ram.read(pages[page], PAGE)
        return bytes(data[address - first:end - first])

    def _live_fpu(self, task: drgn.Object) -> bool:
        """Whether ``task`` was on a CPU with its FPU registers loaded there (the kernel
        saves them to memory only when it switches away)."""
        return bool(task_on_cpu(task)
                    and not int(task.thread_info.flags) >> _TIF_NEED_FPU_LOAD & 1)

    def _registers(self, task: drgn.Object) -> Registers:
        thread = task.thread
        vcpu = self.vcpus.get(task_cpu(task)) if task_on_cpu(task) else None
        xsave, xfeatures, components = self._xsave(task, vcpu if self._live_fpu(task) else None)
        if vcpu is not None and vcpu.user_mode:  # it was running user code: all in the vCPU
            general = {name: vcpu.general.get(name, 0) for name in _PT_REGS}
            general.update(orig_ax=(1 << 64) - 1, cs=vcpu.selectors["cs"],
                           ss=vcpu.selectors["ss"])
            return Registers(general=general, fs_base=vcpu.fs_base, gs_base=vcpu.gs_base,
                             fsindex=vcpu.selectors["fs"], gsindex=vcpu.selectors["gs"],
                             ds=vcpu.selectors["ds"], es=vcpu.selectors["es"],
                             xsave=xsave, xfeatures=xfeatures, components=components)
        regs = saved_user_registers(task)
        general = {name: int(regs.member_(name)) & 0xFFFF_FFFF_FFFF_FFFF for name in _PT_REGS}
        if general["cs"] & 0xFFFF != _USER_CS or general["ss"] & 0xFFFF != _USER_SS:
            raise self.refuse(f"its saved user registers are not user-mode ones "
                              f"(cs={general['cs']:#x}, ss={general['ss']:#x})")
        _restart_syscall(general)
        # On a CPU in the kernel, FS still holds the task's base (the kernel uses GS).
        return Registers(general=general,
                         fs_base=vcpu.fs_base if vcpu is not None else int(thread.fsbase),
                         gs_base=int(thread.gsbase), fsindex=int(thread.fsindex),
                         gsindex=int(thread.gsindex), ds=int(thread.ds), es=int(thread.es),
                         xsave=xsave, xfeatures=xfeatures, components=components)

    def _xsave(self, task: drgn.Object, vcpu: VcpuState | None
               ) -> tuple[bytes, int, dict[int, tuple[int, int]]]:
        """The task's FPU state as ptrace would give it (the kernel's
        copy_xstate_to_uabi_buf): standard layout, components in their init state
        zeroed, PKRU from the thread. Also XSTATE_BV, and the (offset, size) of each
        extended component the CPU has. With ``vcpu`` (the task's registers were live
        there), x87, SSE and AVX come from it."""
        fpstate = task.thread.fpu.fpstate
        size = int(fpstate.user_size)
        if not 576 <= size <= int(fpstate.size) <= _MAX_XSAVE:
            raise self.refuse(f"its FPU state is corrupt (sizes {size}, {int(fpstate.size)})")
        user = int(fpstate.user_xfeatures)
        cpu = self.cpu_xfeatures
        raw = self.guest.read(int(fpstate.regs.xsave.address_of_()), int(fpstate.size))
        xfeatures, xcomp_bv = struct.unpack_from("<QQ", raw, 512)
        xfeatures &= user
        offsets, sizes, aligned = self.xstate_offsets, self.xstate_sizes, self.xstate_aligned
        compacted = 576
        area = bytearray(size)
        area[:512] = raw[:512]
        layout = {}
        for feature in range(2, min(len(offsets), len(sizes))):
            held = xcomp_bv >> feature & 1 if xcomp_bv >> 63 else 1
            if aligned is not None and xcomp_bv >> 63 and held and aligned[feature]:
                compacted = (compacted + 63) & ~63  # XSTATE_FLAG_ALIGNED64
            here = compacted if xcomp_bv >> 63 else offsets[feature]
            if cpu >> feature & 1:
                standard, length = offsets[feature], sizes[feature]
                layout[feature] = (standard, length)
                if xfeatures >> feature & 1 and standard + length <= size \
                        and here + length <= len(raw):
                    area[standard:standard + length] = raw[here:here + length]
            if xcomp_bv >> 63 and held:
                compacted += sizes[feature]
        if cpu >> _XFEATURE_PKRU & 1:
            xfeatures |= 1 << _XFEATURE_PKRU
            standard, _ = layout[_XFEATURE_PKRU]
            struct.pack_into("<I", area, standard, int(task.thread.pkru))
        if vcpu is not None:
            xfeatures |= _load_vcpu_fpu(area, vcpu, layout)
        struct.pack_into("<QQ", area, 512, xfeatures, 0)
        return bytes(area), xfeatures, layout

    def _rseq(self, task: drgn.Object) -> tuple[int, int, int] | None:
        pointer = int(task.rseq)
        if not pointer:
            return None
        size = int(task.rseq_len) if self.guest.has("struct task_struct", "rseq_len") else 32
        return pointer, size, int(task.rseq_sig)

    def _sigactions(self) -> list[tuple[int, int, int, int]]:
        actions = self.task.sighand.action
        result = []
        for signal in range(1, 65):
            if signal in (_SIGKILL, _SIGSTOP):
                continue
            sa = actions[signal - 1].sa
            result.append((int(sa.sa_handler), int(sa.sa_flags), int(sa.sa_restorer),
                           int(sa.sa_mask.sig[0])))
        return result

    def _credentials(self, task: drgn.Object) -> dict[str, object]:
        cred = task.cred
        ids = {name: int(cred.member_(name).val) for name in
               ("uid", "gid", "euid", "egid", "suid", "sgid", "fsuid", "fsgid")}

        def caps(value: drgn.Object) -> list[int]:
            if self.guest.has("kernel_cap_t", "val"):  # 6.3+: one u64
                word = int(value.val)
                return [word & 0xFFFF_FFFF, word >> 32]
            return [int(value.cap[0]), int(value.cap[1])]

        groups = cred.group_info
        count = int(groups.ngroups)
        if count > 65536:
            raise self.refuse("its supplementary groups are corrupt")
        return {**ids, "cap_inh": caps(cred.cap_inheritable),
                "cap_prm": caps(cred.cap_permitted), "cap_eff": caps(cred.cap_effective),
                "cap_bnd": caps(cred.cap_bset), "secbits": int(cred.securebits),
                "groups": [int(groups.gid[i].val) for i in range(count)]}

    # -- memory ----------------------------------------------------------------------

    def _mm(self, mm: drgn.Object) -> dict[str, object]:
        names = ("start_code", "end_code", "start_data", "end_data", "start_stack",
                 "start_brk", "brk", "arg_start", "arg_end", "env_start", "env_end")
        auxv = [int(word) for word in mm.saved_auxv]
        end = next((i + 2 for i in range(0, len(auxv) - 1, 2) if auxv[i] == 0), len(auxv))
        auxv = auxv[:min(end, _CRIU_AUXV_WORDS)]
        return {**{name: int(mm.member_(name)) for name in names},
                "auxv": auxv, "dumpable": int(mm.flags) & 3,
                "thp_disabled": bool(int(mm.flags) >> 24 & 1)}  # MMF_DISABLE_THP

    def _mappings(self, mm: drgn.Object) -> Iterator[Mapping]:
        """Its mappings, as CRIU's dump lists them. A process CRIU restored on a kernel
        with another vdso calls its own through the kernel's, which bears CRIU's mark
        (:meth:`_vdso_mark`): the kernel's vdso and vvar are left out (the restore makes
        them again), and its own are its vdso and vvar, as CRIU does."""
        previous_end = 0
        vdso, vvar, made_at_restore = int(mm.context.vdso), None, set()
        mark = self._vdso_mark(mm, vdso)
        if mark is not None:
            made_at_restore = {vdso, mark[2]}
            vdso, vvar = mark[0], mark[1]
        for count, vma in enumerate(for_each_vma(mm)):
            if count >= _MAX_VMAS:
                raise self.refuse("its memory map is corrupt (too many mappings)")
            start, end = int(vma.vm_start), int(vma.vm_end)
            if vma.vm_mm.value_() != mm.value_() or not previous_end <= start < end \
                    or start % PAGE or end % PAGE or end > 1 << 56:
                raise self.refuse(f"its memory map is corrupt at {start:#x}-{end:#x}")
            previous_end = end
            flags = int(vma.vm_flags)
            file = vma.vm_file
            if start in made_at_restore and (start == int(mm.context.vdso) or
                                             self._is_vvar(vma)):
                continue
            if start == vdso:
                kind = "vdso"
            elif start == vvar and not file:
                kind = "vvar"
            elif not file:
                if vma.vm_ops and self._is_vvar(vma):
                    kind = "vvar"
                elif start <= int(mm.brk) and end >= int(mm.start_brk) \
                        and int(mm.brk) > int(mm.start_brk):
                    kind = "heap"
                elif flags & _VM_GROWSDOWN or start <= int(mm.start_stack) < end:
                    kind = "stack"
                else:
                    kind = "anon"
            elif flags & _VM_SHARED:
                kind = "shared-file"
            else:
                kind = "file"
            if kind not in ("vvar", "vdso") and flags & _VM_SPECIAL:
                raise self.refuse(f"it maps device or hugetlb memory at {start:#x}")
            if kind == "shared-file" and self._anonymous(file):
                yield Mapping(start, end, int(vma.vm_pgoff) * PAGE, flags, "shared-anon",
                              None, self._shared_memory(file, start))
            elif kind in ("file", "shared-file"):
                state = self._file(file, f"the mapping at {start:#x}")
                if kind == "shared-file" and not self._kept(state):
                    raise self.refuse(f"it has shared memory at {start:#x} ({state.path}; "
                                      "only files on the data volume or a tmpfs are "
                                      "supported)")
                yield Mapping(start, end, int(vma.vm_pgoff) * PAGE, flags, kind, state)
            else:  # /proc/PID/maps, and so CRIU, give an anonymous mapping offset 0
                yield Mapping(start, end, 0, flags, kind, None)

    @staticmethod
    def _anonymous(file: drgn.Object) -> bool:
        """Whether ``file`` is the memory of an anonymous shared mapping (shmem's
        "dev/zero", made by mmap(MAP_SHARED | MAP_ANONYMOUS) or of /dev/zero)."""
        return (int(file.f_inode.i_sb.s_magic) == _TMPFS_MAGIC
                and file.f_path.dentry.d_name.name.string_() == b"dev/zero")

    def _shared_memory(self, file: drgn.Object, start: int) -> SharedMemoryState:
        """The memory of the anonymous shared mapping at ``start``, from its page cache.
        A page swapped out is refused."""
        inode = file.f_inode
        try:
            pages = tuple((index * PAGE, physical)
                          for index, physical in shmem_pages(self.guest, inode))
        except IntrospectionError as exc:
            raise self.refuse(f"its shared memory at {start:#x} {exc}") from exc
        info = drgn.container_of(inode, "struct shmem_inode_info", "vfs_inode")
        return SharedMemoryState(key=file.value_(), ino=int(inode.i_ino),
                                 size=int(inode.i_size), uid=int(inode.i_uid.val),
                                 gid=int(inode.i_gid.val), seals=int(info.seals),
                                 pages=pages)

    @staticmethod
    def _kept(state: FileState) -> bool:
        """Whether the new VM has regular file ``state`` as it was, which a shared mapping
        of it then shows: on a tmpfs (made there again, see ``FileState.tmpfs``), or on
        the data volume (its unwritten pages written back)."""
        return stat.S_ISREG(state.mode) and (
            state.tmpfs is not None or state.path.startswith(f"{DATA_MOUNT}/"))

    def _vdso_mark(self, mm: drgn.Object, vdso: int) -> tuple[int, int, int] | None:
        """CRIU's mark on the kernel's vdso, if its restorer left one: the addresses of
        the process's own vdso and vvar, and of the kernel's vvar."""
        try:
            pages = dict(PageTables.of(self.guest, int(mm.pgd)).pages(vdso, vdso + PAGE))
        except UnmovablePage:
            return None
        if vdso not in pages:  # never touched, so never marked
            return None
        signature, own_vdso, _, own_vvar, kernel_vvar = struct.unpack(
            "<5Q", bytes(self.guest.ram.read(pages[vdso], 40)))
        return (own_vdso, own_vvar, kernel_vvar) if signature == _CRIU_VDSO_MARK else None

    def _is_vvar(self, vma: drgn.Object) -> bool:
        try:
            name = drgn.cast("struct vm_special_mapping *", vma.vm_private_data).name
            return bool(name.string_() == b"[vvar]")
        except (drgn.FaultError, LookupError):
            return False

    def _pages(self, mm: drgn.Object, mappings: list[Mapping]) -> list[tuple[int, int]]:
        """The pages CRIU dumps: present pages of private mappings (the vDSO too, the
        vvar never), skipping the shared zero page and the file pages a private file
        mapping has not copied on write. The first page of the kernel's vDSO always:
        CRIU's restore reads its ELF header, and CRIU's dump touches it to that end,
        but a process that never called into it (or not since a restore moved it
        there) does not have it mapped; it is the kernel's own."""
        vdso = int(mm.context.vdso)
        tables = PageTables.of(self.guest, int(mm.pgd))
        zero = self.guest.physical(self.prog.symbol("empty_zero_page").address)
        page_struct = self.prog.type("struct page").size
        vmemmap = int(self.prog["vmemmap_base"])
        mapping_offset = drgn.offsetof(self.prog.type("struct page"), "mapping")
        pages: list[tuple[int, int]] = []
        for mapping in mappings:
            if mapping.kind == "vvar" or mapping.vm_flags & _VM_SHARED:
                continue
            try:
                for virtual, physical in tables.pages(mapping.start, mapping.end):
                    if physical == zero:
                        continue
                    if mapping.kind == "file":
                        descriptor = vmemmap + (physical // PAGE) * page_struct
                        owner = struct.unpack(
                            "<Q", self.guest.read(descriptor + mapping_offset, 8))[0]
                        if not owner & 1:  # PAGE_MAPPING_ANON: not copied on write yet
                            continue
                    if not self.guest.ram.covers(physical, PAGE):
                        raise self.refuse(f"its page {virtual:#x} points outside guest RAM")
                    pages.append((virtual, physical))
            except UnmovablePage as exc:
                raise self.refuse(str(exc)) from exc
            if mapping.start == vdso and not any(v == vdso for v, _ in pages):
                header = self.guest.physical(int(self.prog["vdso_image_64"].data))
                pages.append((vdso, header))
        return sorted(pages)

    # -- files -----------------------------------------------------------------------

    def _files(self) -> tuple[dict[int, tuple[OpenFile, bool]], list[FileLockState]]:
        """Its open files by descriptor, and the locks it holds through them."""
        fdt = self.task.files.fdt
        if int(fdt.max_fds) > 1 << 20:
            raise self.refuse("its file table is corrupt")
        cloexec = fdt.close_on_exec
        open_files = {}
        for count, (fd, file) in enumerate(for_each_file(self.task)):
            if count >= _MAX_FDS:
                raise self.refuse("its file table is corrupt (too many files)")
            if file:  # else reserved by an open (openat, socket, ...) not done yet,
                open_files[fd] = file  # which the restart makes again
        by_fd = {fd: file.value_() for fd, file in open_files.items()}
        result = {}
        for fd, file in open_files.items():
            word = int(cloexec[fd // 64])
            result[fd] = (self._open_file(file, fd, by_fd), bool(word >> (fd % 64) & 1))
        try:
            locks = read_locks(self.task, open_files)
        except IntrospectionError as exc:
            raise self.refuse(str(exc)) from exc
        return result, locks

    def _open_file(self, file: drgn.Object, fd: int, by_fd: dict[int, int]) -> OpenFile:
        kind = self.file_operations.get(file.f_op.value_())
        try:
            if kind == "pipefifo_fops":
                pipe = read_pipe(self.guest, file)
                if int(file.f_inode.i_sb.s_magic) == _PIPEFS_MAGIC:
                    return pipe
                path = self._linked_name(file)
                return replace(pipe, path=path, mode=int(file.f_inode.i_mode),
                               tmpfs=self._tmpfs(file.f_inode, path))
            if kind == "eventpoll_fops":
                return read_epoll(file, by_fd, self._in_epoll_wait)
            if kind == "socket_file_ops":
                if is_unix_socket(file):
                    return read_unix_socket(self.guest, file)
                return read_socket(self.guest, file, cut=self.cut.get(fd))
            if kind == "eventfd_fops":
                return read_eventfd(file)
            if kind == "signalfd_fops":
                return read_signalfd(file)
            if kind == "timerfd_fops":
                return read_timerfd(file)
        except (Unrecoverable, IntrospectionError) as exc:
            raise self.refuse(f"fd {fd} {exc}") from exc
        return self._file(file, f"fd {fd}")

    def _file(self, file: drgn.Object, what: str) -> FileState:
        if int(file.f_count.counter) <= 0:
            raise self.refuse(f"{what} is a file being freed")
        inode = file.f_inode
        mode = int(inode.i_mode)
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISCHR(mode)):
            raise self.refuse(f"{what} is {self._name(file.f_path)} (not supported yet)")
        if stat.S_ISCHR(mode):
            major = int(inode.i_rdev) >> 20
            if major != 1:  # /dev/null, /dev/zero, /dev/urandom ... (mem devices)
                raise self.refuse(f"{what} is a terminal or device (major {major}); "
                                  "not supported yet")
        try:
            path = self._linked_name(file)
        except Unrecoverable as exc:
            raise self.refuse(f"{what} {exc}") from exc
        dirty: tuple[tuple[int, int], ...] = ()
        tmpfs = None
        try:
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                tmpfs = self._tmpfs(inode, path)
            if tmpfs is None and stat.S_ISREG(mode) and path.startswith(f"{DATA_MOUNT}/"):
                dirty = dirty_pages(self.guest, inode)
        except IntrospectionError as exc:
            raise self.refuse(f"{what} ({path}) {exc}") from exc
        return FileState(path=path, flags=int(file.f_flags) & ~_O_CLOEXEC, pos=int(file.f_pos),
                         mode=mode, size=self.rewound.get(file.value_(), int(inode.i_size)),
                         key=file.value_(), dirty=dirty, tmpfs=tmpfs)

    def _tmpfs(self, inode: drgn.Object, path: str) -> TmpfsFile | None:
        """``inode`` at ``path`` to make again on the new VM, if on a tmpfs."""
        if int(inode.i_sb.s_magic) != _TMPFS_MAGIC:
            return None
        return read_tmpfs_file(self.guest, path, inode)

    def _linked_name(self, file: drgn.Object) -> str:
        """The path ``file`` was opened at (:class:`Unrecoverable` if unlinked since)."""
        dentry = file.f_path.dentry
        if not int(dentry.d_hash.pprev) and dentry.d_parent.value_() != dentry.value_():
            raise Unrecoverable("is a deleted file")
        return self._name(file.f_path)

    def _path(self, path: drgn.Object) -> FileState:
        """A directory (cwd, root), made again on the new VM if on a tmpfs."""
        inode = path.dentry.d_inode
        name = self._name(path)
        return FileState(path=name, flags=0, pos=0, mode=int(inode.i_mode),
                         size=int(inode.i_size), key=path.dentry.value_(),
                         tmpfs=self._tmpfs(inode, name))

    def _name(self, path: drgn.Object) -> str:
        name = d_path(path.address_of_())
        return name.decode(errors="surrogateescape")


def _load_vcpu_fpu(area: bytearray, vcpu: VcpuState,
                   layout: dict[int, tuple[int, int]]) -> int:
    """Write the vCPU's x87, SSE and AVX registers into ``area`` (XSAVE standard layout)
    as FXSAVE/XSAVE store them; the XSTATE_BV bits they fill. The x87 last-instruction
    pointers, which QEMU does not show, are left zero."""
    struct.pack_into("<HHBxHQQII", area, 0, vcpu.fcw, vcpu.fsw, vcpu.ftw, 0, 0, 0,
                     vcpu.mxcsr, struct.unpack_from("<I", area, 28)[0])
    top = vcpu.fsw >> 11 & 7
    for index in range(8):  # ST(i) in stack order, 16 bytes apart
        area[32 + 16 * index:48 + 16 * index] = vcpu.fpr[(top + index) & 7] + bytes(6)
    for index, register in enumerate(vcpu.xmm):
        area[160 + 16 * index:176 + 16 * index] = register
    filled = _XFEATURE_X87 | _XFEATURE_SSE
    if vcpu.ymm_high is not None and _XFEATURE_AVX_INDEX in layout:
        offset, _ = layout[_XFEATURE_AVX_INDEX]
        for index, register in enumerate(vcpu.ymm_high):
            area[offset + 16 * index:offset + 16 * (index + 1)] = register
        filled |= 1 << _XFEATURE_AVX_INDEX
    return filled


def _restart_syscall(regs: dict[str, int]) -> None:
    """Set a thread caught in a system call up to restart it, as CRIU does; and one whose
    call was still running (the entry code pushed -ENOSYS) the same way: it resumes by
    making that call again."""
    orig = regs["orig_ax"]
    if orig >= 1 << 63:  # not from a system call (IRQ or exception entry: -1)
        return
    result = -((1 << 64) - regs["ax"]) if regs["ax"] >= 1 << 63 else regs["ax"]
    if result in (-_ERESTARTSYS, -_ERESTARTNOINTR, -_ERESTARTNOHAND, -_ENOSYS):
        regs["ax"] = orig
        regs["ip"] -= 2
    elif result == -_ERESTART_RESTARTBLOCK:
        regs["ax"] = (-_EINTR) & 0xFFFF_FFFF_FFFF_FFFF
