"""CRIU images of a process read out of a stopped kernel.

The images are CRIU 3.17's own format, written with CRIU's own library
(pycriu, from Debian's criu package), so ``criu restore`` on any kernel CRIU
supports rebuilds the process by system calls, and ``crit decode`` reads every
file. The layout follows what ``criu dump`` writes for the same process (the
golden test compares the two field by field); ids are ours.
"""

from __future__ import annotations

import base64
import io
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transmigrate.introspect.clocks import KernelClocks
from transmigrate.introspect.epoll import EpollState
from transmigrate.introspect.eventfds import EventfdState, SignalfdState
from transmigrate.introspect.namespaces import TimeNamespaceState
from transmigrate.introspect.pagecache import TmpfsFile, UnwrittenFile
from transmigrate.introspect.pagetable import PAGE
from transmigrate.introspect.pipes import PipeState
from transmigrate.introspect.process import (
    FileState,
    Mapping,
    OpenFile,
    ProcessState,
    Registers,
    SharedMemoryState,
    ThreadState,
)
from transmigrate.introspect.ram import GuestRam
from transmigrate.introspect.sockets import SocketState, millisecond_timestamp
from transmigrate.introspect.timerfds import TimerfdState
from transmigrate.introspect.unix import UnixSocketState

__all__ = ["WRITEBACK", "write_images", "write_writeback"]

WRITEBACK = "writeback.bin"
"""Not a CRIU image: the dead kernel's unwritten file data and the tmpfs files the
processes use, for tm-writeback."""

_PE_PRESENT = 4
_TASK_ALIVE = 1
_SS_DISABLE = 2
_TLS_ENTRIES = (12, 13, 14)
"""GDT_ENTRY_TLS_MIN..MAX on x86-64."""
_EMPTY_TLS = {"base_addr": 0, "limit": 0, "seg_32bit": False, "contents_h": False,
              "contents_l": False, "read_exec_only": True, "limit_in_pages": False,
              "seg_not_present": True, "usable": False}
"""A TLS slot no one set, as get_thread_area() reports it."""
# vma_entry.status bits (criu/include/image.h)
_REGULAR, _VDSO, _HEAP = 0x1, 0x8, 0x20
_FILE_PRIVATE, _FILE_SHARED, _ANON_PRIVATE, _VVAR, _MEMFD = 0x40, 0x80, 0x200, 0x1000, 0x4000
_MAP_SHARED, _MAP_PRIVATE, _MAP_ANONYMOUS, _MAP_GROWSDOWN = 0x01, 0x02, 0x20, 0x0100
_O_ACCMODE = 0o3
_VM_GROWSDOWN = 0x100
_MADVISE = {0x0002_0000: 10, 0x0400_0000: 16, 0x2000_0000: 14, 0x4000_0000: 15,
            0x8000_0000: 12}
"""vm_flags bit -> the madvise() advice that sets it, as CRIU keeps them in vma.madv:
DONTFORK, DONTDUMP, HUGEPAGE, NOHUGEPAGE, MERGEABLE."""
_NAMESPACES = ("pid_ns_id", "net_ns_id", "ipc_ns_id", "uts_ns_id", "time_ns_id",
               "mnt_ns_id", "user_ns_id", "cgroup_ns_id")
"""In the order CRIU numbers the root namespaces; every process shares the VM's."""
_NET_NS_ID = _NAMESPACES.index("net_ns_id") + 1
_NETWORK_LOCK_NFTABLES = 1
"""How ``criu restore --tcp-established`` keeps packets off a connection it rebuilds:
with nftables, which the guest image has (CRIU's default would be iptables)."""
_FOWN = {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0}
_FDINFO_TYPES = {FileState: "REG", PipeState: "PIPE", EpollState: "EVENTPOLL",
                 SocketState: "INETSK", UnixSocketState: "UNIXSK", EventfdState: "EVENTFD",
                 SignalfdState: "SIGNALFD",
                 TimerfdState: "TIMERFD"}


def _fdinfo_type(state: OpenFile) -> str:
    if isinstance(state, PipeState) and state.fifo:
        return "FIFO"
    return _FDINFO_TYPES[type(state)]


class _Ids:
    """CRIU's file ids: one per distinct kernel object, numbered from 1."""

    def __init__(self) -> None:
        self._by_key: dict[int, int] = {}

    def __call__(self, key: int) -> int:
        return self._by_key.setdefault(key, len(self._by_key) + 1)


def write_images(processes: list[ProcessState], clocks: KernelClocks, ram: GuestRam,
                 directory: Path) -> list[Path]:
    """Write the CRIU image set of a process tree (its root first, each parent before its
    children) into ``directory`` (created); the files. A file open in several processes
    (inherited) is one entry, as the kernel has one ``struct file``. ``clocks`` (shifted
    by the tree's time namespace, if it has one) are where the restored tree's monotonic
    and boot-time clocks go on from."""
    directory.mkdir(parents=True, exist_ok=True)
    shift = processes[0].time_namespace or TimeNamespaceState(0, 0, 0)
    ids = _Ids()
    namespace_ids = {name: number for number, name in enumerate(_NAMESPACES, start=1)}
    root_ids = {"vm_id": 1, "files_id": 1, "fs_id": 1, "sighand_id": 1, **namespace_ids}
    files: dict[int, dict[str, Any]] = {}

    def file_id(state: FileState | SharedMemoryState, mapped: bool = False) -> int:
        """A mapped file (or the executable) is opened read-only at restore, and CRIU
        checks its size: it must be the same file on the new VM. Shared memory is a
        memfd's inode (see :func:`_shared_memory`)."""
        number = ids(state.key)
        if isinstance(state, SharedMemoryState):
            files.setdefault(number, {"type": "MEMFD", "id": number, "memfd": {
                "id": number, "flags": 0, "pos": 0, "fown": _FOWN, "inode_id": state.ino}})
            return number
        if number not in files:
            entry: dict[str, Any] = {
                "id": number, "flags": 0 if mapped else state.flags,
                "pos": 0 if mapped else state.pos, "fown": _FOWN,
                "name": state.path, "mode": state.mode}
            if mapped and stat.S_ISREG(state.mode):
                entry["size"] = state.size
            files[number] = {"type": "REG", "id": number, "reg": entry}
        return number

    def open_file_id(state: OpenFile) -> int:
        if isinstance(state, FileState):
            return file_id(state)
        number = ids(state.key)
        if number in files:
            return number
        if isinstance(state, PipeState) and state.fifo:
            # A FIFO, as CRIU dumps one: its path and flags in a regular file's entry of
            # their own, which the FIFO's entry names.
            regf = ids(~state.key)
            files[regf] = {"type": "REG", "id": regf, "reg": {
                "id": regf, "flags": state.flags, "pos": 0, "fown": _FOWN,
                "name": state.path, "mode": state.mode}}
            files[number] = {"type": "FIFO", "id": number, "fifo": {
                "id": number, "pipe_id": state.pipe_id, "regf_id": regf}}
        else:
            files[number] = _file_entry(state, number, clocks)
        return number

    written = [_dump(directory / "inventory.img", "INVENTORY", [{
        "img_version": 2, "fdinfo_per_id": True, "root_ids": root_ids, "ns_per_id": True,
        "lsmtype": "NO_LSM", "network_lock_method": _NETWORK_LOCK_NFTABLES}]),
        _dump(directory / "timens-0.img", "TIMENS", [{
            "monotonic": _timespec(clocks.monotonic_ns + shift.monotonic_ns),
            "boottime": _timespec(clocks.boottime_ns + shift.boottime_ns)}])]
    tree = []
    ipc_namespaces: dict[int, int] = {}  # by kernel object: numbered after the VM's
    for number, process in enumerate(processes, start=2):
        pid = process.pid
        own_ipc = {}
        if process.ipc_namespace is not None:
            key = process.ipc_namespace.key
            if key not in ipc_namespaces:
                ipc_namespaces[key] = len(_NAMESPACES) + 1 + len(ipc_namespaces)
                written.append(_dump(directory / f"ipcns-var-{ipc_namespaces[key]}.img",
                                     "IPC_VAR", [process.ipc_namespace.variables]))
            own_ipc = {"ipc_ns_id": ipc_namespaces[key]}
        task_ids = {"vm_id": number, "files_id": number, "fs_id": number,
                    "sighand_id": number, **namespace_ids, **own_ipc}
        fdinfo = [{"id": open_file_id(state), "flags": int(cloexec),
                   "type": _fdinfo_type(state), "fd": fd}
                  for fd, (state, cloexec) in sorted(process.files.items())]
        exe_id = file_id(process.exe, mapped=True)
        vmas = [_vma(mapping, file_id) for mapping in process.mappings]
        fs = {"cwd_id": file_id(process.cwd), "root_id": file_id(process.root),
              "umask": process.umask}
        tree.append({"pid": pid, "ppid": 0 if process is processes[0] else process.ppid,
                     "pgid": process.pgid, "sid": process.sid,
                     "threads": [t.tid for t in process.threads]})
        written += [
            _dump(directory / f"ids-{pid}.img", "IDS", [task_ids]),
            *(_dump(directory / f"core-{t.tid}.img", "CORE", [_core(process, t)])
              for t in process.threads),
            _dump(directory / f"mm-{pid}.img", "MM", [_mm(process, exe_id, vmas)]),
            _dump(directory / f"fs-{pid}.img", "FS", [fs]),
            _dump(directory / f"fdinfo-{number}.img", "FDINFO", fdinfo),
            *_pages(process.pages, number - 1, ram, directory, f"pagemap-{pid}.img")]
    written += [_dump(directory / "pstree.img", "PSTREE", tree),
                _dump(directory / "files.img", "FILES", [files[n] for n in sorted(files)]),
                *_streams(processes, directory)]
    shared = {m.shared.key: m.shared for process in processes for m in process.mappings
              if m.shared is not None}
    if shared:
        written += _shared_memory(list(shared.values()), len(processes) + 1, ram, directory)
    queued = _unix_queues(processes, ids)
    if queued:
        written.append(_dump(directory / "sk-queues.img", "SK_QUEUES", queued))
    locks = _file_locks(processes)
    if locks:  # restored by --file-locks, which fails without this image
        written.append(_dump(directory / "filelocks.img", "FILE_LOCKS", locks))
    referenced = [state for process in processes for state in (
        *(state for state, _ in process.files.values() if isinstance(state, FileState)),
        process.exe, *(m.file for m in process.mappings if m.file is not None))]
    fifos = [state for process in processes for state, _ in process.files.values()
             if isinstance(state, PipeState)]
    places = [place for process in processes for place in (process.cwd, process.root)]
    made: list[FileState | PipeState] = [*referenced, *places, *fifos]
    carried: dict[str, TmpfsFile | UnwrittenFile] = {
        state.tmpfs.path: state.tmpfs for state in made if state.tmpfs is not None}
    carried.update((state.path, UnwrittenFile(state.path, state.size, state.dirty))
                   for state in referenced if state.dirty)
    if carried:
        written.append(write_writeback(list(carried.values()), ram, directory / WRITEBACK))
    return written


def _shared_memory(memories: list[SharedMemoryState], first_pages_id: int, ram: GuestRam,
                   directory: Path) -> list[Path]:
    """memfd.img (one inode per memory; CRIU 3.17 takes anonymous shared memory for a
    memfd named /dev/zero, and rebuilds it as one) and each one's pages in
    pagemap-shmem-INODE.img."""
    written = [_dump(directory / "memfd.img", "MEMFD_INODE", [
        {"name": "/dev/zero", "uid": m.uid, "gid": m.gid, "size": m.size, "shmid": m.ino,
         "seals": m.seals, "inode_id": m.ino} for m in memories])]
    for number, memory in enumerate(memories, start=first_pages_id):
        written += _pages(list(memory.pages), number, ram, directory,
                          f"pagemap-shmem-{memory.ino}.img")
    return written


def _unix_queues(processes: list[ProcessState], ids: _Ids) -> list[dict[str, Any]]:
    """sk-queues.img's entries: what waits in each UNIX socket (once, though several
    processes have it open), piece by piece, for the socket's file id."""
    sockets = {state.key: state for process in processes
               for state, _ in process.files.values() if isinstance(state, UnixSocketState)}
    return [{"id_for": ids(state.key), "length": len(piece), "extra": _base64(piece)}
            for state in sockets.values() for piece in state.queue]


def _file_locks(processes: list[ProcessState]) -> list[dict[str, Any]]:
    """filelocks.img's entries: each POSIX lock with its owner; each flock lock once,
    though several processes share its file, with the one that took it if it is
    there (as CRIU's dump picks)."""
    entries: list[dict[str, Any]] = []
    flocks: dict[int, int] = {}  # by file: its entry
    for process in processes:
        for lock in process.locks:
            entry = {"flag": lock.kind, "type": lock.type, "pid": process.pid,
                     "fd": lock.fd, "start": lock.start, "len": lock.length}
            if not lock.file:
                entries.append(entry)
            elif lock.file not in flocks:
                flocks[lock.file] = len(entries)
                entries.append(entry)
            elif process.pid == lock.taker:
                entries[flocks[lock.file]] = entry
    return entries


def _timespec(nanoseconds: int) -> dict[str, int]:
    return {"tv_sec": nanoseconds // 10**9, "tv_nsec": nanoseconds % 10**9}


def _file_entry(state: OpenFile, number: int, clocks: KernelClocks) -> dict[str, Any]:
    """files.img's entry for a descriptor that is not a regular file (``clocks``: when
    the kernel stopped, for the time a timer has left)."""
    if isinstance(state, PipeState):
        return {"type": "PIPE", "id": number, "pipe": {
            "id": number, "pipe_id": state.pipe_id, "flags": state.flags, "fown": _FOWN}}
    if isinstance(state, EpollState):
        return {"type": "EVENTPOLL", "id": number, "epfd": {
            "id": number, "flags": state.flags, "fown": _FOWN,
            "tfd": [{"id": 0, "tfd": t.fd, "events": t.events, "data": t.data,
                     "dev": t.dev, "inode": t.inode, "pos": t.pos} for t in state.targets]}}
    if isinstance(state, EventfdState):
        return {"type": "EVENTFD", "id": number, "efd": {
            "id": number, "flags": state.flags, "fown": _FOWN, "counter": state.counter}}
    if isinstance(state, TimerfdState):
        remaining = state.remaining_ns(clocks)
        return {"type": "TIMERFD", "id": number, "tfd": {
            "id": number, "flags": state.flags, "fown": _FOWN, "clockid": state.clockid,
            "ticks": state.ticks, "settime_flags": state.settime_flags,
            "vsec": remaining // 10**9, "vnsec": remaining % 10**9,
            "isec": state.interval_ns // 10**9, "insec": state.interval_ns % 10**9}}
    if isinstance(state, UnixSocketState):
        return {"type": "UNIXSK", "id": number, "usk": {
            "id": number, "ino": state.ino, "type": state.type, "state": state.state,
            "flags": state.flags, "uflags": 0, "backlog": state.backlog, "peer": state.peer,
            "fown": _FOWN, "opts": state.options, "name": b"", "ns_id": _NET_NS_ID,
            **({"shutdown": state.shutdown} if state.shutdown else {})}}
    if isinstance(state, SignalfdState):
        return {"type": "SIGNALFD", "id": number, "sgfd": {
            "id": number, "flags": state.flags, "fown": _FOWN, "sigmask": state.sigmask}}
    assert isinstance(state, SocketState)
    return {"type": "INETSK", "id": number, "isk": {
        "id": number, "ino": state.ino, "family": state.family, "type": "STREAM",
        "proto": "TCP", "state": state.state, "src_port": state.src_port,
        "dst_port": state.dst_port, "flags": state.flags, "backlog": state.backlog,
        "src_addr": [state.src_addr], "dst_addr": [state.dst_addr], "fown": _FOWN,
        "opts": state.options, "ip_opts": {}, "ns_id": _NET_NS_ID,
        **({"v6only": state.v6only} if state.family == "INET6" else {}),
        **({"shutdown": state.shutdown} if state.shutdown else {})}}


def _streams(processes: list[ProcessState], directory: Path) -> list[Path]:
    """The bytes in flight: each pipe's (once, though both ends are open) in
    pipes-data.img, each FIFO's in fifo-data.img, and each connection's queues in
    tcp-stream-<inode>.img (once, though several processes have it open)."""
    open_files = list({state.key: state for process in processes
                       for state, _ in process.files.values()}.values())
    written = []
    for fifos, image, magic in ((False, "pipes-data.img", "PIPES_DATA"),
                                (True, "fifo-data.img", "FIFO_DATA")):
        pipes = {p.pipe_id: p for p in open_files
                 if isinstance(p, PipeState) and p.fifo == fifos}
        if pipes:
            written.append(_dump(directory / image, magic, [
                {"pipe_id": p.pipe_id, "bytes": len(p.data), "size": p.size,
                 "extra": _base64(p.data)} for p in pipes.values()]))
    for state in open_files:
        if isinstance(state, SocketState) and state.stream is not None:
            stream = state.stream
            written.append(_dump(directory / f"tcp-stream-{state.ino:x}.img", "TCP_STREAM", [
                {**stream.fields,
                 "timestamp": millisecond_timestamp(int(stream.fields["timestamp"])),
                 "extra": {"inq": _base64(stream.inq), "outq": _base64(stream.outq)}}]))
    return written


def _base64(data: bytes) -> str:
    """pycriu carries the raw bytes after an entry as base64 text."""
    return base64.encodebytes(data).decode()


def write_writeback(files: Sequence[TmpfsFile | UnwrittenFile], ram: GuestRam,
                    path: Path) -> Path:
    """What the guest tool tm-writeback writes before the restore: the dirty pages of
    ``files`` on the volume, and their sizes; a tmpfs's files (and FIFOs) whole, made
    again with their owner and mode."""
    with path.open("wb") as out:
        for state in files:
            name = state.path.encode(errors="surrogateescape")
            out.write(struct.pack("<I", len(name)) + name)
            made = (state.mode, state.uid, state.gid) if isinstance(state, TmpfsFile) \
                else (0, 0, 0)
            out.write(struct.pack("<QIIII", state.size, *made, len(state.dirty)))
            for index, physical in state.dirty:
                start = ram.offset(physical, PAGE)
                out.write(struct.pack("<Q", index) + ram.buffer[start:start + PAGE])
    return path


def _dump(path: Path, magic: str, entries: list[dict[str, Any]]) -> Path:
    # Here, not at the top: pycriu loads ~80 protobuf modules (about 50 ms), which
    # every other transmigrate command would pay at start-up.
    import pycriu.images  # type: ignore[import-untyped]

    buffer = io.BytesIO()
    pycriu.images.dump({"magic": magic, "entries": [_no_empty(e) for e in entries]}, buffer)
    path.write_bytes(buffer.getvalue())
    return path


def _no_empty(entry: dict[str, Any]) -> dict[str, Any]:
    """Without empty repeated fields, which pycriu cannot write (and mean "none")."""
    return {key: _no_empty(value) if isinstance(value, dict) else value
            for key, value in entry.items() if value != []}


def _vma(mapping: Mapping, file_id: Any) -> dict[str, Any]:
    prot = mapping.vm_flags & 0x7  # VM_READ|VM_WRITE|VM_EXEC are PROT_READ|WRITE|EXEC
    vma: dict[str, Any] = {"start": mapping.start, "end": mapping.end, "pgoff": mapping.pgoff,
                           "shmid": 0, "prot": prot, "flags": _MAP_PRIVATE, "fd": -1}
    if mapping.kind == "file":
        assert mapping.file is not None
        vma.update(status=_REGULAR | _FILE_PRIVATE, fdflags=0,
                   shmid=file_id(mapping.file, mapped=True))
    elif mapping.kind == "shared-file":  # its pages are the file's: none dumped
        assert mapping.file is not None
        vma.update(status=_REGULAR | _FILE_SHARED, flags=_MAP_SHARED,
                   fdflags=mapping.file.flags & _O_ACCMODE,
                   shmid=file_id(mapping.file, mapped=True))
    elif mapping.shared is not None:  # as CRIU 3.17 dumps it: a memfd named /dev/zero
        vma.update(status=_REGULAR | _FILE_SHARED | _MEMFD, flags=_MAP_SHARED,
                   fdflags=os.O_RDWR, shmid=file_id(mapping.shared))
    else:
        vma["flags"] |= _MAP_ANONYMOUS
        vma["status"] = _REGULAR | _ANON_PRIVATE | {
            "heap": _HEAP, "vdso": _VDSO, "vvar": _VVAR}.get(mapping.kind, 0)
    if mapping.vm_flags & _VM_GROWSDOWN:
        vma["flags"] |= _MAP_GROWSDOWN
    madv = sum(1 << advice for flag, advice in _MADVISE.items() if mapping.vm_flags & flag)
    if madv:
        vma["madv"] = madv
    return vma


def _mm(process: ProcessState, exe_id: int, vmas: list[dict[str, Any]]) -> dict[str, Any]:
    mm = process.mm
    return {**{f"mm_{name}": mm[name] for name in (
        "start_code", "end_code", "start_data", "end_data", "start_stack", "start_brk",
        "brk", "arg_start", "arg_end", "env_start", "env_end")},
        "exe_file_id": exe_id, "mm_saved_auxv": mm["auxv"], "vmas": vmas,
        "dumpable": mm["dumpable"], "thp_disabled": mm["thp_disabled"]}


def _core(process: ProcessState, thread: ThreadState) -> dict[str, Any]:
    """A thread's core image; the leader's also holds what the process shares (tc)."""
    regs = thread.registers
    gp: dict[str, Any] = dict(regs.general)
    gp.update(fs_base=regs.fs_base, gs_base=regs.gs_base, ds=regs.ds, es=regs.es,
              fs=regs.fsindex, gs=regs.gsindex, mode="NATIVE")
    sp, size, flags = thread.sigaltstack
    thread_core: dict[str, Any] = {
        "futex_rla": thread.robust_list[0], "futex_rla_len": thread.robust_list[1],
        "sched_nice": thread.nice, "sched_policy": thread.policy,
        "sas": {"ss_sp": sp, "ss_size": size, "ss_flags": flags if size else _SS_DISABLE},
        "creds": thread.credentials, "comm": thread.comm, "signals_p": {}}
    if thread.pdeath_signal:
        thread_core["pdeath_sig"] = thread.pdeath_signal
    if thread.policy:
        thread_core["sched_prio"] = thread.rt_priority
    if thread.rseq is not None:
        pointer, size, signature = thread.rseq
        thread_core["rseq_entry"] = {"rseq_abi_pointer": pointer, "rseq_abi_size": size,
                                     "signature": signature}
    core: dict[str, Any] = {
        "mtype": "X86_64",
        "thread_info": {"clear_tid_addr": thread.clear_tid_address, "gpregs": gp,
                        "fpregs": _fpregs(regs), "tls": [_EMPTY_TLS | {"entry_number": n}
                                                         for n in _TLS_ENTRIES]},
        "thread_core": thread_core,
    }
    if thread is not process.leader:
        thread_core["blk_sigset"] = thread.blocked
        return core
    no_timer = {"isec": 0, "iusec": 0, "vsec": 0, "vusec": 0}
    core["tc"] = {
        "task_state": _TASK_ALIVE, "exit_code": 0, "personality": process.personality,
        "flags": process.task_flags, "blk_sigset": thread.blocked, "comm": thread.comm,
        "timers": {"real": no_timer, "virt": no_timer, "prof": no_timer},
        "rlimits": {"rlimits": [{"cur": cur, "max": top} for cur, top in process.rlimits]},
        "signals_s": {}, "loginuid": process.loginuid, "oom_score_adj": process.oom_score_adj,
        "sigactions": [{"sigaction": handler, "flags": flags, "restorer": restorer,
                        "mask": mask, "compat_sigaction": False}
                       for handler, flags, restorer, mask in process.sigactions],
        "child_subreaper": process.child_subreaper}
    return core


_XSAVE_ARRAYS = {2: ("ymmh_space", 4), 4: ("bndcsr_state", 8), 5: ("opmask_reg", 8),
                 6: ("zmm_upper", 8), 7: ("hi16_zmm", 8), 9: ("pkru", 4)}
"""CRIU's array for each XSAVE component it keeps, and its element size. Not MPX's
bound registers (3): CRIU 3.17's supervisor mask has ``XFEATURE_HDC`` (10, not its
mask), which clears bit 3 from the features it dumps and restores."""


def _fpregs(regs: Registers) -> dict[str, Any]:
    """The legacy FXSAVE image, and each extended component the CPU has, as CRIU's
    dump writes them (from ptrace's view of the area)."""
    xsave = regs.xsave

    def number(offset: int, size: int) -> int:
        return int.from_bytes(xsave[offset:offset + size], "little")

    def words(offset: int, count: int, size: int = 4) -> list[int]:
        return [number(offset + size * i, size) for i in range(count)]

    fpregs: dict[str, Any] = {
        "cwd": number(0, 2), "swd": number(2, 2), "twd": number(4, 2), "fop": number(6, 2),
        "rip": number(8, 8), "rdp": number(16, 8), "mxcsr": number(24, 4),
        "mxcsr_mask": number(28, 4), "st_space": words(32, 32), "xmm_space": words(160, 64)}
    if regs.components:
        extended: dict[str, Any] = {"xstate_bv": regs.xfeatures}
        for feature, (offset, size) in sorted(regs.components.items()):
            if feature in _XSAVE_ARRAYS:
                name, element = _XSAVE_ARRAYS[feature]
                extended[name] = words(offset, size // element, element)
        fpregs["xsave"] = extended
    return fpregs


def _pages(pages: list[tuple[int, int]], number: int, ram: GuestRam, directory: Path,
           pagemap: str) -> list[Path]:
    """``pagemap`` (runs of consecutive pages: by virtual address for a process, by
    offset for shared memory) and pages-NUMBER.img (their bytes), written in as few
    pieces as the RAM file's layout allows."""
    runs: list[dict[str, Any]] = []
    data = directory / f"pages-{number}.img"
    pending_start = pending_end = 0
    with data.open("wb") as out, memoryview(ram.buffer) as memory:
        for virtual, physical in pages:
            if runs and runs[-1]["vaddr"] + runs[-1]["nr_pages"] * PAGE == virtual:
                runs[-1]["nr_pages"] += 1
            else:
                runs.append({"vaddr": virtual, "nr_pages": 1, "flags": _PE_PRESENT})
            start = ram.offset(physical, PAGE)
            if start != pending_end:
                out.write(memory[pending_start:pending_end])
                pending_start = start
            pending_end = start + PAGE
        out.write(memory[pending_start:pending_end])
    return [_dump(directory / pagemap, "PAGEMAP", [{"pages_id": number}, *runs]), data]
