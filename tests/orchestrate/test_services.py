"""Declared services and the precheck's refusals of what would silently stay behind, on
real guests. Declared services moving with their state and clients: test_packages."""

from __future__ import annotations

from pathlib import Path

from transmigrate.migrate.precheck import inspect_source
from transmigrate.orchestrate.host import Host

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
        inspection = inspect_source(agent, [leader])
        assert [(r.cause, r.pid, r.detail) for r in inspection.refusals] == [
            ("session-member", orphan, str(leader))]
        # What the precheck weighs the held dumps against: the VM's (512 MiB) memory left.
        assert inspection.available_mib is not None and 200 < inspection.available_mib < 512
    finally:
        agent.sh(f"pkill -s {leader} || true")


def test_exec_passes_standard_input(old_vm: str) -> None:
    done = cli("exec", old_vm, "--", "wc", "-c", input="twelve bytes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "12"

