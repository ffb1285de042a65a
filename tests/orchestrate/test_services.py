"""Declared services on real guests: started movable (state on the volume, own session
and IPC namespace, held by tm-service), moved by `update` with their state, and the
precheck's refusals of what would silently stay behind."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL, load_config
from transmigrate.migrate.precheck import PrecheckFailed, inspect_source
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.update import find_services, update

from ..conftest import cli

VM = "t-decl"
CONFIG = f"""
[services.cache]
vm = "{VM}"
start = ["redis-server", "/etc/redis/redis.conf", "--daemonize", "yes", "--bind", "0.0.0.0",
         "--protected-mode", "no"]
process = "redis-server"
state = ["/etc/redis", "/var/lib/redis", "/var/log/redis", "/run/redis"]
"""


@pytest.fixture
def declared(prepared: Host, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "transmigrate.toml"
    path.write_text(CONFIG)
    lifecycle.up(prepared, VM, ACTIVE_KERNEL, memory_mib=512)
    yield path
    lifecycle.down(prepared, VM)


def _sh(host: Host, script: str) -> str:
    return lifecycle.exec_in(host, VM, ["sh", "-c", script]).check(script, VM).text


def _status(config: Path) -> dict[str, Any]:
    done = cli("status", VM, "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    [status] = json.loads(done.stdout)
    assert isinstance(status, dict)
    return status


def test_a_declared_daemon_moves_with_its_state(prepared: Host, declared: Path) -> None:
    started = cli("start", VM, "--config", str(declared))
    assert started.returncode == 0, started.stderr
    status = _status(declared)
    assert status["running"] and status["own_ipc"]
    assert status["state"] == dict.fromkeys(
        ["/etc/redis", "/var/lib/redis", "/var/log/redis", "/run/redis"], True)
    holder = status["root"]
    # Written after start, outside /data: the config file, the data, the log.
    _sh(prepared, "redis-cli SET k moved && redis-cli CONFIG SET maxmemory-policy "
                  "allkeys-lru && redis-cli CONFIG REWRITE && redis-cli SAVE")

    [root] = find_services(prepared, VM, declared=load_config(declared).services_of(VM))
    assert root == holder, "update moves the holder, with the daemon it adopted"
    report = update(prepared, VM, STANDBY_KERNEL, pids=[root])
    assert report.kernel_after.startswith(STANDBY_KERNEL)

    assert _sh(prepared, "redis-cli GET k").strip() == "moved"
    assert "allkeys-lru" in _sh(prepared, "grep ^maxmemory-policy /etc/redis/redis.conf")
    assert _sh(prepared, "ls /var/lib/redis").split() == ["dump.rdb"]
    after = _status(declared)
    assert after["running"] and after["own_ipc"] and after["root"] == holder
    assert all(after["state"].values())

    stopped = cli("stop", VM, "--config", str(declared))
    assert stopped.returncode == 0, stopped.stderr
    assert "cache stopped" in stopped.stdout
    assert _status(declared)["running"] is False
    assert _sh(prepared, "pgrep -c -x redis-server || true").strip() == "0"


def test_unknown_service_and_nothing_declared(prepared: Host, old_vm: str,
                                              tmp_path: Path) -> None:
    path = tmp_path / "transmigrate.toml"
    path.write_text(CONFIG)
    done = cli("start", VM, "nosuch", "--config", str(path))
    assert done.returncode == 1
    assert "no service 'nosuch' is declared for t-decl; declared: cache" in done.stderr
    done = cli("status", old_vm, "--config", str(path))
    assert done.returncode == 1 and f"no service is declared for {old_vm}" in done.stderr


def _refusals(host: Host, vm: str, root: int) -> dict[str, list[str]]:
    inspection = inspect_source(host.agent(host.machines.get(vm)), [root])
    found: dict[str, list[str]] = {}
    for refusal in inspection.refusals:
        found.setdefault(refusal.cause, []).append(refusal.detail)
    return found


def test_sysv_semaphores_in_the_vms_namespace_are_refused(prepared: Host, old_vm: str) -> None:
    agent = prepared.agent(prepared.machines.get(old_vm))
    semaphore = agent.run(["ipcmk", "-S", "1"]).text.split()[-1]
    queue = agent.run(["ipcmk", "-Q"]).text.split()[-1]
    root = int(agent.sh("setsid -f sh -c 'echo $$ > /tmp/sem-root; exec sleep 300' "
                        "</dev/null >/dev/null 2>&1; sleep 0.5; cat /tmp/sem-root").text)
    try:
        refusals = _refusals(prepared, old_vm, root)
        assert refusals["sysv-sem"] == [semaphore]
        assert refusals["sysv-msg"] == [queue]
        own = int(agent.sh("setsid -f unshare --ipc sh -c 'echo $$ > /tmp/own-root; exec "
                           "sleep 300' </dev/null >/dev/null 2>&1; sleep 0.5; "
                           "cat /tmp/own-root").text)
        assert _refusals(prepared, old_vm, own) == {}, "its own namespace has none"
    finally:
        agent.sh(f"ipcrm -s {semaphore} -q {queue}; pkill -s {root}; "
                 "pkill -s $(cat /tmp/own-root) || true")


def test_session_members_outside_the_tree_are_refused(prepared: Host, old_vm: str) -> None:
    agent = prepared.agent(prepared.machines.get(old_vm))
    leader = int(agent.sh(
        "setsid -f sh -c 'echo $$ > /tmp/leader; (sleep 300 &); exec sleep 301' "
        "</dev/null >/dev/null 2>&1; sleep 0.5; cat /tmp/leader").text)
    try:
        orphan = int(agent.sh(f"pgrep -s {leader} -x sleep | grep -vx {leader}").text)
        refusals = inspect_source(agent, [leader]).refusals
        assert [(r.cause, r.pid, r.detail) for r in refusals] == [
            ("session-member", orphan, str(leader))]
    finally:
        agent.sh(f"pkill -s {leader} || true")


def test_exec_passes_standard_input(old_vm: str) -> None:
    done = cli("exec", old_vm, "--", "wc", "-c", input="twelve bytes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "12"


APPENDER = """
import time
log = open("/var/log/tm-app.log", "a", buffering=1)
n = 0
while True:
    log.write(f"{n}\\n")
    n += 1
    time.sleep(0.05)
"""


def test_files_outside_the_volume_are_carried_and_root_changes_reported(
        prepared: Host, declared: Path) -> None:
    """A log held open outside /data moves at the size the process knows; an undeclared
    edit in /etc is a warning, and with strict a refusal before anything is frozen."""
    agent = prepared.agent(prepared.machines.get(VM))
    agent.run(["sh", "-c", "cat > /tmp/appender.py"], input=APPENDER.encode())
    root = int(agent.sh("setsid -f sh -c 'echo $$ > /tmp/appender.pid; exec python3 "
                        "/tmp/appender.py' </dev/null >/dev/null 2>&1; sleep 1; "
                        "cat /tmp/appender.pid").text)
    agent.sh("echo 'edited = yes' > /etc/tm-edited.conf")

    with pytest.raises(PrecheckFailed) as refused:
        update(prepared, VM, STANDBY_KERNEL, pids=[root], strict=True)
    assert "/etc/tm-edited.conf: changed since t-decl booted" in str(refused.value)
    assert "/var/log/tm-app.log" not in str(refused.value)
    assert prepared.machines.get(VM).record.kernel.startswith(ACTIVE_KERNEL)

    report = update(prepared, VM, STANDBY_KERNEL, pids=[root])
    assert report.carried == ["/var/log/tm-app.log"]
    assert any("/etc/tm-edited.conf" in warning for warning in report.warnings)
    time.sleep(1)
    lines = _sh(prepared, "cat /var/log/tm-app.log").split()
    assert lines == [str(n) for n in range(len(lines))], "nothing lost or doubled"
    assert len(lines) > 40
    time.sleep(0.5)
    assert len(_sh(prepared, "cat /var/log/tm-app.log").split()) > len(lines), "it appends on"
