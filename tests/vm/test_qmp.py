"""qmp_execute against a QMP peer that replays what QEMU was seen to send a new session
while a block job runs: a message before the greeting, or an event before the answer
to ``qmp_capabilities``."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from transmigrate.errors import MachineError
from transmigrate.vm.qmp import qmp_execute

_GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                 "package": ""}, "capabilities": []}}
_JOB_EVENT = {"event": "JOB_STATUS_CHANGE", "data": {"id": "commit-data", "status": "ready"},
                "timestamp": {"seconds": 1, "microseconds": 0}}


def _send(conn: socket.socket, message: Mapping[str, object]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _requests(conn: socket.socket) -> Iterator[dict[str, Any]]:
    """The JSON objects the client sends, as QEMU reads them: with no separator."""
    decoder, buffer = json.JSONDecoder(), ""
    while chunk := conn.recv(4096):
        buffer += chunk.decode()
        while buffer := buffer.lstrip():
            try:
                request, end = decoder.raw_decode(buffer)
            except json.JSONDecodeError:
                break  # the rest of it is still on its way
            buffer = buffer[end:]
            yield request


def _serve(conn: socket.socket, stale: str) -> None:
    """One session: ``stale`` says what comes where QEMU's own answer should."""
    if stale == "before-greeting":
        _send(conn, _JOB_EVENT)
    _send(conn, _GREETING)
    for request in _requests(conn):
        if request["execute"] == "qmp_capabilities" and stale == "at-negotiation":
            _send(conn, _JOB_EVENT)
        else:
            _send(conn, {"return": {"status": "running"}, "id": request.get("id")})


@pytest.fixture
def qmp_peer(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A QMP socket whose sessions misbehave as the list (filled by the test) says,
    one entry per session; then they behave."""
    path = tmp_path / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    plan: list[str] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):  # a client that hung up ends only
                _serve(conn, plan.pop(0) if plan else "")  # its own session, as in QEMU

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, plan
    listener.close()


@pytest.mark.parametrize("stale", ["before-greeting", "at-negotiation"])
def test_a_session_handed_stale_output_is_tried_again(
        qmp_peer: tuple[Path, list[str]], stale: str) -> None:
    path, plan = qmp_peer
    plan.extend([stale, stale])
    assert qmp_execute(path, "query-status", timeout=5) == {"status": "running"}
    assert plan == []


def test_a_peer_that_never_greets_properly_is_a_machine_error(
        qmp_peer: tuple[Path, list[str]]) -> None:
    path, plan = qmp_peer
    plan.extend(["before-greeting"] * 3)
    with pytest.raises(MachineError, match=r"QMP query-status failed.*Greeting"):
        qmp_execute(path, "query-status", timeout=5)
