"""Recovery from a dead kernel against the operator's alternative, in the same run.

The program is either the recover tests' counter (tests/recover/programs/counter.c)
holding N MiB of anonymous memory and appending a line to a file on the data volume
every 100 ms, or redis (``--program redis``) holding N MiB of keys in its AOF on the
data volume, with a client INCRementing on one connection. Its kernel panics
(sysrq-c); then, per size:

- recover: `recover` onto a new VM on the same kernel (for redis also onto a warm
  standby booted beforehand, as a guard keeps one); the time from the VM's stop to
  the restored process running, and to its answering (the counter's next line; redis
  answering a new client); for redis the longest silence the client's connection saw;
  and the host-side read rate (process memory read from the dead RAM and written as
  CRIU images);
- reboot (the baseline): the dead VM replaced by a fresh boot of the same kernel and the
  program started again, from the panic to its answering (the counter's memory is lost;
  redis loads its AOF, and the client must reconnect).

Targets (issue 12): recover <= 0.5x reboot-and-restart; host read >= 200 MiB/s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from transmigrate.config import ACTIVE_KERNEL
from transmigrate.guest.agent import GuestAgent
from transmigrate.migrate.plan import GUEST_TOOLS
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.recover import prepare_standby, recover
from transmigrate.orchestrate.services import LoadClient, redis_answers, start_redis
from transmigrate.polling import wait_for

VM = "bench-rec"
LOG = "/data/counter.log"
PROGRAM = Path(__file__).resolve().parent.parent / "tests/recover/programs/counter.c"


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _build() -> bytes:
    with tempfile.TemporaryDirectory() as directory:
        binary = Path(directory) / "counter"
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary), str(PROGRAM)],
                       check=True)
        return binary.read_bytes()


def _memory(mib: int) -> int:
    return max(512, mib * 3 // 2 + 384)


def _start(agent: GuestAgent, program: bytes, mib: int) -> int:
    agent.sh(f"mountpoint -q /data || {GUEST_TOOLS}/tm-data mount; rm -f {LOG}; "
             "cat > /data/counter && chmod +x /data/counter && sync", input=program)
    return int(agent.sh(
        f"setsid -f /data/counter {LOG} --mib {mib} </dev/null >/dev/null 2>&1; "
        f"while ! [ -s {LOG} ]; do sleep 0.1; done; pgrep -nx counter", timeout=600).text)


def _lines(agent: GuestAgent) -> int:
    return len(agent.run(["cat", LOG]).text.splitlines())


def _wait_line(agent: GuestAgent, after: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _lines(agent) <= after:
        if time.monotonic() > deadline:
            raise SystemExit("the counter wrote no line")
        time.sleep(0.05)


def _panic(host: Host) -> float:
    machine = host.machines.get(VM)
    host.agent(machine).spawn(["sh", "-c", "echo c > /proc/sysrq-trigger"])
    while machine.status() != "guest-panicked":
        time.sleep(0.02)
    return time.monotonic()


def _fill_redis(host: Host, mib: int) -> None:
    """N MiB of 8000-byte values (DEBUG POPULATE, from inside the guest), then an AOF
    rewrite, so that the AOF holds them all (as it does after redis's own rewrites) and
    the baseline's restart loads them."""
    agent = host.agent(host.machines.get(VM))
    agent.run(["redis-cli", "DEBUG", "POPULATE", str(mib * 2**20 // 8192), "key", "8000"],
              what="filling redis", timeout=1800)
    agent.run(["redis-cli", "BGREWRITEAOF"], what="rewriting the AOF")
    wait_for(lambda: {"aof_rewrite_in_progress:0", "aof_rewrite_scheduled:0"} <= set(
        agent.run(["redis-cli", "INFO", "persistence"]).text.split()),
        timeout=1800, interval=1, what="redis did not finish rewriting its AOF")


def _wait_redis(host: Host, timeout: float = 600) -> None:
    wait_for(lambda: redis_answers(host, host.machines.get(VM).record.ip),
             timeout=timeout, what="redis did not answer")


def _recover_redis(host: Host, mib: int, *, warm: bool) -> dict[str, Any]:
    lifecycle.up(host, VM, ACTIVE_KERNEL, memory_mib=_memory(mib), progress=_progress)
    try:
        start_redis(host, VM)
        _fill_redis(host, mib)
        if warm:
            prepare_standby(host, VM, progress=_progress)
        client = LoadClient(host, host.machines.get(VM).record.ip)
        time.sleep(2)
        _panic(host)
        stopped = time.monotonic()
        report = recover(host, VM, processes=["redis-server"], progress=_progress)
        _wait_redis(host)
        answered = time.monotonic() - stopped
        time.sleep(2)
        summary = client.stop()
        verdict = report.processes[0]
        read_s = report.steps[f"read {verdict.pid}"]
        return {"rss_mib": round(verdict.pages * 4096 / 2**20, 1),
                "stop_to_running_s": report.stop_to_serving_seconds,
                "stop_to_answer_s": round(answered, 3),
                "client_longest_silence_s": summary["max_gap_s"],
                "client_errors": summary["errors"], "replies_out_of_order":
                summary["out_of_order"],
                "same_connection": summary.get("client_id_start") == summary.get(
                    "client_id_end"),
                "host_read_mib_per_s": round(verdict.pages * 4096 / 2**20 / read_s, 1),
                "steps": report.steps}
    finally:
        for name in (VM, f"{VM}-dead", f"{VM}-standby"):
            if any(m.name == name for m in host.machines.all()):
                lifecycle.down(host, name)


def _reboot_redis(host: Host, mib: int) -> dict[str, Any]:
    lifecycle.up(host, VM, ACTIVE_KERNEL, memory_mib=_memory(mib), progress=_progress)
    try:
        start_redis(host, VM)
        _fill_redis(host, mib)
        panicked = _panic(host)
        host.machines.remove(host.machines.get(VM), keep_network=True)
        lifecycle.up(host, VM, ACTIVE_KERNEL, memory_mib=_memory(mib), progress=_progress)
        start_redis(host, VM, timeout=1800)
        return {"panic_to_answer_s": round(time.monotonic() - panicked, 3)}
    finally:
        lifecycle.down(host, VM)


def _recover(host: Host, program: bytes, mib: int) -> dict[str, Any]:
    lifecycle.up(host, VM, ACTIVE_KERNEL, memory_mib=_memory(mib), progress=_progress)
    try:
        agent = host.agent(host.machines.get(VM))
        pid = _start(agent, program, mib)
        _wait_line(agent, 3)
        _panic(host)
        stopped = time.monotonic()
        report = recover(host, VM, pids=[pid], progress=_progress)
        agent = host.agent(host.machines.get(VM))
        _wait_line(agent, _lines(agent))
        answered = time.monotonic() - stopped
        verdict = report.processes[0]
        read_s = report.steps[f"read {pid}"]
        return {"rss_mib": round(verdict.pages * 4096 / 2**20, 1),
                "stop_to_running_s": report.stop_to_serving_seconds,
                "stop_to_answer_s": round(answered, 3),
                "host_read_mib_per_s": round(verdict.pages * 4096 / 2**20 / read_s, 1),
                "steps": report.steps}
    finally:
        for name in (VM, f"{VM}-dead"):
            if any(m.name == name for m in host.machines.all()):
                lifecycle.down(host, name)


def _reboot(host: Host, program: bytes, mib: int) -> dict[str, Any]:
    lifecycle.up(host, VM, ACTIVE_KERNEL, memory_mib=_memory(mib), progress=_progress)
    try:
        agent = host.agent(host.machines.get(VM))
        _start(agent, program, mib)
        _wait_line(agent, 3)
        panicked = _panic(host)
        host.machines.remove(host.machines.get(VM), keep_network=True)
        lifecycle.up(host, VM, ACTIVE_KERNEL, memory_mib=_memory(mib), progress=_progress)
        _start(host.agent(host.machines.get(VM)), program, mib)
        return {"panic_to_answer_s": round(time.monotonic() - panicked, 3)}
    finally:
        lifecycle.down(host, VM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="64,1024", help="MiB of memory, comma-separated")
    parser.add_argument("--program", choices=("counter", "redis"), default="redis")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    host = Host.from_environment()
    program = _build() if args.program == "counter" else b""
    results: dict[str, Any] = {}
    for mib in (int(size) for size in args.sizes.split(",")):
        if args.program == "redis":
            reboot = _reboot_redis(host, mib)
            runs = {"recover": _recover_redis(host, mib, warm=False),
                    "recover onto a warm standby": _recover_redis(host, mib, warm=True)}
        else:
            reboot, runs = _reboot(host, program, mib), {"recover": _recover(host, program, mib)}
        results[f"{args.program} {mib} MiB"] = {
            "reboot and restart": reboot, **runs,
            **{f"{way} / reboot (target <= 0.5)": round(
                run["stop_to_answer_s"] / reboot["panic_to_answer_s"], 3)
               for way, run in runs.items()}}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for size, result in results.items():
        baseline = result["reboot and restart"]["panic_to_answer_s"]
        for way in ("recover", "recover onto a warm standby"):
            if way in result:
                run = result[way]
                print(f"{size}: {way} {run['stop_to_answer_s']} s to answering "
                      f"({run['rss_mib']} MiB read at {run['host_read_mib_per_s']} MiB/s), "
                      f"reboot and restart {baseline} s: ratio "
                      f"{result[f'{way} / reboot (target <= 0.5)']}")


if __name__ == "__main__":
    main()
