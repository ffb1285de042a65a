"""The host's client of the guest agent (qemu-guest-agent over virtio-serial).

The channel does not depend on the guest's network. The guest is untrusted:
every read is bounded in size and time, replies are checked for shape before
use, and nothing the guest sends is ever executed on the host. The agent's
socket takes one client at a time, so every conversation holds a file lock.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from transmigrate.errors import AgentError, GuestCommandFailed
from transmigrate.polling import Deadline, wait_for

__all__ = ["ExecResult", "GuestAgent", "GuestProcess"]

MAX_MESSAGE = 64 * 1024 * 1024
MAX_FILE = 4 * 1024 * 1024 * 1024
"""Largest file :meth:`GuestAgent.read_file` takes into the host's memory."""
FILE_PIECE = 8 * 1024 * 1024
"""Bytes per file read or write: base64 makes a message of ~11 MiB, well within both
our ``MAX_MESSAGE`` and qemu-ga's 64 MiB limit on one JSON message."""
GUEST_EXEC_MAX_OUTPUT = 16 * 1024 * 1024
"""qemu-ga keeps at most this much of a command's stdout (and of its stderr) and
drops the rest: bulk data must take another way."""
_DELIMITER = b"\xff"
_POLL_FAST = 0.002
_POLL_FAST_FOR = 0.1
"""A command is looked at every 2 ms for its first 100 ms: most commands are
short, and every command of a migration's frozen window pays the pause after it
has finished. (Each look costs the guest agent ~0.5 ms of guest CPU.)"""
_POLL_MAX = 0.02
"""Longest pause between two looks at a longer command."""


@dataclass(frozen=True)
class ExecResult:
    """How a command in the guest ended."""

    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")

    def check(self, what: str, where: str = "the guest") -> ExecResult:
        """This result if the command succeeded; else GuestCommandFailed naming ``what``."""
        if self.exit_code != 0:
            output = (self.stderr or self.stdout).decode(errors="replace")
            raise GuestCommandFailed(what, where, self.exit_code, output)
        return self


@dataclass(frozen=True)
class GuestProcess:
    """One process as the guest reports it."""

    pid: int
    ppid: int
    state: str
    rss_kib: int
    comm: str
    args: str


class _Connection:
    """One conversation on the agent socket, with a deadline on every read."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise AgentError(f"cannot reach the guest agent at {path}: {exc.strerror}") from exc
        self.buffer = bytearray()
        self.scanned = 0  # bytes of buffer known to hold no newline

    def close(self) -> None:
        self.sock.close()

    def send(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as exc:
            raise AgentError(f"guest agent connection broke: {exc}") from exc

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AgentError("the guest agent did not answer in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 20)
        except TimeoutError as exc:
            raise AgentError("the guest agent did not answer in time") from exc
        except OSError as exc:
            raise AgentError(f"guest agent connection broke: {exc}") from exc
        if not chunk:
            raise AgentError("the guest agent closed the connection")
        self.buffer.extend(chunk)
        if len(self.buffer) > MAX_MESSAGE:
            raise AgentError(f"the guest agent sent more than {MAX_MESSAGE} bytes in one message")

    def skip_past_delimiter(self, deadline: float) -> None:
        while _DELIMITER not in self.buffer:
            self.buffer.clear()
            self._fill(deadline)
        del self.buffer[: self.buffer.index(_DELIMITER) + 1]
        self.scanned = 0

    def receive(self, deadline: float) -> dict[str, Any]:
        while (end := self.buffer.find(b"\n", self.scanned)) == -1:
            self.scanned = len(self.buffer)
            self._fill(deadline)
        # A delimiter from a later sync can start a line when an earlier sync's reply,
        # left over from a conversation that timed out, came first.
        line = bytes(self.buffer[:end]).lstrip(_DELIMITER)
        del self.buffer[: end + 1]
        self.scanned = 0
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise AgentError("the guest agent sent a message that is not JSON") from exc
        if not isinstance(message, dict):
            raise AgentError("the guest agent sent a message that is not an object")
        return message


def _try_lock(lock: IO[str]) -> bool:
    """Take the agent's lock if no other client holds it."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _field(obj: Any, key: str, kind: type) -> Any:
    if not isinstance(obj, dict) or not isinstance(obj.get(key), kind):
        raise AgentError(f"the guest agent's reply lacks {key!r}")
    return obj[key]


def _decode(data: Any) -> bytes:
    if data is None:
        return b""
    if not isinstance(data, str):
        raise AgentError("the guest agent sent output that is not base64 text")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise AgentError("the guest agent sent output that is not base64") from exc


class GuestAgent:
    """Typed, bounded calls to one guest's agent."""

    def __init__(self, socket_path: Path, lock_path: Path, name: str = "the guest") -> None:
        self.socket_path = socket_path
        self.lock_path = lock_path
        self.name = name
        """The VM's name, for errors."""

    @contextlib.contextmanager
    def _conversation(self, timeout: float, lock_wait: float | None = None
                      ) -> Iterator[_Connection]:
        """A locked, freshly synchronised connection (stale replies are discarded).
        Another client may hold the agent for as long as its command runs (a CRIU dump,
        say): the lock is waited for up to ``lock_wait`` (default ``timeout``)."""
        with open(self.lock_path, "a") as lock:
            wait_for(lambda: _try_lock(lock), timeout=timeout if lock_wait is None else lock_wait,
                     interval=0.02, error=AgentError,
                     what="the guest agent was not freed by another client")
            deadline = Deadline(timeout)
            connection = _Connection(self.socket_path, timeout)
            try:
                token = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
                connection.sock.sendall(_DELIMITER)
                connection.send("guest-sync-delimited", {"id": token})
                connection.skip_past_delimiter(deadline.at)
                while True:
                    reply = connection.receive(deadline.at)
                    if reply.get("return") == token:
                        break
                yield connection
            except OSError as exc:
                raise AgentError(f"guest agent connection broke: {exc}") from exc
            finally:
                connection.close()

    @staticmethod
    def _call(connection: _Connection, command: str, arguments: dict[str, Any] | None,
              deadline: float) -> Any:
        connection.send(command, arguments)
        reply = connection.receive(deadline)
        if "error" in reply:
            error = reply["error"]
            desc = error.get("desc") if isinstance(error, dict) else None
            raise AgentError(f"guest agent refused {command}: {str(desc)[:200]}")
        if "return" not in reply:
            raise AgentError(f"the guest agent's reply to {command} has no result")
        return reply["return"]

    def call(self, command: str, arguments: dict[str, Any] | None = None,
             timeout: float = 10.0) -> Any:
        with self._conversation(timeout) as connection:
            return self._call(connection, command, arguments, time.monotonic() + timeout)

    def ping(self, timeout: float = 2.0) -> None:
        with self._conversation(timeout):
            pass

    def wait_ready(self, timeout: float, alive: Callable[[], bool]) -> float:
        """Wait until the agent answers; return the seconds waited. ``alive`` is asked
        before every try, so that a VM that died ends the wait at once."""
        start = time.monotonic()

        def answers() -> bool:
            if not alive():
                raise AgentError("the VM died before its guest agent answered")
            try:
                self.ping(timeout=1.0)
            except AgentError:
                return False  # not up yet: each try waits up to a second
            return True

        wait_for(answers, timeout=timeout, interval=0.1, error=AgentError,
                 what="the guest agent did not answer")
        return time.monotonic() - start

    @staticmethod
    def _exec_arguments(argv: Sequence[str], input: bytes | None,
                        env: Sequence[str]) -> dict[str, Any]:
        if not argv:
            raise AgentError("no command given")
        arguments: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]),
                                     "capture-output": True}
        if input is not None:
            arguments["input-data"] = base64.b64encode(input).decode()
        if env:
            arguments["env"] = list(env)
        return arguments

    @classmethod
    def _result(cls, status: Any) -> ExecResult | None:
        """The command's result if it has exited, else None."""
        if not _field(status, "exited", bool):
            return None
        code = status.get("exitcode")
        if not isinstance(code, int):
            signal = status.get("signal")
            code = 128 + signal if isinstance(signal, int) else 255
        if status.get("out-truncated") or status.get("err-truncated"):
            raise AgentError(f"the command's output passed the guest agent's limit "
                             f"({GUEST_EXEC_MAX_OUTPUT >> 20} MiB) and was cut")
        return ExecResult(code, _decode(status.get("out-data")), _decode(status.get("err-data")))

    def spawn(self, argv: Sequence[str], *, env: Sequence[str] = (),
              timeout: float = 10.0) -> int:
        """Start ``argv`` in the guest without waiting; return its guest pid."""
        started = self.call("guest-exec", self._exec_arguments(argv, None, env), timeout)
        return int(_field(started, "pid", int))

    def poll(self, pid: int, timeout: float = 10.0) -> ExecResult | None:
        """The result of a spawned command, or None while it runs."""
        return self._result(self.call("guest-exec-status", {"pid": pid}, timeout))

    def exec(self, argv: Sequence[str], *, input: bytes | None = None,
             env: Sequence[str] = (), timeout: float = 60.0) -> ExecResult:
        """Run ``argv`` in the guest; return its exit code and output."""
        arguments = self._exec_arguments(argv, input, env)
        deadline = Deadline(timeout)
        step = min(timeout, 10.0)
        with self._conversation(step, lock_wait=timeout) as connection:
            started = self._call(connection, "guest-exec", arguments, time.monotonic() + step)
            pid = _field(started, "pid", int)
            fast = Deadline(_POLL_FAST_FOR)
            pause = _POLL_FAST
            while True:
                status = self._call(connection, "guest-exec-status", {"pid": pid},
                                    time.monotonic() + step)
                result = self._result(status)
                if result is not None:
                    return result
                if deadline.expired():
                    self._call(connection, "guest-exec",
                               {"path": "kill", "arg": ["-KILL", str(pid)]},
                               time.monotonic() + step)
                    raise AgentError(f"{argv[0]} did not finish within {timeout:g} s; killed it")
                time.sleep(pause)
                if fast.expired():
                    pause = min(pause * 2, _POLL_MAX)

    def run(self, argv: Sequence[str], *, what: str = "", input: bytes | None = None,
            env: Sequence[str] = (), timeout: float = 120.0) -> ExecResult:
        """Run ``argv``; a non-zero exit raises GuestCommandFailed naming ``what`` (by
        default the command) and this VM."""
        result = self.exec(argv, input=input, env=env, timeout=timeout)
        return result.check(what or argv[0], self.name)

    def sh(self, script: str, *, what: str = "", input: bytes | None = None,
           timeout: float = 120.0) -> ExecResult:
        """Run a shell script, checked as :meth:`run` does."""
        return self.run(["sh", "-c", script], what=what or script.split()[0], input=input,
                        timeout=timeout)

    def read_file(self, path: str, *, timeout: float = 120.0) -> bytes:
        """The bytes of the guest's file ``path``, of any size (a command's output is cut
        at :data:`GUEST_EXEC_MAX_OUTPUT`), read in pieces that keep each reply small."""
        deadline = Deadline(timeout)
        data = bytearray()
        with self._conversation(min(timeout, 10.0), lock_wait=timeout) as connection:
            handle = self._call(connection, "guest-file-open", {"path": path, "mode": "r"},
                                deadline.at)
            try:
                while True:
                    piece = self._call(connection, "guest-file-read",
                                       {"handle": handle, "count": FILE_PIECE}, deadline.at)
                    data += _decode(_field(piece, "buf-b64", str))
                    if len(data) > MAX_FILE:
                        raise AgentError(f"{path} in {self.name} is larger than "
                                         f"{MAX_FILE >> 20} MiB")
                    if _field(piece, "eof", bool):
                        return bytes(data)
            finally:
                self._call(connection, "guest-file-close", {"handle": handle}, deadline.at)

    def write_file(self, path: str, data: bytes, *, timeout: float = 120.0) -> None:
        """Write ``data`` to the guest's file ``path`` (created or emptied first), in
        pieces that keep each message well under the agent's limit."""
        deadline = Deadline(timeout)
        with self._conversation(min(timeout, 10.0), lock_wait=timeout) as connection:
            handle = self._call(connection, "guest-file-open", {"path": path, "mode": "w"},
                                deadline.at)
            try:
                for start in range(0, len(data), FILE_PIECE):
                    piece = data[start:start + FILE_PIECE]
                    written = self._call(connection, "guest-file-write", {
                        "handle": handle, "buf-b64": base64.b64encode(piece).decode()},
                        deadline.at)
                    if _field(written, "count", int) != len(piece):
                        raise AgentError(f"the guest agent wrote part of {path} in {self.name}")
            finally:
                self._call(connection, "guest-file-close", {"handle": handle}, deadline.at)

    def processes(self) -> list[GuestProcess]:
        """The guest's processes, as its ``ps`` sees them."""
        result = self.exec(["ps", "-e", "-o", "pid=,ppid=,stat=,rss=,comm=,args="])
        if result.exit_code != 0:
            raise AgentError(f"ps failed in the guest: {result.stderr.decode(errors='replace')}")
        processes = []
        for line in result.text.splitlines():
            parts = line.split(None, 5)
            if len(parts) < 5 or not parts[0].isdigit():
                continue
            processes.append(GuestProcess(
                pid=int(parts[0]), ppid=int(parts[1]), state=parts[2],
                rss_kib=int(parts[3]) if parts[3].isdigit() else 0,
                comm=parts[4], args=parts[5] if len(parts) > 5 else ""))
        return processes
