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
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pycriu.images  # type: ignore[import-untyped]
import pytest

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.guest.agent import GuestAgent
from transmigrate.migrate.plan import GUEST_TOOLS
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.recover import dump, recover

PROGRAM = Path(__file__).parent / "programs" / "counter.c"
LOG = "/data/counter.log"


@pytest.fixture(scope="session")
def counter(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The stage-1 program, built on the host (the guests run the same Debian release)."""
    binary = tmp_path_factory.mktemp("counter") / "counter"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(PROGRAM)], check=True)
    return binary.read_bytes()


def _start(agent: GuestAgent, counter: bytes, *args: str) -> int:
    """The program lives on the data volume, which the new VM mounts."""
    agent.sh(f"mountpoint -q /data || {GUEST_TOOLS}/tm-data mount; "
             "cat > /data/counter && chmod +x /data/counter", input=counter)
    return int(agent.sh(
        f"setsid -f /data/counter {LOG} {' '.join(args)} </dev/null >/dev/null 2>&1; "
        f"while ! [ -s {LOG} ]; do sleep 0.2; done; pgrep -nx counter").text)


def _panic(host: Host, name: str) -> None:
    """Kill the guest's kernel at once; QEMU pauses it on the panic (pvpanic)."""
    machine = host.machines.get(name)
    host.agent(machine).spawn(["sh", "-c", "echo c > /proc/sysrq-trigger"])
    deadline = time.monotonic() + 30
    while machine.status() != "guest-panicked":
        assert time.monotonic() < deadline, f"{name} did not panic: {machine.status()}"
        time.sleep(0.1)


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


def _files(directory: Path, pid: int) -> dict[int, dict[str, Any]]:
    """Per descriptor: the file's name, flags, offset, and close-on-exec."""
    files = {f["id"]: f["reg"] for f in _entries(directory / "files.img") if "reg" in f}
    ids = _entries(directory / f"ids-{pid}.img")[0]
    return {fd["fd"]: {"cloexec": fd["flags"], **{k: files[fd["id"]][k] for k in
                                                   ("name", "flags", "pos")}}
            for fd in _entries(directory / f"fdinfo-{ids['files_id']}.img")}


def _vmas(directory: Path, pid: int) -> list[dict[str, Any]]:
    return [{k: v for k, v in vma.items() if k != "shmid"}
            for vma in _entries(directory / f"mm-{pid}.img")[0]["vmas"]]


@pytest.mark.parametrize("kernel", [ACTIVE_KERNEL, STANDBY_KERNEL])
def test_images_from_dead_memory_match_criu_dump(prepared: Host, counter: bytes,
                                                 kernel: str, tmp_path: Path) -> None:
    name = f"t-gold-{kernel.split('.')[1]}"
    lifecycle.up(prepared, name, kernel, memory_mib=512)
    try:
        agent = prepared.agent(prepared.machines.get(name))
        pid = _start(agent, counter, "--pause")
        golden = tmp_path / "golden"
        golden.mkdir()
        packed = agent.sh(f"rm -rf /tmp/golden && mkdir /tmp/golden && criu dump -t {pid} "
                          "-D /tmp/golden --leave-running -o dump.log && "
                          "tar -c -C /tmp/golden .", what="criu dump", timeout=120).stdout
        with tarfile.open(fileobj=io.BytesIO(packed)) as archive:
            archive.extractall(golden)
        _panic(prepared, name)
        report = dump(prepared, name, [pid], tmp_path / "ours")
        assert [v.verdict for v in report.processes] == ["dumped"], report
        ours = tmp_path / "ours" / str(pid)

        theirs_core = _entries(golden / f"core-{pid}.img")[0]
        our_core = _entries(ours / f"core-{pid}.img")[0]
        assert our_core["thread_info"]["gpregs"] == theirs_core["thread_info"]["gpregs"]
        assert our_core["thread_info"]["fpregs"] == theirs_core["thread_info"]["fpregs"]
        for key in ("blk_sigset", "comm", "personality", "sigactions", "rlimits"):
            assert our_core["tc"][key] == theirs_core["tc"][key], key
        for key in ("creds", "blk_sigset", "sas", "rseq_entry", "comm", "sched_nice"):
            assert our_core["thread_core"].get(key) == theirs_core["thread_core"].get(key), key
        assert _vmas(ours, pid) == _vmas(golden, pid)
        theirs_mm = _entries(golden / f"mm-{pid}.img")[0]
        our_mm = _entries(ours / f"mm-{pid}.img")[0]
        for key in theirs_mm:
            if key.startswith("mm_") and key != "mm_saved_auxv":
                assert our_mm[key] == theirs_mm[key], key
        assert our_mm["mm_saved_auxv"] == theirs_mm["mm_saved_auxv"]
        assert _pages(ours, pid) == _pages(golden, pid)
        assert _files(ours, pid) == _files(golden, pid)
        assert _entries(ours / "pstree.img") == _entries(golden / "pstree.img")
        for image in ours.glob("*.img"):
            if not image.name.startswith("pages-"):
                decoded = subprocess.run(["crit", "decode", "-i", str(image)],
                                         capture_output=True, text=True, check=False)
                assert decoded.returncode == 0, (image.name, decoded.stderr)
    finally:
        lifecycle.down(prepared, name)


def _lines(agent: GuestAgent) -> list[str]:
    return agent.run(["cat", LOG], what="reading the counter's log").text.splitlines()


@pytest.mark.parametrize(("before", "after"), [(ACTIVE_KERNEL, STANDBY_KERNEL),
                                               (STANDBY_KERNEL, ACTIVE_KERNEL)])
def test_counter_survives_its_kernel_panic(prepared: Host, counter: bytes, before: str,
                                           after: str) -> None:
    name = f"t-rec-{before.split('.')[1]}"
    lifecycle.up(prepared, name, before, memory_mib=512)
    try:
        agent = prepared.agent(prepared.machines.get(name))
        pid = _start(agent, counter)
        while len(_lines(agent)) < 5:
            time.sleep(0.5)
        _panic(prepared, name)
        report = recover(prepared, name, after, pids=[pid])
        assert [v.verdict for v in report.processes] == ["restored"], report
        assert report.kernel_after.startswith(after)
        assert prepared.machines.get(f"{name}-dead").status() == "guest-panicked"
        agent = prepared.agent(prepared.machines.get(name))
        seen = len(_lines(agent))
        deadline = time.monotonic() + 60
        while len(lines := _lines(agent)) < seen + 5:
            assert time.monotonic() < deadline, f"the counter stopped: {lines[-3:]}"
            time.sleep(0.5)
        numbers = [int(line.split()[0]) for line in lines]
        assert numbers == list(range(1, len(numbers) + 1)), "no line lost or repeated"
        assert all(line.split()[1] == "ok" for line in lines), [
            line for line in lines if "ok" not in line]
    finally:
        for vm in (name, f"{name}-dead"):
            if any(m.name == vm for m in prepared.machines.all()):
                lifecycle.down(prepared, vm)
