"""The ``transmigrate`` command as a user runs it: results, JSON, and one-line errors."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path
from typing import IO

from transmigrate.config import ACTIVE_KERNEL
from transmigrate.orchestrate.history import History
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.services import redis_cli, start_redis
from transmigrate.polling import wait_for

from ..conftest import CLI, cli, operated_on_elsewhere, qemu_pids


def _one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("transmigrate: error: ")
    return str(lines[0])


def test_kernels_json_lists_the_archive(host: Host) -> None:
    done = cli("kernels", "--json")
    assert done.returncode == 0, done.stderr
    entries = json.loads(done.stdout)
    assert {"release", "version", "cached", "debug_cached", "package"} <= set(entries[0])


def test_unknown_kernel_fails_in_one_line(prepared: Host) -> None:
    before = qemu_pids()
    line = _one_line_error(cli("up", "t-bad", "--kernel", "6.1.0-999"))
    assert "nearest" in line
    assert qemu_pids() == before
    assert not any(m.name == "t-bad" for m in prepared.machines.all())


def test_exec_and_ls_through_the_cli(prepared: Host, old_vm: str) -> None:
    done = cli("exec", old_vm, "--", "sh", "-c", "uname -r; exit 4")
    assert done.returncode == 4
    assert done.stdout.strip() == prepared.machines.get(old_vm).record.kernel
    rows = json.loads(cli("ls", "--json").stdout)
    assert any(r["name"] == old_vm and r["status"] == "running" for r in rows)


def test_exec_on_missing_vm_fails_in_one_line(host: Host) -> None:
    assert "no VM named" in _one_line_error(cli("exec", "t-nothing", "--", "true"))


def test_down_of_a_vm_another_process_operates_on_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "TRANSMIGRATE_STATE": str(state)}
    with operated_on_elsewhere(state / "history.sqlite", "web") as (pid, operation):
        done = subprocess.run([str(CLI), "down", "web"], capture_output=True, text=True,
                              env=env, timeout=60)
        assert _one_line_error(done) == (f"transmigrate: error: web is busy: update "
                                         f"(operation {operation}) runs in process {pid}; "
                                         "wait for it to end")
    gone = subprocess.run([str(CLI), "down", "web"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert "no VM named 'web'" in _one_line_error(gone), "refused no longer"


def test_a_vm_without_a_kernel_fails_in_one_line(host: Host) -> None:
    assert "give --kernel, or declare vms.t-none.kernel" in _one_line_error(cli("up", "t-none"))


def test_a_declared_vm_boots_and_down_twice_fails_in_one_line(prepared: Host) -> None:
    """And a command running in it when it goes says so, rather than only that the
    agent's connection broke."""
    done = cli("-c", f'vms.t-twice.kernel="{ACTIVE_KERNEL}"', "-c", "vms.t-twice.data_mib=512",
               "up", "t-twice", "--memory", "256", "--json")
    assert done.returncode == 0, done.stderr
    booted = json.loads(done.stdout)
    assert booted["boot_seconds"] > 0 and booted["memory_mib"] == 256
    assert booted["kernel"].startswith(ACTIVE_KERNEL)
    assert prepared.volume("t-twice").stat().st_size == 512 << 20
    [kept] = History.at(prepared.state).recent(vm="t-twice", limit=1)
    assert (kept.kind, kept.outcome, kept.report["boot_seconds"]) == \
        ("up", "done", booted["boot_seconds"])
    running = subprocess.Popen([str(CLI), "exec", "t-twice", "sleep", "60"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    agent = prepared.agent(prepared.machines.get("t-twice"))
    with open(agent.lock_path, "a") as lock:  # the exec holds the agent while it runs
        wait_for(lambda: _held(lock), timeout=60, interval=0.1, what="exec did not start")
    assert cli("down", "t-twice").returncode == 0
    _, err = running.communicate(timeout=60)
    assert running.returncode == 1
    assert err.startswith("transmigrate: error: t-twice was removed while the command ran"), err
    assert "no VM named" in _one_line_error(cli("down", "t-twice"))


def _held(lock: IO[str]) -> bool:
    """Whether another process holds the flock on ``lock``."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(lock, fcntl.LOCK_UN)
    return False


def test_redis_answers_a_client_in_the_namespace(prepared: Host, old_vm: str) -> None:
    start_redis(prepared, old_vm)
    address = prepared.machines.get(old_vm).record.ip
    assert redis_cli(prepared, address, "PING") == "PONG"
    done = cli("client", "--", "redis-cli", "-h", address, "SET", "k", "v")
    assert (done.returncode, done.stdout.strip()) == (0, "OK")
    assert redis_cli(prepared, address, "GET", "k") == "v"
