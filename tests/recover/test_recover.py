"""Processes rebuilt from a dead kernel's memory, on real guests.

The golden comparison: a real `criu dump --leave-running` of a program that waits in
pause(), then the kernel panics at once (sysrq-c), and the images we build from its RAM
must say what CRIU's say: registers, FPU, mappings, every page, files and offsets,
credentials, signal handlers. Only ids and the split of the pages may differ.

The recovery: a counter that appends to a file on the data volume, its kernel killed,
rebuilt on the other kernel (both directions): it continues at N+1 with its memory and
FPU state intact, and the file has every line once.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import random
import struct
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import drgn
import pycriu.images  # type: ignore[import-untyped]
import pytest
from drgn.helpers.linux.fs import for_each_file
from drgn.helpers.linux.mm import for_each_vma
from drgn.helpers.linux.pid import find_task, for_each_task_in_group
from drgn.helpers.linux.sched import cpu_curr

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL, load_config
from transmigrate.errors import TransmigrateError
from transmigrate.guest.agent import GuestAgent
from transmigrate.introspect.kernel import attach
from transmigrate.introspect.process import saved_user_registers, unfinished_call
from transmigrate.migrate.plan import GUEST_TOOLS
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.recover import dump, prepare_standby, recover
from transmigrate.orchestrate.services import LoadClient, redis_answers, redis_cli, start_service
from transmigrate.polling import wait_for
from transmigrate.vm.registers import vcpu_states

from ..conftest import REDIS_SERVICE, cli

PROGRAM = Path(__file__).parent / "programs" / "counter.c"
STREAMS = Path(__file__).parent / "programs" / "streams.py"
BLOCKED_SEND = Path(__file__).parent / "programs" / "blocked_send.py"
APPENDER = Path(__file__).parent / "programs" / "appender.py"
SHARES_MEMORY = Path(__file__).parent / "programs" / "shares_memory.c"
_RECORD = 64 << 10
"""appender.py's record size."""


@pytest.fixture(scope="session")
def counter(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The stage-1 program, built on the host (the guests run the same Debian release)."""
    binary = tmp_path_factory.mktemp("counter") / "counter"
    subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", str(binary), str(PROGRAM)],
                   check=True)
    return binary.read_bytes()


def _start(agent: GuestAgent, counter: bytes, log: str, *args: str) -> int:
    """The program lives on the data volume, which the new VM mounts (unsynced: the
    dead kernel's page cache has it, and recovery writes it back)."""
    agent.sh(f"mountpoint -q /data || {GUEST_TOOLS}/tm-data mount; "
             "[ -x /data/counter ] || { cat > /data/counter && chmod +x /data/counter; }",
             input=counter)
    command = f"/data/counter {log} {' '.join(args)}".strip()
    return int(agent.sh(
        f"setsid -f {command} </dev/null >/dev/null 2>&1; "
        f"while ! [ -s {log} ]; do sleep 0.2; done; pgrep -xf '{command}'").text)


def _start_blocked_send(agent: GuestAgent) -> int:
    """blocked_send.py, on the data volume, once it waits inside send() (sendto, 44)."""
    agent.sh("cat > /data/blocked_send.py", input=BLOCKED_SEND.read_bytes())
    return int(agent.sh(
        "setsid -f python3 /data/blocked_send.py 7001 /data/send.log </dev/null >/dev/null "
        "2>&1; until grep -qx ready /data/send.log 2>/dev/null; do sleep 0.2; done; "
        "pid=$(pgrep -nf '^python3 /data/blocked_send.py'); "
        "until read -r call rest < /proc/$pid/syscall && [ \"$call\" = 44 ]; do sleep 0.2; "
        "done; sleep 1; echo $pid", what="starting blocked_send.py", timeout=120).text)


def _panic(host: Host, name: str) -> None:
    """Kill the guest's kernel at once; QEMU pauses it on the panic (pvpanic)."""
    machine = host.machines.get(name)
    host.agent(machine).spawn(["sh", "-c", "echo c > /proc/sysrq-trigger"])
    deadline = time.monotonic() + 30
    while machine.status() != "guest-panicked":
        assert time.monotonic() < deadline, f"{name} did not panic: {machine.status()}"
        time.sleep(0.1)


def _stop_in_user_code(host: Host, name: str, pid: int) -> None:
    """A plain QMP stop, at an instant when a thread of ``pid`` runs user code on vCPU 0:
    its registers, general and SSE, are then only in the vCPU."""
    machine = host.machines.get(name)
    for _ in range(200):
        machine.qmp("stop")
        if vcpu_states(machine, 1)[0].user_mode:
            with attach(machine, catalog=host.catalog) as guest:
                if int(cpu_curr(guest.prog, 0).tgid) == pid:
                    return
        machine.qmp("cont")
        time.sleep(random.uniform(0, 0.05))
    pytest.fail(f"process {pid} was never caught in user code")


def _entries(path: Path) -> list[dict[str, Any]]:
    with path.open("rb") as handle:
        entries: list[dict[str, Any]] = pycriu.images.load(handle)["entries"]
    return entries


def _pages(directory: Path, pid: int) -> dict[int, str]:
    """SHA-256 of every dumped page, by virtual address."""
    head, *runs = _entries(directory / f"pagemap-{pid}.img")
    data = (directory / f"pages-{head['pages_id']}.img").read_bytes()
    pages, offset = {}, 0
    for run in runs:
        for index in range(run["nr_pages"]):
            pages[run["vaddr"] + index * 4096] = hashlib.sha256(
                data[offset:offset + 4096]).hexdigest()
            offset += 4096
    return pages


def _shared_pages(directory: Path) -> list[str]:
    """SHA-256 of every dumped page of anonymous shared memory, in offset order."""
    hashes = []
    for pagemap in sorted(directory.glob("pagemap-shmem-*.img")):
        head, *runs = _entries(pagemap)
        data = (directory / f"pages-{head['pages_id']}.img").read_bytes()
        pages = sum(run["nr_pages"] for run in runs)
        hashes += [hashlib.sha256(data[i * 4096:(i + 1) * 4096]).hexdigest()
                   for i in range(pages)]
    return hashes


def _files(directory: Path, pid: int) -> dict[int, dict[str, Any]]:
    """Per descriptor of a regular file: its name, flags, offset, and close-on-exec."""
    files = {f["id"]: f["reg"] for f in _entries(directory / "files.img") if "reg" in f}
    ids = _entries(directory / f"ids-{pid}.img")[0]
    return {fd["fd"]: {"cloexec": fd["flags"], **{k: files[fd["id"]][k] for k in
                                                   ("name", "flags", "pos")}}
            for fd in _entries(directory / f"fdinfo-{ids['files_id']}.img")
            if fd["id"] in files}


def _vmas(directory: Path, pid: int) -> list[dict[str, Any]]:
    return [{k: v for k, v in vma.items() if k != "shmid"}
            for vma in _entries(directory / f"mm-{pid}.img")[0]["vmas"]]


def _assert_same_images(ours: Path, golden: Path, pid: int) -> None:
    threads = _entries(golden / "pstree.img")[0]["threads"]
    assert len(threads) == 2, "the leader and its waiting thread"
    for tid in threads:
        theirs_core = _entries(golden / f"core-{tid}.img")[0]
        our_core = _entries(ours / f"core-{tid}.img")[0]
        for key in ("gpregs", "fpregs", "tls", "clear_tid_addr"):
            assert our_core["thread_info"][key] == theirs_core["thread_info"][key], (tid, key)
        for key in ("creds", "sas", "rseq_entry", "comm", "sched_nice", "sched_policy",
                    "futex_rla", "futex_rla_len", "blk_sigset"):
            assert our_core["thread_core"].get(key) == theirs_core["thread_core"].get(key), \
                (tid, key)
    theirs_core = _entries(golden / f"core-{pid}.img")[0]
    our_core = _entries(ours / f"core-{pid}.img")[0]
    for key in ("blk_sigset", "comm", "personality", "sigactions", "rlimits", "timers",
                "loginuid", "oom_score_adj", "flags"):
        assert our_core["tc"][key] == theirs_core["tc"][key], key
    assert _vmas(ours, pid) == _vmas(golden, pid)
    assert [(v["flags"], v["fdflags"]) for v in _vmas(golden, pid)
            if v["status"] & 0x4080 == 0x80] == [(1, 2), (1, 2)], \
        "shared mappings (MAP_SHARED) of a file on the volume and of one on a tmpfs"
    assert [v["flags"] for v in _vmas(golden, pid) if v["status"] & 0x4000] == [1], \
        "anonymous shared memory, which CRIU 3.17 takes for a memfd (VMA_AREA_MEMFD)"
    assert _entries(ours / "memfd.img")[0]["size"] == _entries(golden / "memfd.img")[0][
        "size"] == 4096
    assert _shared_pages(ours) == _shared_pages(golden) != []
    theirs_mm = _entries(golden / f"mm-{pid}.img")[0]
    our_mm = _entries(ours / f"mm-{pid}.img")[0]
    assert {k: v for k, v in our_mm.items() if k not in ("vmas", "exe_file_id")} == \
        {k: v for k, v in theirs_mm.items() if k not in ("vmas", "exe_file_id")}
    assert _pages(ours, pid) == _pages(golden, pid)
    assert _files(ours, pid) == _files(golden, pid)
    assert _non_regular_files(ours, pid) == _non_regular_files(golden, pid)
    assert _queues(ours, pid) == _queues(golden, pid)
    assert _entries(ours / "pstree.img") == _entries(golden / "pstree.img")
    assert _locks(ours) == _locks(golden)
    assert [(lock["flag"], lock["type"]) for lock in _locks(golden)] == [
        (1, 1), (1, 0), (2, 1)], "POSIX write and read locks, and a flock"
    theirs_clock, our_clock = (_entries(d / "timens-0.img")[0]["monotonic"]
                               for d in (golden, ours))
    assert 0 <= our_clock["tv_sec"] - theirs_clock["tv_sec"] < 120, "the clock at the death"
    images = [i for i in ours.glob("*.img") if not i.name.startswith("pages-")]
    assert len(images) >= 9, images
    for image in images:
        decoded = subprocess.run(["crit", "decode", "-i", str(image)],
                                 capture_output=True, text=True, check=False)
        assert decoded.returncode == 0, (image.name, decoded.stderr)


def _locks(directory: Path) -> list[dict[str, Any]]:
    """filelocks.img's entries, in a stable order (CRIU's follows /proc/locks)."""
    return sorted(_entries(directory / "filelocks.img"),
                  key=lambda lock: (lock["pid"], lock["flag"], lock["start"]))


def _lines(agent: GuestAgent, log: str) -> list[str]:
    return agent.run(["cat", log], what="reading the counter's log").text.splitlines()


@pytest.mark.parametrize(("before", "after"), [(ACTIVE_KERNEL, STANDBY_KERNEL),
                                               (STANDBY_KERNEL, ACTIVE_KERNEL)])
def test_processes_are_rebuilt_from_a_panicked_kernel(prepared: Host, counter: bytes,
                                                      before: str, after: str,
                                                      tmp_path: Path) -> None:
    """One guest per direction: the golden program waits in pause() (and its second
    thread on a futex) and the counter counts with a waiting and a computing thread,
    under a shell waiting for it, each holding its log with a flock and a POSIX lock
    and a number in a shared mapping of a file, in anonymous shared memory, in a UNIX
    socketpair, and in a FIFO and POSIX shared memory on a tmpfs (made again with their
    contents, as the shell's working directory there is); the 6.1 kernel panics, the
    6.12 VM is stopped while the computing thread runs user code (its registers only
    in the vCPU); the paused
    one's images match CRIU's own dump of it, and the shell and its counter (a process
    tree) go on in the new VM on the other kernel (6.12 -> 6.1 through the CLI), its
    locks held again and its mapping holding its last number. A
    process caught inside send() on a connection is restored with that connection cut
    (named as its loss): its send fails, it carries on, and the other end gets a reset.
    One holding a file the new VM lacks is named, and, its kernel dead, the others go
    on without it."""
    name = f"t-rec-{before.split('.')[1]}"
    lifecycle.up(prepared, name, before, memory_mib=512)
    try:
        agent = prepared.agent(prepared.machines.get(name))
        paused = _start(agent, counter, "/data/paused.log", "--pause", "--threads")
        holder = int(agent.sh(
            "mkdir -m 700 /tmp/counter.d && cd /tmp/counter.d && "
            "setsid -f sh -c '/data/counter /data/counter.log --threads & wait' "
            "</dev/null >/dev/null 2>&1; while ! [ -s /data/counter.log ]; do sleep 0.2; "
            "done; pgrep -of '^sh -c /data/counter'").text)
        sender = _start_blocked_send(agent)
        noter = int(agent.sh(  # its file is on the old VM's root file system only
            "setsid -f sh -c 'exec 3>>/var/tmp/tm-note; echo note >&3; exec sleep 600' "
            "</dev/null >/dev/null 2>&1; sleep 1; pgrep -nx sleep").text)
        packed = agent.sh(f"rm -rf /tmp/golden && mkdir /tmp/golden && criu dump -t {paused} "
                          "-D /tmp/golden --leave-running --file-locks -o dump.log && "
                          "tar -c -C /tmp/golden .", what="criu dump", timeout=120).stdout
        with tarfile.open(fileobj=io.BytesIO(packed)) as archive:
            archive.extractall(tmp_path / "golden")
        while len(_lines(agent, "/data/counter.log")) < 5:
            time.sleep(0.5)
        if before == ACTIVE_KERNEL:
            _panic(prepared, name)
        else:
            counting = int(agent.sh(f"pgrep -P {holder} -x counter").text)
            _stop_in_user_code(prepared, name, counting)

        checkpoint = dump(prepared, name, [paused], tmp_path / "ours")
        assert [v.verdict for v in checkpoint.processes] == ["dumped"], checkpoint
        _assert_same_images(tmp_path / "ours" / str(paused), tmp_path / "golden", paused)

        if before == ACTIVE_KERNEL:  # the kernel is dead: what cannot be restored fails
            report = recover(prepared, name, after, pids=[holder, sender, noter]).as_dict()
            failed = report["processes"].pop()
            assert (failed["verdict"], failed["reason"]) == ("failed", (
                f"{noter}: /var/tmp/tm-note is not on {name}-next: it was on the old "
                "VM's root file system only; put it in the guest image (--package, "
                "--files) or on /data")), failed
        else:
            done = cli("recover", name, "--kernel", after, "--pid", str(holder),
                       "--pid", str(sender), "--json")
            assert done.returncode == 0, done.stderr
            report = json.loads(done.stdout)
        assert [v["verdict"] for v in report["processes"]] == [
            "restored", "restored with losses"], report
        assert [loss.split(" is cut: ")[1] for loss in report["processes"][1]["losses"]] == [
            "the process was inside sendto() on it when the kernel stopped"], report
        assert len(report["processes"][0]["processes"]) == 2, "the shell and its counter"
        assert [lock.split(":", 1)[1] for locks in report["processes"][0]["relock"].values()
                for lock in locks] == ["0:128:1"], "the lock on a file it maps, taken again"
        assert report["kernel_after"].startswith(after)
        assert report["stop_to_serving_seconds"] > 0
        assert prepared.machines.get(f"{name}-dead").status() == (
            "guest-panicked" if before == ACTIVE_KERNEL else "paused")
        logs = Path(report["logs"])
        assert (logs / f"{name}-dead.console.log").exists()
        assert "Kernel panic" in (logs / f"{name}-dead.console.log").read_text(
            errors="replace") or before != ACTIVE_KERNEL
        with tarfile.open(next(logs.glob("*.criu-logs.tar"))) as criu_logs:
            restore_logs = [m.name for m in criu_logs if m.name.endswith("restore.log")]
        assert len(restore_logs) == 2, restore_logs
        agent = prepared.agent(prepared.machines.get(name))
        seen = len(_lines(agent, "/data/counter.log"))
        deadline = time.monotonic() + 60
        while len(lines := _lines(agent, "/data/counter.log")) < seen + 5:
            assert time.monotonic() < deadline, f"the counter stopped: {lines[-3:]}"
            time.sleep(0.5)
        numbers = [int(line.split()[0]) for line in lines]
        assert numbers == list(range(1, len(numbers) + 1)), "no line lost or repeated"
        locked = agent.run(["sh", "-c", "flock -n /data/counter.log true; echo $?; "
                            "python3 -c \"import fcntl; fcntl.lockf(open("
                            "'/data/counter.log', 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)\" "
                            "2>/dev/null; echo $?; python3 -c \"import fcntl; fcntl.lockf(open("
                            "'/dev/shm/counter.log.state', 'r+'), fcntl.LOCK_EX | "
                            "fcntl.LOCK_NB, 1, 128)\" 2>/dev/null; echo $?"]).text.split()
        assert locked == ["1", "1", "1"], "its flock and POSIX locks are held again, also " \
            "the one on a file it maps (which criu restore drops: tm-relock)"
        assert agent.sh(f"cd /proc/{holder}/cwd && stat -c '%n %a' \"$(pwd -P)\"").text \
            .strip() == "/tmp/counter.d 700", "its working directory, on a tmpfs, made again"
        # Its clocks go on from where the dead kernel's stood (a time namespace), not
        # from the new VM's shorter uptime.
        died = _entries(Path(report["processes"][0]["images"]) / "timens-0.img")[0]
        seen_uptime = float(agent.sh(f"nsenter --time --target {holder} cat /proc/uptime")
                            .text.split()[0])
        assert seen_uptime >= died["boottime"]["tv_sec"], (seen_uptime, died)
        assert all(line.split()[1] == "ok" for line in lines), [
            line for line in lines if "ok" not in line]
        wait_for(lambda: "peer reset" in _lines(agent, "/data/send.log"), timeout=60,
                 interval=0.5, what="blocked_send.py carrying on, its peer told")
        assert _lines(agent, "/data/send.log")[:3] == ["ready", "cut BrokenPipeError",
                                                       "alive 1"]
    finally:
        for vm in (name, f"{name}-dead"):
            if any(m.name == vm for m in prepared.machines.all()):
                lifecycle.down(prepared, vm)


def _non_regular_files(directory: Path, pid: int) -> dict[int, tuple[str, dict[str, Any]]]:
    """Per descriptor: pipes, epoll instances and sockets as files.img has them."""
    files = {f["id"]: f for f in _entries(directory / "files.img")}
    ids = _entries(directory / f"ids-{pid}.img")[0]
    result = {}
    for fd in _entries(directory / f"fdinfo-{ids['files_id']}.img"):
        entry = files[fd["id"]]
        if entry["type"] != "REG":
            body = {k: v for k, v in next(v for k, v in entry.items()
                                          if k not in ("type", "id")).items() if k != "id"}
            if "regf_id" in body:  # a FIFO: its path and flags, in a file entry of their own
                body["regf"] = {k: v for k, v in files[body.pop("regf_id")]["reg"].items()
                                if k != "id"}
            result[fd["fd"]] = (entry["type"], body)
    return result


def _queues(directory: Path, pid: int) -> dict[int, list[str]]:
    """By descriptor: what waits in its UNIX socket's receive queue, piece by piece."""
    ids = _entries(directory / f"ids-{pid}.img")[0]
    by_id = {fd["id"]: fd["fd"] for fd in _entries(directory / f"fdinfo-{ids['files_id']}.img")}
    queues: dict[int, list[str]] = {}
    for entry in _entries(directory / "sk-queues.img"):
        queues.setdefault(by_id[entry["id_for"]], []).append(entry["extra"])
    return queues


def _assert_same_stream(ours: Path, golden: Path, inode: int) -> None:
    """A connection's state and queued bytes, ours against CRIU's."""
    stream = f"tcp-stream-{inode:x}.img"
    theirs_stream, our_stream = (_entries(d / stream)[0] for d in (golden, ours))
    # Time goes on; and snd_wl1 is the number of the last segment that updated the
    # window: a probe since (keepalive or zero-window, numbered one below the next
    # byte) moves it up to rcv_nxt - 1, never back beyond where CRIU saw it.
    assert our_stream["timestamp"] >= theirs_stream["timestamp"]
    rcv_nxt = our_stream["inq_seq"]
    assert (rcv_nxt - our_stream["snd_wl1"]) % 2**32 <= max(
        (rcv_nxt - theirs_stream["snd_wl1"]) % 2**32, 1)
    moving = {"timestamp": 0, "snd_wl1": 0}
    assert {**our_stream, **moving} == {**theirs_stream, **moving}, inode


@pytest.mark.parametrize("vm", ["old_vm", "new_vm"])
def test_pipes_epoll_and_tcp_queues_read_as_criu_dumps_them(
        prepared: Host, vm: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """On each kernel: a pipe holding 5000 bytes and a FIFO 600, an eventfd, a signalfd,
    a timerfd (its time left counted from the stop), UNIX socketpairs with bytes and
    datagrams waiting, a listener, and a loopback connection with bytes waiting in the
    receive queue one way and in the send queue the other (megabytes, in page
    fragments), all watched by an epoll set.
    Our images of them from the stopped VM equal a real `criu dump` taken just before,
    byte for byte."""
    name = request.getfixturevalue(vm)
    agent = prepared.agent(prepared.machines.get(name))
    agent.sh("cat > /tmp/streams.py", input=STREAMS.read_bytes())
    pid = int(agent.sh(
        "setsid -f python3 /tmp/streams.py 7000 </dev/null >/tmp/streams.out 2>&1; "
        "timeout 60 sh -c 'until grep -q ready /tmp/streams.out; do sleep 0.2; done' "
        "|| { cat /tmp/streams.out >&2; exit 1; }; pgrep -nf '^python3 /tmp/streams.py'",
        what="starting streams.py").text)
    try:
        packed = agent.sh(f"rm -rf /tmp/golden && mkdir /tmp/golden && criu dump -t {pid} "
                          "-D /tmp/golden --leave-running --tcp-established --network-lock "
                          "nftables --file-locks -o dump.log && tar -c -C /tmp/golden .",
                          what="criu dump", timeout=180).stdout
        with tarfile.open(fileobj=io.BytesIO(packed)) as archive:
            archive.extractall(tmp_path / "golden")
        report = dump(prepared, name, [pid], tmp_path / "ours")
        assert [v.verdict for v in report.processes] == ["dumped"], report
        ours_dir, golden_dir = tmp_path / "ours" / str(pid), tmp_path / "golden"
        golden, ours = (_non_regular_files(d, pid) for d in (golden_dir, ours_dir))
        [(timer, left)] = [(fd, body["vsec"]) for fd, (kind, body) in golden.items()
                           if kind == "TIMERFD"]
        assert 0 <= left - ours[timer][1]["vsec"] < 120, "time went on, from the stop"
        for files in (golden, ours):
            files[timer][1]["vsec"] = files[timer][1]["vnsec"] = 0
        assert ours == golden
        assert golden[timer][1]["isec"] == 7 and golden[timer][1]["insec"] == 250_000_000
        assert sorted(kind for kind, _ in golden.values()) == [
            "EVENTFD", "EVENTPOLL", "FIFO", "INETSK", "INETSK", "INETSK", "PIPE", "PIPE",
            "SIGNALFD", "TIMERFD", "UNIXSK", "UNIXSK", "UNIXSK", "UNIXSK"]
        [fifo] = [body for kind, body in golden.values() if kind == "FIFO"]
        assert fifo["regf"]["name"] == "/tmp/streams.fifo", fifo
        assert _queues(ours_dir, pid) == _queues(golden_dir, pid)
        assert sorted(map(len, _queues(golden_dir, pid).values())) == [1, 2, 3], \
            "500 bytes one way, 12000 the other in two pieces, three datagrams"
        for image in ("pipes-data.img", "fifo-data.img"):
            assert _entries(ours_dir / image) == _entries(golden_dir / image), image
        assert [entry["bytes"] for entry in _entries(golden_dir / "fifo-data.img")] == [600]
        assert _locks(ours_dir) == _locks(golden_dir)
        assert [(lock["flag"], lock["type"], lock["start"], lock["len"])
                for lock in _locks(golden_dir)] == [(1, 0, 0, 10), (1, 1, 100, 0), (2, 1, 0, 0)]
        connected = [body["ino"] for kind, body in golden.values()
                     if kind == "INETSK" and body["state"] == 1]  # ESTABLISHED
        queued = 0
        for inode in connected:
            _assert_same_stream(ours_dir, golden_dir, inode)
            stream = _entries(ours_dir / f"tcp-stream-{inode:x}.img")[0]
            queued += stream["inq_len"] + stream["outq_len"]
        assert queued > 1 << 20, "megabytes wait in the queues"
    finally:
        agent.sh(f"kill {pid}")


def _caught(host: Host, name: str, pid: int) -> str | None:
    """What the stopped VM caught ``pid`` doing with a connection: "call" (a thread
    inside read() or write() on it), "packet" (no such thread, and the kernel held a
    connection's spinlock, a packet coming in or going out, with no call holding it),
    or None."""
    with attach(host.machines.get(name), catalog=host.catalog) as guest:
        prog = guest.prog
        task = find_task(prog, pid)
        sockets = prog["socket_file_ops"].address_of_().value_()

        def connection(file: drgn.Object) -> drgn.Object | None:
            if not file or file.f_op.value_() != sockets:
                return None
            sk = drgn.cast("struct socket *", file.private_data).sk
            return sk if int(sk.__sk_common.skc_state) == 1 else None  # ESTABLISHED

        for thread in for_each_task_in_group(task, include_self=True):
            if unfinished_call(thread) in (0, 1):  # read(), write()
                on = connection(task.files.fdt.fd[int(saved_user_registers(thread).di)])
                return "call" if on is not None else None
        for _, file in for_each_file(task):
            sk = connection(file)
            if sk is not None and not int(sk.sk_lock.owned) and \
                    int(sk.sk_lock.slock.rlock.raw_lock.val.counter):
                return "packet"
    return None


def _stop_when(host: Host, name: str, pid: int, what: str) -> None:
    machine = host.machines.get(name)
    for _ in range(300):
        time.sleep(random.uniform(0.05, 0.4))
        machine.qmp("stop")
        if _caught(host, name, pid) == what:
            return
        machine.qmp("cont")
    pytest.fail(f"redis was never caught with a connection: {what}")


def test_redis_under_load_is_recovered_at_any_instant(prepared: Host,
                                                      tmp_path: Path) -> None:
    """redis under our client's load, its VM stopped at 30 random instants and read
    from the host each time (it runs on after each): never refused (a connection it was
    reading or writing is cut, an AOF append cut short is rewound). Then stopped at an
    instant when the kernel held a connection's spinlock (a packet in flight) and
    recovered: that connection is rebuilt as it stood, and the client goes on on it with
    every acknowledged write. Then stopped while redis was inside a call on the client's
    connection and recovered: the connection is cut, the client hears of it at once (a
    reset from the new kernel), and every acknowledged write is there."""
    name = "t-rec-any"
    config = tmp_path / "transmigrate.toml"
    config.write_text(REDIS_SERVICE.format(vm=name))
    service = load_config(config).services_of(name)[0]
    lifecycle.up(prepared, name, ACTIVE_KERNEL, memory_mib=512, cpus=2)
    load = None
    try:
        start_service(prepared, service)
        machine = prepared.machines.get(name)
        redis = int(prepared.agent(machine).sh("pgrep -ox redis-server").text)
        load = LoadClient(prepared, machine.record.ip)
        outcomes = []
        for instant in range(30):
            time.sleep(random.uniform(0.05, 0.4))
            report = dump(prepared, name, [redis], tmp_path / str(instant))
            verdict = report.processes[0]
            assert verdict.verdict == "dumped", verdict.reason
            outcomes.append("cut" if verdict.losses else "whole")
        assert prepared.machines.get(name).status() == "running"
        _stop_when(prepared, name, redis, "packet")
        recovered = recover(prepared, name, services=[service])
        assert [v.verdict for v in recovered.processes] == ["restored"], recovered
        address = prepared.machines.get(name).record.ip
        counted = int(redis_cli(prepared, address, "GET", "transmigrate:counter"))
        wait_for(lambda: int(redis_cli(prepared, address, "GET", "transmigrate:counter"))
                 > counted + 10, timeout=30, interval=0.5, what="the client going on")
        summary = load.stop()
        assert summary["errors"] == [] and summary["out_of_order"] == 0, summary
        assert summary["client_id_start"] == summary["client_id_end"], "the same connection"
        assert int(redis_cli(prepared, address, "GET", "transmigrate:counter")) == \
            summary["last_value"], "every acknowledged write"

        # Inside a call on the client's connection: cut, and the client told at once.
        load = LoadClient(prepared, address)
        lifecycle.down(prepared, f"{name}-dead")
        _stop_when(prepared, name, redis, "call")
        recovered = recover(prepared, name, services=[service])
        assert [v.verdict for v in recovered.processes] == ["restored with losses"], recovered
        assert [loss.split(" is cut: ")[1].split(" was inside ")[0]
                for loss in recovered.processes[0].losses] == ["the process"], recovered
        process = load.process
        wait_for(lambda: process.poll() is not None, timeout=30, interval=0.2,
                 what="the client told of the cut")
        summary = load.stop()
        assert summary["errors"] == ["ConnectionResetError: [Errno 104] Connection reset by "
                                     "peer"] and summary["out_of_order"] == 0, summary
        assert int(redis_cli(prepared, address, "GET", "transmigrate:counter")) - \
            summary["last_value"] in (0, 1), "every acknowledged write"
    finally:
        if load is not None and load.process.poll() is None:
            load.process.kill()
            load.process.wait()
        for vm in (name, f"{name}-dead"):
            if any(m.name == vm for m in prepared.machines.all()):
                lifecycle.down(prepared, vm)


@pytest.mark.parametrize(("before", "after", "through"), [
    (ACTIVE_KERNEL, STANDBY_KERNEL, "api"), (STANDBY_KERNEL, ACTIVE_KERNEL, "cli")])
def test_redis_under_load_survives_the_death_of_its_kernel(
        prepared: Host, before: str, after: str, through: str, tmp_path: Path) -> None:
    """redis as a declared service (held by tm-service, in an IPC namespace of its own),
    its keys and AOF on the data volume, an idle client and one under load, and a warm
    standby on the other kernel; the kernel panics; the service's tree is rebuilt on the
    standby from the dead RAM with redis's pipe, epoll set, listening socket and both
    connections (6.12 -> 6.1 through the CLI, which recovers the declared services by
    default). The pipe, the epoll set and the idle connection match CRIU's own dump of
    them; both clients go on on their connections with no reply lost or repeated; the
    AOF holds every acknowledged write (redis started again from it has them all)."""
    name = f"t-rec-kv-{before.split('.')[1]}"
    config = tmp_path / "transmigrate.toml"
    config.write_text(REDIS_SERVICE.format(vm=name))
    service = load_config(config).services_of(name)[0]
    lifecycle.up(prepared, name, before, memory_mib=512)
    idle = load = None
    try:
        holder = start_service(prepared, service)
        address = prepared.machines.get(name).record.ip
        agent = prepared.agent(prepared.machines.get(name))
        pid = int(agent.sh(f"pgrep -P {holder} -x redis-server").text)
        agent.sh("seq 1 10000 | awk '{print \"SET key:\" $1 \" \" $1}' | redis-cli --pipe",
                 what="writing keys")
        idle = subprocess.Popen([*prepared.network.prefix(), "redis-cli", "-h", address],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert idle.stdin is not None and idle.stdout is not None
        idle.stdin.write(b"SET idle before\n")
        idle.stdin.flush()
        assert idle.stdout.readline() == b"OK\n"
        packed = agent.sh(f"rm -rf /tmp/golden && mkdir /tmp/golden && criu dump -t "
                          f"{holder} -D /tmp/golden --leave-running --tcp-established "
                          "--network-lock nftables -o dump.log && tar -c -C /tmp/golden .",
                          what="criu dump", timeout=120).stdout
        with tarfile.open(fileobj=io.BytesIO(packed)) as archive:
            archive.extractall(tmp_path / "golden")
        if through == "cli":
            assert cli("standby", name, "--kernel", after).returncode == 0
        else:
            prepare_standby(prepared, name, after)
        load = LoadClient(prepared, address)
        time.sleep(2)
        _panic(prepared, name)

        checkpoint = dump(prepared, name, [holder], tmp_path / "ours")
        assert [v.verdict for v in checkpoint.processes] == ["dumped"], checkpoint
        assert checkpoint.processes[0].processes == [holder, pid]
        ours_dir, golden_dir = tmp_path / "ours" / str(holder), tmp_path / "golden"
        for image in ("pstree.img", f"ids-{holder}.img", f"ids-{pid}.img"):
            assert _entries(ours_dir / image) == _entries(golden_dir / image), image
        ipc = _entries(golden_dir / f"ids-{holder}.img")[0]["ipc_ns_id"]
        assert _entries(ours_dir / f"ipcns-var-{ipc}.img") == \
            _entries(golden_dir / f"ipcns-var-{ipc}.img")
        golden, ours = (_non_regular_files(d, pid) for d in (golden_dir, ours_dir))
        assert sorted(kind for kind, _ in golden.values()) == [
            "EVENTPOLL", "INETSK", "INETSK", "PIPE", "PIPE"], golden
        for fd, (kind, theirs) in golden.items():
            if kind == "EVENTPOLL":  # ours also watches the load's connection
                assert len(theirs["tfd"]) == 3, "the pipe, the listener, the idle client"
                assert [t for t in ours[fd][1]["tfd"] if t in theirs["tfd"]] == theirs["tfd"]
            else:
                assert ours[fd] == (kind, theirs), fd
        idle_socket = next(body["ino"] for kind, body in golden.values()
                           if kind == "INETSK" and body["state"] == 1)  # ESTABLISHED
        _assert_same_stream(ours_dir, golden_dir, idle_socket)

        if through == "cli":
            done = cli("recover", name, "--kernel", after, "--config", str(config), "--json")
            assert done.returncode == 0, done.stderr
            report = json.loads(done.stdout)
            history = cli("history", "--vm", name, "--json")  # the command kept it
            kept = json.loads(history.stdout)[0]
            assert (kept["kind"], kept["outcome"], kept["report"]) == ("recover", "done", report)
            assert kept["downtime_seconds"] == report["stop_to_serving_seconds"]
        else:
            report = recover(prepared, name, after, services=[service]).as_dict()
        verdict = report["processes"][0]
        assert verdict["verdict"] == "restored" and verdict["pid"] == holder, verdict
        assert verdict["connections"] == 2 and verdict["listening"] == [6379], verdict
        assert report["warm_standby"] and "boot standby" not in report["steps"], report
        assert report["stop_to_accepting_seconds"] >= report["stop_to_serving_seconds"]
        idle.stdin.write(b"GET idle\n")
        idle.stdin.flush()
        assert idle.stdout.readline() == b"before\n", "the idle connection answers"
        time.sleep(2)
        summary, load = load.stop(), None
        assert summary["errors"] == [] and summary["out_of_order"] == 0, summary
        assert summary["client_id_start"] == summary["client_id_end"], "the same connection"
        acknowledged = summary["last_value"]
        assert int(redis_cli(prepared, address, "GET", "transmigrate:counter")) == acknowledged
        agent = prepared.agent(prepared.machines.get(name))
        assert agent.sh("cat /proc/sys/kernel/osrelease").text.startswith(after)
        assert agent.sh(f"readlink /proc/{holder}/ns/ipc").text != \
            agent.sh("readlink /proc/1/ns/ipc").text, "its own IPC namespace again"
        agent.sh(f"kill {pid}; while kill -0 {holder} 2>/dev/null; do sleep 0.1; done")
        start_service(prepared, service)
        wait_for(lambda: redis_answers(prepared, address), timeout=60,
                 interval=0.2, what="redis did not load its AOF")
        assert int(redis_cli(prepared, address, "GET", "transmigrate:counter")) == acknowledged
        assert int(redis_cli(prepared, address, "DBSIZE")) == 10002
    finally:
        for client in (idle, load.process if load else None):
            if client is not None:
                client.kill()
                client.wait()
        for vm in (name, f"{name}-dead", f"{name}-standby"):
            if any(m.name == vm for m in prepared.machines.all()):
                lifecycle.down(prepared, vm)


def _stop_inside_an_append(host: Host, name: str, pid: int) -> tuple[int, int]:
    """A plain QMP stop, at an instant when ``pid`` is inside write() with part of its
    record in the file already; the file's position and size then."""
    machine = host.machines.get(name)
    for _ in range(200):
        machine.qmp("stop")
        with attach(machine, catalog=host.catalog) as guest:
            task = find_task(guest.prog, pid)
            if unfinished_call(task) == 1:  # write()
                file = task.files.fdt.fd[int(saved_user_registers(task).di)]
                position, size = int(file.f_pos), int(file.f_inode.i_size)
                if size > position:
                    return position, size
        machine.qmp("cont")
        time.sleep(random.uniform(0, 0.05))
    pytest.fail(f"process {pid} was never caught inside an append")


@pytest.mark.parametrize("vm", ["old_vm", "new_vm"])
def test_an_append_cut_short_is_written_back_without_its_part(
        prepared: Host, vm: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A process caught inside an append to a file on the data volume (O_APPEND), with
    part of its record in the file already: the write is made again on restore, so the
    file is written back as it was before the write began, on a record's boundary."""
    name = request.getfixturevalue(vm)
    agent = prepared.agent(prepared.machines.get(name))
    agent.sh(f"mountpoint -q /data || {GUEST_TOOLS}/tm-data mount; "
             "cat > /data/appender.py", input=APPENDER.read_bytes())
    pid = int(agent.sh("setsid -f python3 /data/appender.py /data/appended </dev/null "
                       ">/dev/null 2>&1; sleep 1; pgrep -nf '^python3 /data/appender.py'").text)
    try:
        position, size = _stop_inside_an_append(prepared, name, pid)
        report = dump(prepared, name, [pid], tmp_path)
        assert [v.verdict for v in report.processes] == ["dumped"], report
        writeback = (tmp_path / str(pid) / "writeback.bin").read_bytes()
        (length,) = struct.unpack_from("<I", writeback)
        assert writeback[4:4 + length] == b"/data/appended"
        (written_back,) = struct.unpack_from("<Q", writeback, 4 + length)
        assert written_back == position, (position, size)
        assert position % _RECORD == 0 and 0 < size - position <= _RECORD, (position, size)
    finally:
        prepared.machines.get(name).qmp("cont")
        agent.sh(f"kill {pid}; rm -f /data/appended")


def _dump_refused(vm: str, pid: int, out: str) -> str:
    """`dump` of ``pid``, which must refuse it: what it said."""
    done = cli("dump", vm, "--pid", str(pid), "--out", out)
    assert done.returncode == 1, (done.stdout, done.stderr)
    return done.stderr


CONTAINED_REDIS = """
[services.kv]
vm = "{vm}"
process = "redis-server"
start = ["unshare", "--pid", "--fork", "redis-server", "--bind", "0.0.0.0",
         "--protected-mode", "no", "--save", "", "--dir", "/data", "--appendonly", "yes",
         "--appendfsync", "always"]
"""
"""redis in a pid namespace of its own, which recovery cannot rebuild yet (its session
is still the outer one's); every write synced to its AOF on the data volume."""


def test_a_refused_service_of_a_dead_kernel_is_started_again_from_its_volume(
        prepared: Host, tmp_path: Path) -> None:
    """redis in a pid namespace of its own: its kernel panics, recovery refuses it and
    starts it again from its data volume on the new kernel, as a reboot would, its
    losses named. Every key it acknowledged is there, also the last fifty, which it
    never fsynced (appendfsync no): the dead kernel's page cache was written back to
    the volume first. While its kernel ran, the same refusal left it running where it
    was."""
    name = "t-rec-restart"
    config = tmp_path / "transmigrate.toml"
    config.write_text(CONTAINED_REDIS.format(vm=name))
    service = load_config(config).services_of(name)[0]
    lifecycle.up(prepared, name, ACTIVE_KERNEL, memory_mib=512)
    try:
        start_service(prepared, service)
        address = prepared.machines.get(name).record.ip
        wait_for(lambda: redis_answers(prepared, address), timeout=60, interval=0.2,
                 what="redis did not start")
        for n in range(50):
            redis_cli(prepared, address, "SET", f"key:{n}", str(n))
        with pytest.raises(TransmigrateError, match=r"nothing to recover: .*pid namespace"):
            recover(prepared, name, STANDBY_KERNEL, services=[service])
        assert redis_cli(prepared, address, "GET", "key:49") == "49", "it runs on"
        assert redis_cli(prepared, address, "CONFIG", "SET", "appendfsync", "no") == "OK"
        for n in range(50, 100):
            redis_cli(prepared, address, "SET", f"key:{n}", str(n))
        _panic(prepared, name)
        report = recover(prepared, name, STANDBY_KERNEL, services=[service])
        [verdict] = report.processes
        assert verdict.verdict == "restarted", verdict
        assert "pid namespace of its own" in verdict.reason
        assert verdict.losses == ["kv was started again from its data volume: what it held "
                                  "in memory and its connections are gone"]
        assert "read unwritten pages" in report.steps
        assert report.kernel_after.startswith(STANDBY_KERNEL)
        wait_for(lambda: redis_answers(prepared, address), timeout=60, interval=0.2,
                 what="redis did not answer again")
        assert int(redis_cli(prepared, address, "DBSIZE")) == 100
        assert redis_cli(prepared, address, "GET", "key:99") == "99"
    finally:
        for machine in prepared.machines.all():
            if machine.name.startswith(name):
                lifecycle.down(prepared, machine.name)


def test_bad_input_is_refused_and_the_vm_runs_on(prepared: Host, old_vm: str,
                                                 tmp_path: Path) -> None:
    """A VM that does not exist, a pid that is gone, a kernel thread, the guest's init, a
    process in the middle of a write into a pipe, one sharing its memory with another
    process, one holding an open file description lock, one sharing a file of the root
    file system: one line each, a non-zero exit, and the VM runs on as before."""
    out = str(tmp_path / "images")
    for args, error in [
            (["dump", "no-such-vm", "--pid", "1", "--out", out], "no VM named 'no-such-vm'"),
            (["dump", old_vm, "--pid", "999999", "--out", out], "no process 999999"),
            (["dump", old_vm, "--pid", "2", "--out", out], "2: refused: it is a kernel thread"),
            (["recover", old_vm, "--pid", "1"], "nothing to recover: 1: it is the guest's init"),
            (["recover", old_vm, "--process", "no-such-daemon"],
             "no process named no-such-daemon in the guest's memory")]:
        done = cli(*args)
        assert done.returncode != 0, args
        assert error in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()[-1]) < 200, done.stderr
    assert prepared.machines.get(old_vm).status() == "running"
    sleeper = int(prepared.agent(prepared.machines.get(old_vm)).sh(
        "setsid -f sleep 600 </dev/null >/dev/null 2>&1; sleep 0.5; pgrep -nx sleep").text)
    done = cli("dump", old_vm, "--pid", str(sleeper), "--out", out, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["processes"][0]["verdict"] == "dumped"
    assert prepared.machines.get(old_vm).status() == "running", "a dump lets the VM run on"
    assert (tmp_path / "images" / str(sleeper) / f"core-{sleeper}.img").exists()
    # A writer blocked on a full pipe has copied part of its write already: doing the
    # call again would write that part twice.
    agent = prepared.agent(prepared.machines.get(old_vm))
    session, writer = map(int, agent.sh(
        "setsid -f sh -c 'echo $$ > /run/tm-writer.sid; yes | sleep 600' </dev/null "
        ">/dev/null 2>&1; sleep 1; cat /run/tm-writer.sid; pgrep -nx yes").text.split())
    try:
        assert f"{writer}: refused: it was inside write() when the kernel stopped" in \
            _dump_refused(old_vm, writer, out)
    finally:
        agent.sh(f"kill -KILL -{session}")
    # A child that shares its parent's memory (CLONE_VM, not a thread).
    binary = tmp_path / "shares_memory"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(SHARES_MEMORY)], check=True)
    agent.sh("cat > /tmp/shares_memory && chmod +x /tmp/shares_memory",
             input=binary.read_bytes())
    parent, child = map(int, agent.sh(
        "setsid -f /tmp/shares_memory </dev/null >/dev/null 2>&1; sleep 1; "
        "p=$(pgrep -ox shares_memory); echo $p $(pgrep -P $p)").text.split())
    try:
        assert f"{parent}: refused: its memory is shared with process {child} (vfork or " \
            "CLONE_VM)" in _dump_refused(old_vm, parent, out)
    finally:
        agent.sh(f"kill -KILL {parent} {child}")
    # An open file description lock, which CRIU 3.17 cannot take again.
    holder = int(agent.sh(
        "setsid -f python3 -c \"import fcntl, os, signal, struct; "
        "f = open('/tmp/tm-ofd', 'w'); fcntl.fcntl(f, 37, struct.pack('hhqqi', "
        "fcntl.F_WRLCK, 0, 0, 0, 0)); open('/tmp/tm-ofd.ready', 'w'); signal.pause()\" "
        "</dev/null >/dev/null 2>&1; until [ -e /tmp/tm-ofd.ready ]; do sleep 0.2; done; "
        "pgrep -nx python3").text)  # 37: F_OFD_SETLK
    try:
        assert f"{holder}: refused: fd 3: an open file description lock (F_OFD_SETLK; " \
            "CRIU 3.17 cannot rebuild it)" in " ".join(_dump_refused(old_vm, holder, out).split())
    finally:
        agent.sh(f"kill -KILL {holder}; rm -f /tmp/tm-ofd /tmp/tm-ofd.ready")
    # A shared mapping of a file on the root file system, which the new VM has as the
    # image made it, not as the old one changed it.
    holder = int(agent.sh(
        "setsid -f python3 -c \"import mmap, signal; f = open('/var/tmp/tm-shared', 'w+b'); "
        "f.truncate(4096); m = mmap.mmap(f.fileno(), 4096); m[0] = 1; "
        "open('/tmp/tm-shared.ready', 'w'); signal.pause()\" </dev/null >/dev/null 2>&1; "
        "until [ -e /tmp/tm-shared.ready ]; do sleep 0.2; done; pgrep -nx python3").text)
    try:
        refused = " ".join(_dump_refused(old_vm, holder, out).split())
        assert f"{holder}: refused: it has shared memory at 0x" in refused, refused
        assert "(/var/tmp/tm-shared; only files on the data volume or a tmpfs are " \
            "supported)" in refused
    finally:
        agent.sh(f"kill -KILL {holder}; rm -f /tmp/tm-shared.ready /var/tmp/tm-shared")


def _overwrite(host: Host, vm: str, address: int, value: int) -> None:
    """Write 8 bytes into a stopped guest's memory at a kernel address, as a wild write
    in the guest's kernel would have."""
    machine = host.machines.get(vm)
    with attach(machine, catalog=host.catalog) as guest:
        offset = guest.offset(address, 8)
    with machine.ram_path.open("r+b") as ram, mmap.mmap(ram.fileno(), 0) as memory:
        memory[offset:offset + 8] = struct.pack("<Q", value)


def test_corrupt_kernel_state_is_refused_within_a_second(prepared: Host, counter: bytes,
                                                         tmp_path: Path) -> None:
    """A process whose memory map was overwritten, and one whose task points at garbage:
    each refused in under a second with its reason, nothing restored, and the VM keeps
    its name."""
    name = "t-corrupt"
    lifecycle.up(prepared, name, ACTIVE_KERNEL, memory_mib=384)
    try:
        agent = prepared.agent(prepared.machines.get(name))
        torn_map = _start(agent, counter, "/data/a.log", "--pause")
        wild_mm = _start(agent, counter, "/data/b.log", "--pause")
        machine = prepared.machines.get(name)
        machine.qmp("stop")
        with attach(machine, catalog=prepared.catalog) as guest:
            first_vma = next(for_each_vma(find_task(guest.prog, torn_map).mm))
            vm_start = first_vma.vm_start.address_
            task_mm = find_task(guest.prog, wild_mm).mm.address_
        assert vm_start is not None and task_mm is not None
        _overwrite(prepared, name, vm_start, 0x7FFF_FFFF_F000)
        _overwrite(prepared, name, task_mm, 0xDEAD_0000_0000_0000)
        started = time.monotonic()
        report = dump(prepared, name, [torn_map, wild_mm], tmp_path / "images")
        assert time.monotonic() - started < 1 + report.steps["attach"]
        reasons = {v.pid: v.reason for v in report.processes}
        assert [v.verdict for v in report.processes] == ["refused", "refused"], reasons
        assert "memory map is corrupt" in reasons[torn_map], reasons
        assert "torn or corrupt" in reasons[wild_mm], reasons
        with pytest.raises(TransmigrateError, match="nothing to recover"):
            recover(prepared, name, pids=[torn_map, wild_mm])
        assert [m.name for m in prepared.machines.all() if m.name.startswith(name)] == [name]
    finally:
        lifecycle.down(prepared, name)
