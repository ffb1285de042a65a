"""Live kernel update on real guests and kernels, checked from inside and from a client."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL, Service
from transmigrate.errors import KernelNotFound, TransmigrateError
from transmigrate.interfaces.remote import Remote
from transmigrate.migrate.engine import MigrationFailed
from transmigrate.migrate.plan import GUEST_TOOLS, HOLD_DIR
from transmigrate.migrate.precheck import PrecheckFailed
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.history import History
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.services import LoadClient, redis_cli, start_redis
from transmigrate.orchestrate.update import find_services, update
from transmigrate.polling import wait_for

from ..conftest import CLI

OLDER_KERNEL = "6.1.0-47"
ZOO = Path(__file__).parent.parent / "migrate" / "programs" / "zoo.py"
DIRTIER = ZOO.with_name("dirtier.py")
VM = "t-svc"


@pytest.fixture
def service_vm(prepared: Host) -> Iterator[str]:
    """A fresh VM for one update; whatever it ends up as is stopped afterwards."""
    yield VM
    for machine in prepared.machines.all():
        if machine.name in (VM, f"{VM}-next"):
            lifecycle.down(prepared, machine.name)


def _redis_under_load(host: Host, kernel_from: str, kernel_to: str,
                      also: Callable[[Host], int] | None = None,
                      **update_args: Any) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Update with our client connected; the report records the guest's ESTAB sockets
    (taken while the client still holds its connection), the client's summary, and
    the key count before."""
    lifecycle.up(host, VM, kernel_from, memory_mib=768)
    pid = start_redis(host, VM)
    address = host.machines.get(VM).record.ip
    lifecycle.exec_in(host, VM, ["redis-cli", "DEBUG", "POPULATE", "20000"])
    pids = [pid] if also is None else [pid, also(host)]
    client = LoadClient(host, address)
    try:
        time.sleep(1.0)
        keys = int(redis_cli(host, address, "DBSIZE"))
        report = update(host, VM, kernel_to, pids=pids, **update_args).as_dict()
        time.sleep(1.0)
        report["established"] = lifecycle.exec_in(host, VM, [
            "ss", "-Htn", "state", "established", "sport", "= :6379"]).text
    finally:
        summary = client.stop()
    return report, summary, keys


def _written(host: Host, path: str, failure: str, timeout: float = 60.0) -> str:
    """The contents of file ``path`` in the test VM, once something has written it."""
    deadline = time.monotonic() + timeout
    while (done := lifecycle.exec_in(host, VM, ["sh", "-c", f"test -s {path} && cat {path}"])
           ).exit_code:
        assert time.monotonic() < deadline, failure
        time.sleep(0.2)
    return done.text


def _assert_same_connection(summary: dict[str, Any]) -> None:
    assert summary["errors"] == []
    assert summary["client_id_start"] == summary["client_id_end"]
    assert summary["out_of_order"] == 0
    assert summary["replies"] > 100


def test_redis_moves_6_1_to_6_12_with_its_connection(prepared: Host, service_vm: str) -> None:
    """With a second, unrelated tree: both are frozen, moved and committed together."""
    report, summary, keys = _redis_under_load(prepared, ACTIVE_KERNEL, STANDBY_KERNEL,
                                              also=_start_ticker)
    _assert_same_connection(summary)
    ticker = report["pids"][1]
    assert len(report["criu"]) == 2 and report["criu"][1]["pid"] == ticker
    time.sleep(0.5)
    counts = [int(n) for n in lifecycle.exec_in(prepared, VM, [
        "cat", "/data/ticker"]).text.split()]
    assert counts == list(range(1, len(counts) + 1)), "the count went on where it was"
    assert lifecycle.exec_in(prepared, VM, ["kill", "-0", str(ticker)]).exit_code == 0
    machine = prepared.machines.get(VM)
    assert machine.record.kernel == report["kernel_after"]
    assert lifecycle.exec_in(prepared, VM, ["uname", "-r"]).text.strip() == report["kernel_after"]
    assert int(redis_cli(prepared, machine.record.ip, "DBSIZE")) == keys
    assert "198.18.0.1:" in report["established"], "the client's connection is ESTAB there"
    aof = lifecycle.exec_in(prepared, VM, ["redis-cli", "INFO", "persistence"]).text
    assert "aof_enabled:1" in aof and "aof_last_write_status:ok" in aof
    assert report["criu"][0]["dump"]["frozen_time"] > 0
    assert report["criu"][0]["restore"]["pages_restored"] > 0
    assert report["criu"][0]["precopy"][0]["pages_written"] > 0
    assert set(report["steps"]) >= {"boot standby", "precheck", "pre-copy", "final dump",
                                    "handover", "restore", "verify", "commit",
                                    "merge data"}
    assert not [m for m in prepared.machines.all() if m.name == f"{VM}-next"]
    assert report["warnings"] == []
    kept = Path(report["logs"])  # a move that went well keeps its logs too
    assert {f"{VM}.console.log", f"{VM}-next.console.log"} <= {p.name for p in kept.iterdir()}
    for tar in (f"{VM}.criu-logs.tar", f"{VM}-next.criu-logs.tar"):
        with tarfile.open(kept / tar) as logs:
            assert [name for name in logs.getnames() if name.endswith(".log")], tar
    assert machine.record.data_overlay == "" and not machine.data_overlay.exists(), \
        "the new VM's data overlay is merged into the volume"
    # What the new VM wrote before its data overlay was merged is on the volume itself.
    # debugfs does not replay ext4's journal: freezing /data checkpoints it in place.
    lifecycle.exec_in(prepared, VM, ["sh", "-c", "fsfreeze -f /data; fsfreeze -u /data"])
    on_volume = _volume(prepared, "cat /ticker").split()
    assert on_volume[:len(counts)] == [str(n) for n in counts]


def test_older_kernel_by_stop_and_copy(prepared: Host, service_vm: str) -> None:
    """From an older 6.1 point release, with neither pre-copy nor post-copy (6.12 -> 6.1
    is in test_packages, with three services and their clients)."""
    report, summary, _ = _redis_under_load(prepared, OLDER_KERNEL, ACTIVE_KERNEL,
                                           copy="stop")
    _assert_same_connection(summary)
    assert report["kernel_before"].startswith(OLDER_KERNEL)
    assert report["kernel_after"].startswith(ACTIVE_KERNEL)
    assert report["criu"][0]["precopy"] == []
    assert report["copy"] == "stop-and-copy"


TICKER = ("import os, time\n"
          "n = 0\n"
          "with open('/data/ticker.pid', 'w') as f: f.write(str(os.getpid()))\n"
          "while True:\n"
          "    n += 1\n"
          "    with open('/data/ticker', 'a') as f: f.write(f'{n}\\n')\n"
          "    time.sleep(0.05)\n")


def _start_ticker(host: Host) -> int:
    """A second, unrelated tree: counts in memory and appends each count to /data."""
    lifecycle.exec_in(host, VM, ["sh", "-c", "cat > /data/ticker.py"], input=TICKER.encode())
    lifecycle.exec_in(host, VM, ["sh", "-c", "setsid python3 /data/ticker.py "
                                 "</dev/null >/dev/null 2>&1 &"])
    return int(_written(host, "/data/ticker.pid", "the ticker did not start"))


def test_post_copy_moves_redis_with_its_connection(prepared: Host, service_vm: str) -> None:
    report, summary, keys = _redis_under_load(prepared, ACTIVE_KERNEL, STANDBY_KERNEL,
                                              copy="post")
    _assert_same_connection(summary)
    assert report["copy"] == "post-copy"
    assert report["criu"][0]["precopy"] == []
    assert report["criu"][0]["restore"]["pages_restored"] > 0
    assert "post-copy transfer" in report["steps"]
    assert int(redis_cli(prepared, prepared.machines.get(VM).record.ip, "DBSIZE")) == keys


def _fixed_sha(host: Host, pid: int) -> str:
    lifecycle.exec_in(host, VM, ["sh", "-c", f"rm -f /data/dirtier/fixed.sha; kill -USR1 {pid}"])
    return _written(host, "/data/dirtier/fixed.sha", "the dirtier wrote no checksum")


def test_auto_switches_to_post_copy_when_pre_copy_does_not_converge(
        prepared: Host, service_vm: str) -> None:
    lifecycle.up(prepared, VM, ACTIVE_KERNEL, memory_mib=768)
    lifecycle.exec_in(prepared, VM, ["sh", "-c", "mkdir -p /data/dirtier && "
                                     "cat > /data/dirtier/dirtier.py"], input=DIRTIER.read_bytes())
    lifecycle.exec_in(prepared, VM, ["sh", "-c", "setsid python3 /data/dirtier/dirtier.py "
                                     "</dev/null >/data/dirtier/out 2>&1 &"])
    pid = int(_written(prepared, "/data/dirtier/pid", "the dirtier did not start"))
    before = _fixed_sha(prepared, pid)
    report = update(prepared, VM, STANDBY_KERNEL, pids=[pid])
    assert report.copy == "post-copy"
    assert report.criu[0]["precopy"], "pre-copy ran first"
    assert lifecycle.exec_in(prepared, VM, ["uname", "-r"]).text.startswith("6.12.")
    assert _fixed_sha(prepared, pid) == before


def _start_zoo(host: Host, directory: str, *, container: bool) -> int:
    """The zoo in ``directory``; the root of its tree (in a container: its init)."""
    lifecycle.exec_in(host, VM, ["sh", "-c", f"mkdir -p {directory} && "
                                 f"cat > {directory}/zoo.py"], input=ZOO.read_bytes())
    command = f"setsid python3 {directory}/zoo.py"
    if container:
        command = f"unshare --ipc --uts --pid --net --fork {command} --container"
    lifecycle.exec_in(host, VM, ["sh", "-c",
                                 f"{command} </dev/null >{directory}/out 2>&1 &"])
    pid = _written(host, f"{directory}/pid", f"the zoo did not start: see {directory}/out")
    if not container:
        return int(pid)
    unshare = lifecycle.exec_in(host, VM, ["pgrep", "-o", "-f", f"{directory}/zoo.py"]).text
    return int(lifecycle.exec_in(host, VM, ["pgrep", "-o", "-P", unshare.split()[0]]).text)


def _zoo_report(host: Host, directory: str, pid: int) -> dict[str, list[Any]]:
    lifecycle.exec_in(host, VM, ["kill", "-USR1", str(pid)])
    report: dict[str, list[Any]] = json.loads(
        _written(host, f"{directory}/report.json", "the zoo wrote no report", timeout=30))
    return report


@pytest.fixture(scope="module")
def moved_zoos(prepared: Host) -> dict[str, dict[str, list[Any]]]:
    """The zoo twice, moved by one update as two trees: a plain process tree, and a
    container in its own pid, IPC, UTS and network namespaces."""
    lifecycle.up(prepared, VM, ACTIVE_KERNEL, memory_mib=1024)
    try:
        plain = _start_zoo(prepared, "/data/zoo", container=False)
        container = _start_zoo(prepared, "/data/zoo-container", container=True)
        report = update(prepared, VM, STANDBY_KERNEL, pids=[plain, container])
        assert lifecycle.exec_in(prepared, VM, ["uname", "-r"]).text.startswith("6.12.")
        assert report.pids[0] == plain, "a tree in the VM's pid namespace keeps its pid"
        return {"plain": _zoo_report(prepared, "/data/zoo", report.pids[0]),
                "container": _zoo_report(prepared, "/data/zoo-container", report.pids[1])}
    finally:
        for machine in prepared.machines.all():
            if machine.name in (VM, f"{VM}-next"):
                lifecycle.down(prepared, machine.name)


ZOO_KINDS = ["pid", "cgroup", "memory_anonymous", "memory_file_shared", "memory_file_private",
             "memory_shared_with_child", "memfd", "threads", "itimer", "signal_handler",
             "pending_signal", "signalfd", "timerfd", "file_offset_flags", "pipe", "fifo",
             "epoll", "eventfd", "unlinked_file", "unix_stream", "unix_dgram"]


@pytest.mark.parametrize("kind", ZOO_KINDS)
def test_resource_survives_6_1_to_6_12(moved_zoos: dict[str, dict[str, list[Any]]],
                                       kind: str) -> None:
    ok, detail = moved_zoos["plain"][kind]
    assert ok, detail


@pytest.mark.parametrize("kind", [*ZOO_KINDS, "sysv_shm", "uts_namespace"])
def test_container_survives_6_1_to_6_12(moved_zoos: dict[str, dict[str, list[Any]]],
                                        kind: str) -> None:
    ok, detail = moved_zoos["container"][kind]
    assert ok, detail


def _volume(host: Host, request: str) -> str:
    """``debugfs -R request`` on the test VM's data volume, read from the host."""
    volume = host.machines.get(VM).record.data_volume
    return subprocess.run(["debugfs", "-R", request, volume], capture_output=True, text=True,
                          check=True).stdout


def _rollback(host: Host, sabotage: Callable[[Host], None], at_step: str,
              **update_args: Any) -> None:
    lifecycle.up(host, VM, ACTIVE_KERNEL, memory_mib=768)
    pid = start_redis(host, VM)
    address = host.machines.get(VM).record.ip
    lifecycle.exec_in(host, VM, ["redis-cli", "DEBUG", "POPULATE", "5000"])
    kernel = host.machines.get(VM).record.kernel
    client = LoadClient(host, address)
    try:
        keys = int(redis_cli(host, address, "DBSIZE"))

        def before_step(step: str) -> None:
            if step == at_step:
                sabotage(host)

        with pytest.raises(MigrationFailed, match="rolled back") as failed:
            update(host, VM, STANDBY_KERNEL, pids=[pid], before_step=before_step,
                   **update_args)
        time.sleep(1.0)
    finally:
        summary = client.stop()
    kept = re.search(r"; logs in (\S+)$", str(failed.value))
    assert kept, "a failed move names where its logs are"
    with tarfile.open(Path(kept.group(1)) / f"{VM}.criu-logs.tar") as logs:
        assert [name for name in logs.getnames() if name.endswith(".log")], "CRIU's logs"
    _assert_same_connection(summary)
    assert host.machines.get(VM).record.kernel == kernel
    assert int(redis_cli(host, address, "DBSIZE")) == keys
    assert redis_cli(host, address, "SET", "after-rollback", "1") == "OK"
    assert not [m for m in host.machines.all() if m.name == f"{VM}-next"]


def _kill_target(host: Host) -> None:
    pid = host.machines.get(f"{VM}-next").pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)


def _kill_target_once_it_wrote_the_volume(host: Host) -> None:
    """Kill the target's QEMU as soon as it has mounted the data volume (mounting
    writes the superblock, which lands in the target's data overlay); note first
    whether QEMU holds the volume itself read-only."""
    target = host.machines.get(f"{VM}-next")
    pid, overlay, volume = target.pid, target.data_overlay, target.record.data_volume
    assert pid is not None
    size = overlay.stat().st_size
    nodes = target.qmp("query-named-block-nodes")
    assert isinstance(nodes, list)
    _seen["volume read-only"] = all(n["ro"] for n in nodes if n["file"] == volume)
    _seen["volume nodes"] = sum(n["file"] == volume for n in nodes)

    def kill_once_written() -> None:
        deadline = time.monotonic() + 60
        while overlay.stat().st_size == size and time.monotonic() < deadline:
            time.sleep(0.005)
        _seen["killed after a write"] = overlay.stat().st_size > size
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill_once_written, daemon=True).start()


_seen: dict[str, object] = {}


def _cut_migration_link(host: Host) -> None:
    host.network.detach(host.machines.get(f"{VM}-next").record.migration_tap)


def test_rollback_after_target_mounted_the_volume(prepared: Host, service_vm: str) -> None:
    """The target's writes went to its overlay: the volume was read-only to its QEMU."""
    _seen.clear()
    _rollback(prepared, _kill_target_once_it_wrote_the_volume, "restore")
    assert _seen == {"volume read-only": True, "volume nodes": 2, "killed after a write": True}


def test_rollback_when_transfer_breaks(prepared: Host, service_vm: str) -> None:
    _rollback(prepared, _cut_migration_link, "final dump")


def test_rollback_when_target_dies_mid_post_copy_restore(prepared: Host,
                                                         service_vm: str) -> None:
    _rollback(prepared, _kill_target, "restore", copy="post")


COUNTING_LOOP = "i=0; while :; do i=$((i + 1)); echo $i > /data/ticks/$$; sleep 0.3; done"


def _ticks(host: Host, pids: list[int]) -> list[int]:
    out = lifecycle.exec_in(host, VM, ["sh", "-c", " ".join(
        f"cat /data/ticks/{pid};" for pid in pids)]).text
    return [int(n) for n in out.split()]


def test_a_hold_that_gives_up_rolls_back_every_tree(prepared: Host, service_vm: str) -> None:
    """Ten trees move together; one's hold gives up (its tree resumes on the old VM)
    once all are dumped: the move is undone whole, every tree runs on the old VM and
    none on the new one."""
    lifecycle.up(prepared, VM, ACTIVE_KERNEL, memory_mib=512)
    started = lifecycle.exec_in(prepared, VM, ["sh", "-c", "mkdir -p /data/ticks && " + " ".join(
        f"setsid sh -c '{COUNTING_LOOP}' </dev/null >/dev/null 2>&1 &" for _ in range(10))
        + " sleep 2; ls /data/ticks"])
    pids = sorted(int(pid) for pid in started.text.split())
    assert len(pids) == 10, started.text

    def give_up(step: str) -> None:
        if step == "commit":  # every tree is dumped, held, and restored on the new VM
            source = prepared.agent(prepared.machines.get(VM))
            source.run([f"{GUEST_TOOLS}/tm-migrate", "decide", "abort", f"{HOLD_DIR}/3"])

    with pytest.raises(MigrationFailed, match=r"commit failed: .*the hold in .*/3: abort"):
        update(prepared, VM, STANDBY_KERNEL, pids=pids, copy="stop", before_step=give_up)
    assert prepared.machines.get(VM).record.kernel.startswith(ACTIVE_KERNEL)
    assert not [m for m in prepared.machines.all() if m.name == f"{VM}-next"]
    before = _ticks(prepared, pids)
    time.sleep(1.5)
    after = _ticks(prepared, pids)
    assert all(b > a for a, b in zip(before, after, strict=True)), "every tree runs on"


def _serve(port: int, log: Path) -> subprocess.Popen[str]:
    """`transmigrate serve` on loopback ``port``, once it has announced itself; what it
    says goes to ``log`` and into the error if it does not announce itself."""
    with log.open("a") as stderr:
        server = subprocess.Popen([str(CLI), "serve", "--listen", f"127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=stderr, text=True)

    def announced() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"serve ended ({server.returncode}): {log.read_text()}")
        return Remote.find(Path(os.environ["TRANSMIGRATE_STATE"])) is not None
    try:
        wait_for(announced, timeout=60, interval=0.1, what="serve did not announce itself")
    except TransmigrateError as exc:
        server.kill()
        raise AssertionError(f"{exc}; it said: {log.read_text()}") from exc
    return server


def test_a_controller_killed_mid_update_undoes_it_when_started_again(
        prepared: Host, service_vm: str, tmp_path: Path) -> None:
    """`transmigrate update` hands the move to the running controller and follows it;
    the controller is killed (SIGKILL) while it dumps: the command says so, the trees
    stay held on the old VM, and the controller started again removes the standby it
    left and resumes them, with their client's connection. The next update, handed to
    it, moves them; the history has both."""
    lifecycle.up(prepared, VM, ACTIVE_KERNEL, memory_mib=768)
    pid = start_redis(prepared, VM)
    address = prepared.machines.get(VM).record.ip
    client = LoadClient(prepared, address)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [str(CLI), "update", VM, "--kernel", STANDBY_KERNEL, "--pid", str(pid)]
    server = _serve(port, tmp_path / "serve.log")
    try:
        cut = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        assert cut.stderr is not None
        said = []
        for line in cut.stderr:
            said.append(line)
            if line.split()[1:] == ["final", "dump"]:
                break
        time.sleep(1.0)
        server.kill()
        server.wait()
        said += cut.stderr.readlines()
        assert cut.wait(timeout=60) == 1
        assert "the controller runs the update as operation" in "".join(said).replace(
            f" (pid {server.pid})", "")
        assert said[-1].startswith(f"transmigrate: error: the controller (pid {server.pid}) "
                                   f"at http://127.0.0.1:{port} does not answer"), said[-1]
        assert [m for m in prepared.machines.all() if m.name == f"{VM}-next"]
        server = _serve(port, tmp_path / "serve.log")  # undoes what the killed one left
        assert not [m for m in prepared.machines.all() if m.name == f"{VM}-next"]
        time.sleep(1.0)
        moved = subprocess.run([*argv, "--json"], capture_output=True, text=True,
                               timeout=600)
        assert moved.returncode == 0, moved.stderr
        assert f"the controller (pid {server.pid}) runs the update" in moved.stderr
        report = json.loads(moved.stdout)
        time.sleep(1.0)
    finally:
        summary = client.stop()
        server.terminate()
        assert server.wait(timeout=120) == 0, "a clean stop"
    _assert_same_connection(summary)
    assert report["kernel_after"].startswith(STANDBY_KERNEL) and report["pids"] == [pid]
    done, interrupted = History.at(prepared.state).recent(vm=VM, limit=2)
    assert (interrupted.kind, interrupted.outcome, interrupted.request["pids"]) == \
        ("update", "interrupted", [pid])
    assert (done.outcome, done.report) == ("done", report)


def test_unknown_kernel_touches_nothing(prepared: Host, old_vm: str) -> None:
    with pytest.raises(KernelNotFound, match="nearest"):
        update(prepared, old_vm, "6.12.999", pids=[1])
    assert [m.name for m in prepared.machines.all() if m.name.endswith("-next")] == []


def test_gone_pid_and_nothing_to_move(prepared: Host, old_vm: str) -> None:
    with pytest.raises(TransmigrateError, match="no process 999999"):
        find_services(prepared, old_vm, pids=[999999])
    with pytest.raises(TransmigrateError, match="nothing to move"):
        find_services(prepared, old_vm)
    with pytest.raises(TransmigrateError, match="no process named"):
        find_services(prepared, old_vm, processes=["no-such-daemon"])
    with pytest.raises(TransmigrateError, match="none of the declared services"):
        find_services(prepared, old_vm, declared=[Service("ghost", old_vm, "no-such-daemon")])
    with pytest.raises(TransmigrateError, match="name each once"):
        update(prepared, old_vm, STANDBY_KERNEL, pids=[1, 1])


def test_services_found_by_cgroup_one_root_per_tree(prepared: Host, old_vm: str) -> None:
    group = "/sys/fs/cgroup/tm-svc"
    tree = f"setsid sh -c 'echo $$ > {group}/cgroup.procs; sleep 300 & sleep 300' " \
        "</dev/null >/dev/null 2>&1 &"
    lifecycle.exec_in(prepared, old_vm, ["sh", "-c", f"mkdir -p {group}; {tree}"])
    try:
        time.sleep(0.5)
        [root] = find_services(prepared, old_vm, cgroups=["tm-svc"])
        assert lifecycle.exec_in(prepared, old_vm, ["cat", f"/proc/{root}/comm"]).text == "sh\n"
        lifecycle.exec_in(prepared, old_vm, ["sh", "-c", tree])
        time.sleep(0.5)
        roots = find_services(prepared, old_vm, cgroups=["/tm-svc/"])
        assert len(roots) == 2 and root in roots
    finally:
        lifecycle.exec_in(prepared, old_vm, ["sh", "-c", (
            f"kill -KILL $(cat {group}/cgroup.procs); sleep 0.2; rmdir {group}")])
    with pytest.raises(TransmigrateError, match="no cgroup tm-none"):
        find_services(prepared, old_vm, cgroups=["tm-none"])


def test_every_declared_service_that_runs_is_moved(prepared: Host, old_vm: str) -> None:
    roots = find_services(prepared, old_vm, declared=[
        Service(name, old_vm, name) for name in ("qemu-ga", "no-such-daemon", "tini")])
    assert [lifecycle.exec_in(prepared, old_vm, ["cat", f"/proc/{pid}/comm"]).text.strip()
            for pid in roots] == ["qemu-ga", "tini"]


def test_precheck_refuses_what_cannot_move(prepared: Host, service_vm: str) -> None:
    """A small file only the old VM has would be carried; a large one, a device, or a
    UNIX socket bound in a directory the new VM lacks, not; files of /proc are no files."""
    lifecycle.up(prepared, VM, ACTIVE_KERNEL, memory_mib=512)
    listen = (r'import os, socket, time; os.makedirs(\"/run/tm-sock\"); '
              r's = socket.socket(socket.AF_UNIX); s.bind(\"/run/tm-sock/s\"); s.listen(); '
              r'time.sleep(600)')
    lifecycle.exec_in(prepared, VM, ["sh", "-c", (
        "echo local > /var/tmp/only-here; head -c 9M /dev/zero > /var/tmp/big-here; "
        "setsid sh -c 'exec 3</var/tmp/only-here 4</dev/vda 5</var/tmp/big-here 6</proc/uptime; "
        f'python3 -c "{listen}" & sleep 600\' </dev/null >/dev/null 2>&1 & '
        "for i in $(seq 300); do [ -S /run/tm-sock/s ] && break; sleep 0.1; done")])
    [pid] = find_services(prepared, VM, processes=["sleep"])
    pid = int(lifecycle.exec_in(prepared, VM, ["cat", f"/proc/{pid}/stat"]).text.split()[3])
    with pytest.raises(PrecheckFailed) as caught:
        update(prepared, VM, STANDBY_KERNEL, pids=[pid])
    message = str(caught.value)
    assert message.startswith("cannot move from t-svc: 3 reasons\n")
    assert "/var/tmp/big-here: not the same in t-svc-next, too large to copy" in message
    assert "have device /dev/vda open" in message
    assert "/run/tm-sock: missing in t-svc-next, where the processes' bound UNIX" in message
    assert "only-here" not in message and "/proc" not in message
    assert all(len(line) < 160 for line in message.splitlines()), message
    assert {r.cause for r in caught.value.refusals} == {"large-file", "device", "socket-dir"}
    assert lifecycle.exec_in(prepared, VM, ["kill", "-0", str(pid)]).exit_code == 0
