"""TCP sockets as a stopped kernel holds them: addresses, options, and for an
established connection its sequence numbers, windows and the bytes in both queues.

This is what CRIU's socket dump asks the kernel for (``sock_diag``, getsockopt,
``TCP_REPAIR``), read from ``struct tcp_sock`` instead. With it ``criu restore
--tcp-established`` rebuilds the connection in repair mode on the new kernel, and
the peer, which never saw the old kernel die, goes on talking: the bytes it had
sent and the old kernel acknowledged are in the receive queue, the bytes it has
not acknowledged yet are in the send queue and are sent again.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import drgn
from drgn.helpers.linux.mm import page_to_phys
from drgn.helpers.linux.net import skb_shinfo
from drgn.helpers.linux.rbtree import rbtree_inorder_for_each_entry

from transmigrate.errors import Unrecoverable
from transmigrate.introspect.kernel import Guest

__all__ = ["CutConnection", "SocketState", "TcpStream", "is_connection",
           "millisecond_timestamp", "read_socket", "skb_list", "skb_payload",
           "socket_options"]

# include/net/tcp_states.h, uapi; the same in 6.1 and 6.12.
_TCP_ESTABLISHED, _TCP_CLOSE, _TCP_LISTEN = 1, 7, 10
_TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1",
               5: "FIN_WAIT2", 6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK",
               10: "LISTEN", 11: "CLOSING"}
_FAMILIES: dict[int, str] = {socket.AF_INET: "INET", socket.AF_INET6: "INET6"}
_TCP_NAGLE_OFF, _TCP_NAGLE_CORK = 1, 2
_TCPI_OPT_TIMESTAMPS, _TCPI_OPT_SACK, _TCPI_OPT_WSCALE = 1, 2, 4
_TCPHDR_FIN = 0x01
_SOCK_BUF_LOCKS = 0x3
"""SOCK_SNDBUF_LOCK | SOCK_RCVBUF_LOCK: what SO_BUF_LOCK reports."""
_MAX_SCHEDULE_TIMEOUT = (1 << 63) - 1
_MAX_QUEUED = 64 << 20
"""More queued bytes than any socket buffer holds: the queue is corrupt."""


@dataclass(frozen=True)
class TcpStream:
    """An established connection's state (CRIU's tcp_stream_entry) and queued bytes."""

    fields: dict[str, int | bool]
    inq: bytes
    """Received and acknowledged, not yet read by the process."""
    outq: bytes
    """Written by the process, not yet acknowledged by the peer (sent or not)."""


@dataclass(frozen=True)
class CutConnection:
    """A connection a recovery cut, as its peer knows it: where to send it a reset."""

    source: str
    source_port: int
    destination: str
    destination_port: int
    next_seq: int
    """The next sequence number the dead kernel would have sent (``snd_nxt``)."""

    @property
    def argument(self) -> str:
        """How the guest tool tm-reset takes it."""
        return (f"{self.source}:{self.source_port}:{self.destination}:"
                f"{self.destination_port}:{self.next_seq}")


@dataclass(frozen=True)
class SocketState:
    """A TCP socket (CRIU's inet_sk_entry), and its stream if it is connected."""

    key: int
    """The ``struct file``."""
    ino: int
    flags: int
    family: str
    state: str
    src_port: int
    dst_port: int
    src_addr: str
    dst_addr: str
    backlog: int
    v6only: bool
    shutdown: int
    options: dict[str, int | bool]
    """CRIU's sk_opts_entry, as getsockopt would give each."""
    stream: TcpStream | None
    losses: tuple[str, ...] = ()
    """What the restore will not have, in a few words each (connections a listening
    socket had accepted and the process had not taken yet; a connection cut)."""
    cut: CutConnection | None = None
    """The connection this socket was, if it was cut (IPv4: the peer is told)."""


def read_socket(guest: Guest, file: drgn.Object, cut: str | None = None) -> SocketState:
    """Read the socket open as ``file``; raise :class:`Unrecoverable` for a kind not
    rebuilt yet, or a listener caught mid-update. A connection is cut (see
    :func:`_cut`) when a call on it held its lock, or for ``cut`` (why it cannot be
    trusted); when the kernel held its spinlock (a packet coming in or going out, in
    interrupt context), only if its queues then do not add up: its sequence numbers
    and queues are read as they stand, a packet half taken in being as good as lost
    (its sender sends it again, as it was not acknowledged)."""
    sock = drgn.cast("struct socket *", file.private_data)
    sk = sock.sk
    if not sk:
        raise Unrecoverable("is a socket without a sock (being closed)")
    common = sk.__sk_common
    family = int(common.skc_family)
    if family not in _FAMILIES:
        kinds: dict[int, str] = {socket.AF_NETLINK: "a netlink", socket.AF_PACKET: "a packet"}
        kind = kinds.get(family, f"a family-{family}")
        raise Unrecoverable(f"is {kind} socket (not supported yet)")
    if int(sock.type) != socket.SOCK_STREAM or int(sk.sk_protocol) != socket.IPPROTO_TCP:
        raise Unrecoverable(f"is a non-TCP internet socket (type {int(sock.type)}, "
                            f"protocol {int(sk.sk_protocol)}; not supported yet)")
    state = int(common.skc_state)
    owned = bool(int(sk.sk_lock.owned))
    spinning = bool(int(sk.sk_lock.slock.rlock.raw_lock.val.counter))
    if state == _TCP_ESTABLISHED and (cut or owned):
        return _cut(guest, file, sk, cut or "a call on it held its lock (caught mid-update)")
    if owned or (spinning and state != _TCP_ESTABLISHED):
        raise Unrecoverable("is a socket caught mid-update (its lock held)")
    if state not in (_TCP_ESTABLISHED, _TCP_LISTEN):
        raise Unrecoverable(f"is a TCP socket in state {_TCP_STATES.get(state, state)} "
                            "(not supported yet)")
    tcp = drgn.cast("struct tcp_sock *", sk)
    if int(tcp.repair):
        raise Unrecoverable("is a TCP socket already in repair mode")
    source, destination = _addresses(common, family)
    losses: tuple[str, ...] = ()
    if state == _TCP_LISTEN:
        pending = int(drgn.cast("struct inet_connection_sock *", sk)
                      .icsk_accept_queue.qlen.counter)
        if pending:
            losses = (f"{pending} connection(s) not yet accepted on port "
                      f"{int(common.skc_num)}",)
    try:
        stream = _stream(guest, sk, tcp) if state == _TCP_ESTABLISHED else None
    except Unrecoverable as exc:
        if not spinning:
            raise
        return _cut(guest, file, sk, f"the kernel was updating it (a packet in or out, its "
                                     f"spinlock held), and it {exc}")
    return SocketState(
        key=file.value_(), ino=int(file.f_inode.i_ino),
        flags=int(file.f_flags) & ~os.O_CLOEXEC,
        family=_FAMILIES[family], state=_TCP_STATES[state],
        src_port=int(common.skc_num),
        dst_port=int.from_bytes(common.skc_dport.to_bytes_(), "big"),
        src_addr=source, dst_addr=destination,
        # sock_diag's write-queue figure, which CRIU keeps as the backlog: the listen
        # backlog, or the bytes not yet acknowledged.
        backlog=len(stream.outq) if stream else int(sk.sk_max_ack_backlog),
        v6only=bool(common.skc_ipv6only), shutdown=int(sk.sk_shutdown),
        options=_options(guest, sk, tcp), stream=stream,
        losses=losses)


def _cut(guest: Guest, file: drgn.Object, sk: drgn.Object, why: str) -> SocketState:
    """A connection whose state cannot be trusted (``why``) becomes a socket that was
    never connected: the process keeps its descriptor, and its next read or write on it
    fails (ENOTCONN, EPIPE) as on a connection that broke, so it closes it. Its peer is
    sent a reset (``cut``). Rebuilding the connection instead could send bytes twice or
    lose some."""
    common = sk.__sk_common
    family = int(common.skc_family)
    (source, destination), nowhere = _addresses(common, family), (
        "0.0.0.0" if family == socket.AF_INET else "::")
    source_port = int(common.skc_num)
    destination_port = int.from_bytes(common.skc_dport.to_bytes_(), "big")
    tcp = drgn.cast("struct tcp_sock *", sk)
    return SocketState(
        key=file.value_(), ino=int(file.f_inode.i_ino),
        flags=int(file.f_flags) & ~os.O_CLOEXEC, family=_FAMILIES[family],
        state=_TCP_STATES[_TCP_CLOSE], src_port=0, dst_port=0, src_addr=nowhere,
        dst_addr=nowhere, backlog=0, v6only=bool(common.skc_ipv6only), shutdown=0,
        options=_options(guest, sk, tcp), stream=None,
        losses=(f"the connection {source} port {source_port} to {destination} port "
                f"{destination_port} is cut: {why}",),
        cut=CutConnection(source, source_port, destination, destination_port,
                          int(tcp.snd_nxt)) if family == socket.AF_INET else None)


def is_connection(file: drgn.Object) -> bool:
    """Whether the socket open as ``file`` is an established TCP connection."""
    sk = drgn.cast("struct socket *", file.private_data).sk
    return bool(sk) and (int(sk.__sk_common.skc_family) in _FAMILIES
                         and int(sk.sk_protocol) == socket.IPPROTO_TCP
                         and int(sk.__sk_common.skc_state) == _TCP_ESTABLISHED)


def _addresses(common: drgn.Object, family: int) -> tuple[str, str]:
    """Local and remote address, from their bytes (network order)."""
    if family == socket.AF_INET:
        pair = (common.skc_rcv_saddr, common.skc_daddr)
    else:
        pair = (common.skc_v6_rcv_saddr, common.skc_v6_daddr)
    local, remote = (socket.inet_ntop(family, address.to_bytes_()) for address in pair)
    return local, remote


def socket_options(guest: Guest, sk: drgn.Object) -> dict[str, int | bool]:
    """What CRIU's dump_socket_opts reads with getsockopt for any socket (SO_*)."""
    prog = guest.prog
    flags = int(sk.__sk_common.skc_flags)

    def flag(name: str) -> bool:
        return bool(flags >> prog[name].value_() & 1)

    snd_sec, snd_usec = _timeout(guest, int(sk.sk_sndtimeo))
    rcv_sec, rcv_usec = _timeout(guest, int(sk.sk_rcvtimeo))
    options: dict[str, int | bool] = {
        "so_sndbuf": int(sk.sk_sndbuf), "so_rcvbuf": int(sk.sk_rcvbuf),
        "so_snd_tmo_sec": snd_sec, "so_snd_tmo_usec": snd_usec,
        "so_rcv_tmo_sec": rcv_sec, "so_rcv_tmo_usec": rcv_usec,
        "reuseaddr": bool(sk.__sk_common.skc_reuse), "so_priority": int(sk.sk_priority),
        "so_rcvlowat": int(sk.sk_rcvlowat), "so_mark": int(sk.sk_mark),
        "so_passcred": False, "so_passsec": False,
        "so_dontroute": flag("SOCK_LOCALROUTE"), "so_no_check": bool(sk.sk_no_check_tx),
        "so_reuseport": bool(sk.__sk_common.skc_reuseport),
        "so_broadcast": flag("SOCK_BROADCAST"), "so_keepalive": flag("SOCK_KEEPOPEN"),
        "so_oobinline": int(flag("SOCK_URGINLINE")),
        "so_buf_lock": int(sk.sk_userlocks) & _SOCK_BUF_LOCKS}
    if flag("SOCK_LINGER"):
        options["so_linger"] = int(sk.sk_lingertime) // _hz(guest)
    return options


def _hz(guest: Guest) -> int:
    return round(1e9 / int(guest.prog["tick_nsec"]))


def _timeout(guest: Guest, jiffies: int) -> tuple[int, int]:
    """A socket timeout in jiffies as getsockopt gives it: seconds, microseconds."""
    if jiffies >= _MAX_SCHEDULE_TIMEOUT:
        return 0, 0
    hz = _hz(guest)
    return jiffies // hz, jiffies % hz * 1_000_000 // hz


def _options(guest: Guest, sk: drgn.Object, tcp: drgn.Object) -> dict[str, int | bool]:
    """CRIU's socket options of a TCP socket: the generic ones and its keepalive."""
    hz = _hz(guest)
    net = sk.__sk_common.skc_net.net.ipv4
    return {**socket_options(guest, sk),
            "tcp_keepcnt": int(tcp.keepalive_probes) or int(net.sysctl_tcp_keepalive_probes),
            "tcp_keepidle": (int(tcp.keepalive_time) or int(net.sysctl_tcp_keepalive_time))
            // hz,
            "tcp_keepintvl": (int(tcp.keepalive_intvl)
                              or int(net.sysctl_tcp_keepalive_intvl)) // hz}


def _stream(guest: Guest, sk: drgn.Object, tcp: drgn.Object) -> TcpStream:
    """What soccr (CRIU's TCP library) reads in repair mode, and the queued bytes: the
    receive queue from ``copied_seq`` to ``rcv_nxt``, the send queue from ``snd_una``
    to ``write_seq`` (the retransmit tree, then the unsent list). The out-of-order queue
    is dropped, as CRIU does: the peer sends it again."""
    seq = {name: int(tcp.member_(name)) for name in (
        "snd_una", "snd_nxt", "write_seq", "rcv_nxt", "copied_seq", "snd_wl1", "snd_wnd",
        "max_window", "rcv_wnd", "rcv_wup", "tsoffset", "tcp_mstamp")}
    options = tcp.rx_opt
    inq = _queued(guest, skb_list(sk.sk_receive_queue), seq["copied_seq"], seq["rcv_nxt"],
                  "receive")
    outq = _queued(guest, [*rbtree_inorder_for_each_entry(
        "struct sk_buff", sk.tcp_rtx_queue.address_of_(), "rbnode"),
        *skb_list(sk.sk_write_queue)], seq["snd_una"], seq["write_seq"], "send")
    mask = ((_TCPI_OPT_TIMESTAMPS if int(options.tstamp_ok) else 0)
            | (_TCPI_OPT_SACK if int(options.sack_ok) else 0)
            | (_TCPI_OPT_WSCALE if int(options.wscale_ok) else 0))
    nagle = int(tcp.nonagle)
    fields: dict[str, int | bool] = {
        "inq_len": len(inq), "inq_seq": seq["rcv_nxt"],
        "outq_len": len(outq), "outq_seq": seq["write_seq"],
        "opt_mask": mask, "snd_wscale": int(options.snd_wscale),
        "mss_clamp": int(options.mss_clamp), "rcv_wscale": int(options.rcv_wscale),
        "timestamp": _last_tsval(tcp, seq["tcp_mstamp"], seq["tsoffset"]),
        "unsq_len": (seq["write_seq"] - seq["snd_nxt"]) & 0xFFFF_FFFF,
        **{name: seq[name] for name in ("snd_wl1", "snd_wnd", "max_window", "rcv_wnd",
                                        "rcv_wup")}}
    for name, bit in (("cork", _TCP_NAGLE_CORK), ("nodelay", _TCP_NAGLE_OFF)):
        if nagle & bit:  # CRIU writes them only when set
            fields[name] = True
    return TcpStream(fields=fields, inq=inq, outq=outq)


def millisecond_timestamp(clock: int) -> int:
    """What to give ``TCP_TIMESTAMP`` so that a restored connection goes on from
    ``clock``, the last timestamp (TSval) its peer saw, in milliseconds.

    Linux 6.7 and later read the value's low bit as a request for microsecond TSvals,
    a bit CRIU 3.17 passes on unknowingly: an odd value dumped on 6.1 made every other
    connection restored on 6.12 run on microseconds, whose 32-bit TSvals wrap in 36
    minutes, after which a peer that keeps PAWS's 24 days (Linux before 6.7) drops
    every segment of a connection idle that long. Rounding up keeps the value no older
    than what the peer saw, which PAWS requires.
    """
    return (clock + (clock & 1)) & 0xFFFF_FFFF


def _last_tsval(tcp: drgn.Object, mstamp: int, offset: int) -> int:
    """The clock the peer last saw from us (tcp_time_stamp_ts): milliseconds, or, on a
    6.7+ socket with ``tcp_usec_ts`` (one that CRIU restored from an odd timestamp),
    microseconds."""
    usec = tcp.type_.type.has_member("tcp_usec_ts") and bool(tcp.tcp_usec_ts)
    return ((mstamp if usec else mstamp // 1000) + offset) & 0xFFFF_FFFF


def skb_list(head: drgn.Object) -> Iterator[drgn.Object]:
    """The buffers of an ``sk_buff_head``, bounded by its count."""
    end = head.address_of_().value_()
    skb = head.next
    for _ in range(int(head.qlen)):
        if skb.value_() == end:
            raise Unrecoverable("has a socket queue shorter than its count")
        yield skb
        skb = skb.next
    if skb.value_() != end:
        raise Unrecoverable("has a socket queue longer than its count")


def _queued(guest: Guest, buffers: Iterator[drgn.Object] | list[drgn.Object], start: int,
            end: int, which: str) -> bytes:
    """The bytes from sequence number ``start`` to ``end``, gathered from ``buffers``
    in order; they must cover that span without a gap."""
    wanted = (end - start) & 0xFFFF_FFFF
    if wanted > _MAX_QUEUED:
        raise Unrecoverable(f"has a corrupt {which} queue ({wanted} bytes)")
    data = bytearray()
    for skb in buffers:
        if len(data) == wanted:
            break
        control = drgn.cast("struct tcp_skb_cb *", skb.cb.address_of_())
        first = int(control.seq)
        skip = (start + len(data) - first) & 0xFFFF_FFFF
        payload = skb_payload(guest, skb)
        if skip >= 1 << 31:  # a gap before this buffer
            raise Unrecoverable(f"has a {which} queue with a gap")
        data += payload[skip:skip + wanted - len(data)]
    if len(data) != wanted:
        raise Unrecoverable(f"has a {which} queue that does not hold its bytes "
                            f"({len(data)} of {wanted})")
    return bytes(data)


def skb_payload(guest: Guest, skb: drgn.Object) -> bytes:
    """A buffer's data: its linear part, then its page fragments."""
    length, paged = int(skb.len), int(skb.data_len)
    if not 0 <= paged <= length <= _MAX_QUEUED:
        raise Unrecoverable("has a corrupt socket buffer")
    info = skb_shinfo(skb)
    if info.frag_list:
        raise Unrecoverable("has a socket buffer with a fragment list (not supported)")
    parts = [guest.read(int(skb.data), length - paged)] if length > paged else []
    for index in range(int(info.nr_frags)):
        frag = info.frags[index]
        if guest.has("skb_frag_t", "bv_page"):  # 6.1: a bio_vec
            page, offset, size = frag.bv_page, int(frag.bv_offset), int(frag.bv_len)
        else:  # 6.12: a netmem reference, a page unless its low bit says otherwise
            netmem = int(frag.netmem)
            if netmem & 1:
                raise Unrecoverable("has a socket buffer in device memory")
            page = drgn.Object(guest.prog, "struct page *", netmem)
            offset, size = int(frag.offset), int(frag.len)
        parts.append(bytes(guest.ram.read(int(page_to_phys(page)) + offset, size)))
    data = b"".join(parts)
    if len(data) != length:
        raise Unrecoverable("has a socket buffer whose fragments do not add up")
    return data
