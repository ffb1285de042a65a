"""UNIX sockets without a name, as a stopped kernel holds them: socketpairs (nginx's
master and workers, a program and its helper) with the bytes in flight.

What CRIU's dump takes from ``sock_diag`` and by peeking the receive queue is read
from ``struct unix_sock``: type, state, peer, shutdown, options, and each queued
buffer's unread bytes. ``criu restore`` pairs the two ends again and sends the bytes
back into the queues. Both ends must go with the process tree (CRIU's dump also
needs them). Named sockets (a path or an abstract name), listeners, and bytes that
carry descriptors or credentials are refused.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import drgn

from transmigrate.errors import Unrecoverable
from transmigrate.introspect.kernel import Guest
from transmigrate.introspect.sockets import skb_list, skb_payload, socket_options

__all__ = ["UnixSocketState", "is_unix_socket", "read_unix_socket"]

_TCP_ESTABLISHED, _TCP_CLOSE = 1, 7
_TYPES: dict[int, str] = {socket.SOCK_STREAM: "STREAM", socket.SOCK_DGRAM: "DGRAM",
                          socket.SOCK_SEQPACKET: "SEQPACKET"}
_SHUTDOWN_BOTH = 3
_SOCK_PASSCRED = 3
"""And SOCK_PASSSEC the next bit: #defines, not in the debug info."""
_CMSG_ROOM = 32
"""CRIU peeks a stream's queue in pieces of its send buffer less this (sk-queue.c)."""


@dataclass(frozen=True)
class UnixSocketState:
    """An unnamed UNIX socket (CRIU's unix_sk_entry) and its unread bytes, one piece
    per message as CRIU's dump peeks them (a stream's in pieces of its send buffer)."""

    key: int
    """The ``struct file``."""
    ino: int
    type: str
    state: str
    """"ESTABLISHED" (connected) or "CLOSE" (not)."""
    flags: int
    backlog: int
    """Bytes it sent that its peer has not read (sock_diag's write-queue figure)."""
    peer: int
    """Its peer's inode number; 0 if it has none (or its peer was closed)."""
    shutdown: int
    options: dict[str, int | bool]
    queue: tuple[bytes, ...]


def is_unix_socket(file: drgn.Object) -> bool:
    """Whether the socket open as ``file`` is a UNIX one."""
    sk = drgn.cast("struct socket *", file.private_data).sk
    return bool(sk) and int(sk.__sk_common.skc_family) == socket.AF_UNIX


def read_unix_socket(guest: Guest, file: drgn.Object) -> UnixSocketState:
    """Read the UNIX socket open as ``file``; :class:`Unrecoverable` for what CRIU or
    this reader cannot rebuild, or a socket caught mid-update."""
    sock = drgn.cast("struct socket *", file.private_data)
    sk = sock.sk
    if not sk:
        raise Unrecoverable("is a socket without a sock (being closed)")
    unix = drgn.cast("struct unix_sock *", sk)
    kind = int(sk.sk_type)
    if kind not in _TYPES:
        raise Unrecoverable(f"is a UNIX socket of type {kind} (not supported yet)")
    if unix.addr:
        raise Unrecoverable("is a named UNIX socket (not supported yet)")
    if int(unix.lock.rlock.raw_lock.val.counter) or int(unix.iolock.owner.counter) \
            or int(sk.sk_receive_queue.lock.rlock.raw_lock.val.counter):
        raise Unrecoverable("is a UNIX socket caught mid-update (its lock held)")
    if guest.has("struct unix_sock", "oob_skb") and unix.oob_skb:
        raise Unrecoverable("is a UNIX socket with an out-of-band byte (not supported yet)")
    if _passes_credentials(guest, sock, sk):
        raise Unrecoverable("is a UNIX socket passing credentials (not supported yet)")
    state = int(sk.__sk_common.skc_state)
    peer = _peer_inode(unix.peer)
    shutdown = int(sk.sk_shutdown)
    if state == _TCP_ESTABLISHED and not peer and shutdown != _SHUTDOWN_BOTH \
            and kind != socket.SOCK_DGRAM:
        raise Unrecoverable("is a UNIX socket whose peer is gone")
    if state not in (_TCP_ESTABLISHED, _TCP_CLOSE):
        raise Unrecoverable(f"is a UNIX socket in state {state} (not supported yet)")
    options = socket_options(guest, sk)
    return UnixSocketState(
        key=file.value_(), ino=int(file.f_inode.i_ino), type=_TYPES[kind],
        state="ESTABLISHED" if state == _TCP_ESTABLISHED else "CLOSE",
        flags=int(file.f_flags) & ~os.O_CLOEXEC,
        backlog=int(sk.sk_wmem_alloc.refs.counter) - 1, peer=peer, shutdown=shutdown,
        options=options,
        queue=_queue(guest, sk, kind, int(options["so_sndbuf"]) - _CMSG_ROOM))


def _peer_inode(peer: drgn.Object) -> int:
    """sock_diag's peer: the inode of the peer's socket, 0 once it was closed."""
    if not peer or not peer.sk_socket:
        return 0
    holder = drgn.container_of(peer.sk_socket, "struct socket_alloc", "socket")
    return int(holder.vfs_inode.i_ino)


def _passes_credentials(guest: Guest, sock: drgn.Object, sk: drgn.Object) -> bool:
    """SO_PASSCRED or SO_PASSSEC: bits of the socket's flags (include/linux/net.h),
    moved into ``struct sock`` by later kernels."""
    if guest.has("struct sock", "sk_scm_credentials"):
        return bool(int(sk.sk_scm_credentials) or int(sk.sk_scm_security))
    return bool(int(sock.flags) >> _SOCK_PASSCRED & 0b11)


def _queue(guest: Guest, sk: drgn.Object, kind: int, piece: int) -> tuple[bytes, ...]:
    """The unread bytes of its receive queue: per message for datagrams and
    seqpackets, in pieces of ``piece`` bytes for a stream (as a peek joins them)."""
    messages = []
    for skb in skb_list(sk.sk_receive_queue):
        control = drgn.cast("struct unix_skb_parms *", skb.cb.address_of_())
        if control.fp:
            raise Unrecoverable("is a UNIX socket with descriptors in flight "
                                "(SCM_RIGHTS; not supported yet)")
        data = skb_payload(guest, skb)
        consumed = int(control.consumed) if kind == socket.SOCK_STREAM else 0
        if not 0 <= consumed <= len(data):
            raise Unrecoverable("has a UNIX socket buffer read past its end")
        messages.append(data[consumed:])
    if kind != socket.SOCK_STREAM:
        return tuple(messages)
    stream = b"".join(messages)
    if piece <= 0:
        raise Unrecoverable("is a UNIX socket with a corrupt send buffer size")
    return tuple(stream[start:start + piece] for start in range(0, len(stream), piece))
