"""A redis client that proves a connection survives: one TCP connection, INCR in a loop.

Run inside the private network (``python -m transmigrate.orchestrate.loadgen``).
It records the time of every reply and checks that each INCR answers exactly
one more than the last, so a lost or duplicated reply shows. On SIGTERM, after
``--seconds`` or on an error, it prints one JSON summary: replies, the longest gap
between two replies, the last value, the connection's CLIENT ID at the start and
at the end, errors.
With ``--reconnect`` (for baselines that restart the server) it reconnects
after an error instead of stopping, and counts the reconnections.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["RespConnection", "main"]


class RespConnection:
    """The smallest RESP2 client: one command at a time, on one socket."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = self.sock.makefile("rb")

    def command(self, *args: str) -> Any:
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        self.sock.sendall(payload.encode())
        return self._reply()

    def _reply(self) -> Any:
        line = self.reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        kind, rest = line[:1], line[1:].rstrip(b"\r\n")
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self.reader.read(size + 2)[:-2].decode()
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise ConnectionError(f"unexpected reply {line[:40]!r}")


def _reconnect(host: str, port: int, timeout: float,
               stopped: Callable[[], bool]) -> RespConnection:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return RespConnection(host, port, 1.0)
        except OSError:
            if stopped() or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("host")
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--key", default="transmigrate:counter")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--reconnect", action="store_true")
    args = parser.parse_args()
    stop = False

    def request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    summary: dict[str, Any] = {"replies": 0, "max_gap_s": 0.0, "errors": [],
                               "out_of_order": 0, "reconnects": 0}
    # A baseline that restarts the server leaves the old connection silent: give up on
    # it after a second and reconnect, instead of waiting for TCP to time out.
    timeout = 1.0 if args.reconnect else args.timeout
    last_value = -1
    try:
        conn = RespConnection(args.host, args.port, timeout)
        summary["client_id_start"] = conn.command("CLIENT", "ID")
        last_value = int(conn.command("INCR", args.key))
        last_time = start = time.monotonic()
        sys.stderr.write("loadgen: running\n")
        sys.stderr.flush()
        while not stop and time.monotonic() - start < args.seconds:
            try:
                value = int(conn.command("INCR", args.key))
            except (OSError, ConnectionError, RuntimeError) as exc:
                # RuntimeError is a server error reply, e.g. LOADING while redis reads its AOF.
                if not args.reconnect:
                    raise
                if not isinstance(exc, RuntimeError):
                    conn = _reconnect(args.host, args.port, args.timeout, lambda: stop)
                    conn.sock.settimeout(timeout)
                    summary["reconnects"] += 1
                else:
                    time.sleep(0.05)
                last_value = -1
                continue
            now = time.monotonic()
            summary["max_gap_s"] = max(summary["max_gap_s"], now - last_time)
            if value != last_value + 1 and last_value != -1:
                summary["out_of_order"] += 1
            last_value, last_time = value, now
            summary["replies"] += 1
        summary["client_id_end"] = conn.command("CLIENT", "ID")
    except (OSError, RuntimeError, ConnectionError, ValueError) as exc:
        summary["errors"].append(f"{type(exc).__name__}: {exc}")
    summary["last_value"] = last_value
    summary["max_gap_s"] = round(summary["max_gap_s"], 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
