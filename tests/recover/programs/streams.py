"""Stage 2-3 recovery program: bytes in flight in a pipe and in both directions of a
TCP connection, an epoll set watching them, and a listening socket.

streams.py PORT
Listens on 127.0.0.1:PORT, connects to itself and accepts; the client end sends
1000 bytes the server end never reads; the server end sends until its send buffer
is full and the client end reads nothing (so bytes wait in the client's receive
queue and in the server's send queue), until nothing moves; 5000 bytes wait in a
pipe; an eventfd counts 42; a signalfd reads SIGUSR1 and SIGUSR2; a monotonic timerfd
fires in 1000 s, then every 7.25 s. An epoll set watches all but the timer. Beside
itself, it holds streams.records with two POSIX locks (bytes 0-9 for reading, 100 to
the end for writing) and streams.flock with a flock lock, and the FIFO streams.fifo
holding 600 bytes; a UNIX stream socketpair holds bytes both ways, a datagram one
three messages. It prints
"ready" and waits in pause(), leaving everything as it is (for the golden comparison
with criu dump).
"""

import ctypes
import fcntl
import os
import select
import signal
import socket
import struct
import sys
import termios
import time

port = int(sys.argv[1])
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(8)
client = socket.create_connection(("127.0.0.1", port))
client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
server, _ = listener.accept()
server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
client.sendall(bytes(range(256)) * 3 + b"x" * 232)
server.setblocking(False)
chunk = bytes(i * 7 % 251 for i in range(65536))
try:
    while True:
        server.send(chunk)
except BlockingIOError:
    pass

def queued() -> tuple[int, int]:
    """Bytes waiting: in the client's receive queue, in the server's send queue."""
    def ask(sock: socket.socket, request: int) -> int:
        return int(struct.unpack("i", fcntl.ioctl(sock, request, b"\0" * 4))[0])
    return ask(client, termios.FIONREAD), ask(server, termios.TIOCOUTQ)


# Until the client's window has closed and nothing moves any more.
still, last = 0, queued()
while still < 10:
    time.sleep(0.1)
    now = queued()
    still, last = (still + 1 if now == last else 0), now
reader, writer = os.pipe()
os.write(writer, b"pipe " * 1000)
counter = os.eventfd(5, os.EFD_NONBLOCK)
os.eventfd_write(counter, 37)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
mask = ctypes.c_uint64(1 << (signal.SIGUSR1 - 1) | 1 << (signal.SIGUSR2 - 1))
signals = ctypes.CDLL(None, use_errno=True).signalfd(-1, ctypes.byref(mask),
                                                      os.O_NONBLOCK | os.O_CLOEXEC)
assert signals >= 0, ctypes.get_errno()
libc = ctypes.CDLL(None, use_errno=True)
timer = libc.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
assert timer >= 0, ctypes.get_errno()
when = (ctypes.c_long * 4)(7, 250_000_000, 1000, 0)  # struct itimerspec: interval, value
assert libc.timerfd_settime(timer, 0, when, None) == 0, ctypes.get_errno()
poll = select.epoll()
for fd, events in ((reader, select.EPOLLIN), (counter, select.EPOLLIN),
                   (signals, select.EPOLLIN), (listener.fileno(), select.EPOLLIN),
                   (client.fileno(), select.EPOLLIN | select.EPOLLET),
                   (server.fileno(), select.EPOLLOUT)):
    poll.register(fd, events)
# UNIX socketpairs: a stream with bytes waiting both ways (one side more than a
# peek's piece), and datagrams waiting as three messages.
left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
right.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # peeked in 8160-byte pieces
left.sendall(bytes(i * 13 % 256 for i in range(12000)))
right.sendall(b"back " * 100)
mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
for message in (b"one", b"two" * 100, b"three"):  # not empty: CRIU's peek stops there
    theirs.send(message)
here = os.path.dirname(os.path.abspath(__file__))
records = open(os.path.join(here, "streams.records"), "w+b")  # noqa: SIM115 (held)
records.write(b"r" * 200)
records.flush()
fcntl.lockf(records, fcntl.LOCK_SH, 10, 0)
fcntl.lockf(records, fcntl.LOCK_EX, 0, 100)
whole = open(os.path.join(here, "streams.flock"), "w")  # noqa: SIM115 (held)
fcntl.flock(whole, fcntl.LOCK_EX)
# A FIFO beside it, open for reading and writing (so that no open waits for the other
# end), 600 bytes in it.
named = os.path.join(here, "streams.fifo")
if os.path.exists(named):
    os.unlink(named)
os.mkfifo(named, 0o640)
fifo = os.open(named, os.O_RDWR | os.O_NONBLOCK)
os.write(fifo, b"fifo " * 120)
print("ready", flush=True)
signal.pause()
