#!/usr/bin/python3
"""A process tree holding every kind of kernel state a move must keep.

Runs in a guest from its own directory on the volume (/data/zoo, say), where it
keeps its files. ``zoo.py`` sets everything up and writes its pid to ``pid`` there.
On SIGUSR1 it checks each resource from inside and writes ``report.json`` there:
{kind: [ok, detail]}.
The host moves it between the setup and the signal. With ``--container`` it
also holds what only a process in its own namespaces can move: SysV shared
memory (IPC namespace) and its own host name (UTS namespace).
"""
import ctypes
import fcntl
import json
import mmap
import os
import select
import signal
import socket
import struct
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CGROUP = f"/sys/fs/cgroup/{os.path.basename(HERE)}"
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
PATTERN = bytes(range(256)) * 16  # 4 KiB
CONTAINER = "--container" in sys.argv  # running in its own pid/ipc/uts/net namespaces
SIGNALFD_SIG = signal.SIGRTMIN + 2


class Counter:
    value = 0


alarms, usr2, report_wanted = Counter(), Counter(), Counter()


def read(path, mode="r"):
    with open(path, mode) as handle:
        return handle.read()


def sigset(*signals):
    raw = bytearray(128)
    for sig in signals:
        raw[(sig - 1) // 8] |= 1 << ((sig - 1) % 8)
    return bytes(raw)


def setup():
    # Blocked before any thread exists, so that no thread can take these signals.
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGWINCH, SIGNALFD_SIG])
    os.makedirs(HERE, exist_ok=True)
    os.makedirs(CGROUP, exist_ok=True)
    with open(f"{CGROUP}/cgroup.procs", "w") as handle:
        handle.write(str(os.getpid()))
    s = {"pid": os.getpid(), "cgroup": read("/proc/self/cgroup")}

    s["anon"] = bytearray(PATTERN * 64)
    s["anon_map"] = mmap.mmap(-1, len(PATTERN) * 64)
    s["anon_map"][:] = PATTERN * 64

    path = f"{HERE}/mapped"
    with open(path, "wb") as handle:
        handle.write(PATTERN * 4)
    fd = os.open(path, os.O_RDWR)
    s["file_shared"] = mmap.mmap(fd, len(PATTERN) * 4, mmap.MAP_SHARED)
    s["file_private"] = mmap.mmap(fd, len(PATTERN) * 4, mmap.MAP_PRIVATE)
    os.close(fd)
    s["file_shared"][:5] = b"moved"
    s["file_private"][:7] = b"private"

    s["shared_anon"] = mmap.mmap(-1, 4096, mmap.MAP_SHARED)
    if CONTAINER:  # CRIU moves SysV IPC only with its namespace
        shm_id = libc.shmget(0, 8192, 0o600 | 0o1000)  # IPC_PRIVATE, IPC_CREAT
        s["shm_addr"] = libc.shmat(shm_id, None, 0)
        ctypes.memmove(s["shm_addr"], PATTERN, len(PATTERN))
        socket.sethostname("zoo-box")
    memfd = os.memfd_create("zoo")
    os.write(memfd, PATTERN)
    s["memfd"], s["memfd_map"] = memfd, mmap.mmap(memfd, len(PATTERN))

    stream_parent, stream_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    s["dgram"] = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    s["dgram"][0].send(b"queued datagram")
    child = os.fork()
    if child == 0:
        stream_parent.close()
        counter = 0
        while True:  # bump shared memory; answer pings on the stream socket
            counter += 1
            s["shared_anon"][:8] = struct.pack("Q", counter)
            ready, _, _ = select.select([stream_child], [], [], 0.05)
            if ready:
                data = stream_child.recv(64)
                if not data:
                    os._exit(0)
                stream_child.sendall(b"pong:" + data)
    stream_child.close()
    s["child"], s["stream"] = child, stream_parent

    s["thread_count"] = Counter()

    def worker():
        while True:
            s["thread_count"].value += 1
            time.sleep(0.01)

    threading.Thread(target=worker, daemon=True).start()

    signal.signal(signal.SIGALRM, lambda *_: setattr(alarms, "value", alarms.value + 1))
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    signal.signal(signal.SIGUSR2, lambda *_: setattr(usr2, "value", usr2.value + 1))
    signal.signal(signal.SIGUSR1, lambda *_: setattr(report_wanted, "value", 1))
    os.kill(os.getpid(), signal.SIGWINCH)  # stays pending
    s["signalfd"] = libc.signalfd(-1, sigset(SIGNALFD_SIG), os.O_NONBLOCK)
    os.kill(os.getpid(), SIGNALFD_SIG)

    s["timerfd"] = libc.timerfd_create(1, 0)  # CLOCK_MONOTONIC
    spec = struct.pack("qqqq", 0, 50_000_000, 0, 50_000_000)
    libc.timerfd_settime(s["timerfd"], 0, spec, None)

    s["regular"] = os.open(f"{HERE}/regular", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(s["regular"], PATTERN)
    os.lseek(s["regular"], 1234, os.SEEK_SET)

    s["pipe"] = os.pipe()
    os.write(s["pipe"][1], b"in the pipe")
    fifo = f"{HERE}/fifo"
    if not os.path.exists(fifo):
        os.mkfifo(fifo)
    s["fifo"] = os.open(fifo, os.O_RDWR)
    os.write(s["fifo"], b"in the fifo")

    s["eventfd"] = os.eventfd(5)
    s["epoll"] = select.epoll()
    s["epoll"].register(s["eventfd"], select.EPOLLIN)

    ghost = f"{HERE}/ghost"
    s["ghost"] = os.open(ghost, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(s["ghost"], b"unlinked but open")
    os.unlink(ghost)
    return s


def check(s):
    def ok(cond, detail=""):
        return [bool(cond), str(detail)]

    r = {"pid": ok(os.getpid() == s["pid"], os.getpid())}
    r["cgroup"] = ok(read("/proc/self/cgroup") == s["cgroup"], s["cgroup"].strip())
    r["memory_anonymous"] = ok(s["anon"] == PATTERN * 64 and s["anon_map"][:] == PATTERN * 64)
    r["memory_file_shared"] = ok(s["file_shared"][:5] == b"moved" and
                                 read(f"{HERE}/mapped", "rb")[:5] == b"moved")
    r["memory_file_private"] = ok(s["file_private"][:7] == b"private" and
                                  read(f"{HERE}/mapped", "rb")[:7] != b"private")
    before = struct.unpack("Q", s["shared_anon"][:8])[0]
    time.sleep(0.3)
    after = struct.unpack("Q", s["shared_anon"][:8])[0]
    r["memory_shared_with_child"] = ok(after > before > 0, f"{before} -> {after}")
    if CONTAINER:
        r["sysv_shm"] = ok(ctypes.string_at(s["shm_addr"], len(PATTERN)) == PATTERN)
        r["uts_namespace"] = ok(socket.gethostname() == "zoo-box", socket.gethostname())
    r["memfd"] = ok(s["memfd_map"][:] == PATTERN and os.pread(s["memfd"], 16, 0) == PATTERN[:16])
    count = s["thread_count"].value
    time.sleep(0.2)
    r["threads"] = ok(s["thread_count"].value > count, f"{count} -> {s['thread_count'].value}")
    alarm_count = alarms.value
    time.sleep(0.3)
    r["itimer"] = ok(alarms.value > alarm_count, f"{alarm_count} -> {alarms.value}")
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.05)
    r["signal_handler"] = ok(usr2.value == 1, usr2.value)
    r["pending_signal"] = ok(signal.SIGWINCH in signal.sigpending())
    try:
        info = os.read(s["signalfd"], 128)
        r["signalfd"] = ok(struct.unpack_from("I", info)[0] == SIGNALFD_SIG)
    except OSError as exc:
        r["signalfd"] = ok(False, exc)
    expirations = struct.unpack("Q", os.read(s["timerfd"], 8))[0]
    r["timerfd"] = ok(expirations >= 1, expirations)
    flags = fcntl.fcntl(s["regular"], fcntl.F_GETFL)
    r["file_offset_flags"] = ok(os.lseek(s["regular"], 0, os.SEEK_CUR) == 1234 and
                                flags & os.O_APPEND, f"flags {flags:o}")
    r["pipe"] = ok(os.read(s["pipe"][0], 64) == b"in the pipe")
    r["fifo"] = ok(os.read(s["fifo"], 64) == b"in the fifo")
    r["epoll"] = ok(s["epoll"].poll(0) == [(s["eventfd"], select.EPOLLIN)])
    r["eventfd"] = ok(os.eventfd_read(s["eventfd"]) == 5)
    r["unlinked_file"] = ok(os.pread(s["ghost"], 64, 0) == b"unlinked but open" and
                            os.fstat(s["ghost"]).st_nlink == 0)
    s["stream"].sendall(b"ping")
    s["stream"].settimeout(5)
    r["unix_stream"] = ok(s["stream"].recv(64) == b"pong:ping")
    r["unix_dgram"] = ok(s["dgram"][1].recv(64) == b"queued datagram")
    return r


def main():
    state = setup()
    with open(f"{HERE}/pid.tmp", "w") as handle:
        handle.write(str(os.getpid()))
    os.rename(f"{HERE}/pid.tmp", f"{HERE}/pid")
    while True:
        if report_wanted.value:
            report_wanted.value = 0
            with open(f"{HERE}/report.tmp", "w") as handle:
                json.dump(check(state), handle)
            os.rename(f"{HERE}/report.tmp", f"{HERE}/report.json")
        time.sleep(0.05)


main()
