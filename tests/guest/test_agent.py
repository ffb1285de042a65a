"""The guest agent: commands through a real guest, and a hostile peer that must not hurt us."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from transmigrate.errors import AgentError, GuestCommandFailed
from transmigrate.guest.agent import FILE_PIECE, GUEST_EXEC_MAX_OUTPUT, MAX_MESSAGE, GuestAgent
from transmigrate.orchestrate.host import Host


@pytest.fixture
def agent(prepared: Host, old_vm: str) -> GuestAgent:
    return prepared.agent(prepared.machines.get(old_vm))


def test_exec_passes_exit_code_and_output(agent: GuestAgent) -> None:
    result = agent.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (result.exit_code, result.stdout, result.stderr) == (7, b"out\n", b"err\n")


def test_check_names_the_command_and_its_last_words(agent: GuestAgent) -> None:
    assert agent.exec(["true"]).check("nothing").exit_code == 0
    with pytest.raises(GuestCommandFailed, match=r"^frobbing failed in t-old \(exit 3\): oops$"):
        agent.exec(["sh", "-c", "echo first >&2; echo oops >&2; exit 3"]).check("frobbing", "t-old")


def test_exec_feeds_stdin(agent: GuestAgent) -> None:
    assert agent.exec(["wc", "-c"], input=b"x" * 1000).text.strip() == "1000"


def test_exec_timeout_kills_the_command(agent: GuestAgent) -> None:
    with pytest.raises(AgentError, match="did not finish"):
        agent.exec(["sleep", "30"], timeout=1.0)
    assert not [p for p in agent.processes() if p.args == "sleep 30"]


def test_processes_include_init_and_agent(agent: GuestAgent) -> None:
    processes = {p.pid: p for p in agent.processes()}
    assert processes[1].comm == "tini"
    assert any(p.comm == "qemu-ga" for p in processes.values())


def test_large_output_arrives_whole(agent: GuestAgent) -> None:
    result = agent.exec(["head", "-c", "3000000", "/dev/zero"])
    assert len(result.stdout) == 3_000_000


def test_output_past_the_agents_limit_is_an_error_not_a_cut(agent: GuestAgent) -> None:
    with pytest.raises(AgentError, match="limit"):
        agent.exec(["head", "-c", str(GUEST_EXEC_MAX_OUTPUT + 1), "/dev/zero"])


def test_a_file_larger_than_one_message_goes_both_ways(agent: GuestAgent) -> None:
    """Three pieces and a ragged end, with every byte value, through a real qemu-ga."""
    data = bytes(range(256)) * ((2 * FILE_PIECE + 12345) // 256)
    agent.write_file("/tmp/t-agent-file", data)
    try:
        assert agent.exec(["wc", "-c", "/tmp/t-agent-file"]).text.split()[0] == str(len(data))
        assert agent.read_file("/tmp/t-agent-file") == data
    finally:
        agent.exec(["rm", "-f", "/tmp/t-agent-file"])


def test_a_missing_file_is_a_clear_error(agent: GuestAgent) -> None:
    with pytest.raises(AgentError, match="guest-file-open"):
        agent.read_file("/nonexistent/t-agent")


class _HostileAgent:
    """A peer on the agent socket that answers sync, then misbehaves as told."""

    def __init__(self, path: Path, payload: bytes) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.payload = payload
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            data = b""
            while b"guest-sync-delimited" not in data:
                data += conn.recv(4096)
            token = data.split(b'"id": ')[1].split(b"}")[0]
            conn.sendall(b"\xff" + b'{"return": ' + token + b"}\n")
            conn.recv(4096)
            try:
                conn.sendall(self.payload)
                time.sleep(5)
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    yield tmp_path / "agent.sock", tmp_path / "agent.lock"


@pytest.mark.parametrize("payload, message", [
    (b"x" * (MAX_MESSAGE + 2 * 1024 * 1024), "more than"),
    (b"\x00garbage\n", "not JSON"),
    (b"[1, 2]\n", "not an object"),
    (b'{"return": {"pid": "nope"}}\n', "lacks 'pid'"),
    (b"", "did not answer in time"),
])
def test_hostile_guest_gets_a_clear_error(hostile: tuple[Path, Path], payload: bytes,
                                          message: str) -> None:
    sock, lock = hostile
    peer = _HostileAgent(sock, payload)
    try:
        start = time.monotonic()
        with pytest.raises(AgentError, match=message):
            GuestAgent(sock, lock).exec(["true"], timeout=2.0)
        assert time.monotonic() - start < 15
    finally:
        peer.close()
