"""The recovery campaign: real programs, their kernel killed each way it dies, recovered.

One guest per kill mode runs them all, as a host runs its services together: the
recover tests' stage programs (the counter under a shell, streams.py), redis as a
daemon under a client's load and redis as a declared service, memcached, nginx and
PostgreSQL as declared services, Python's http.server, an sqlite writer and a log
appender (both on the data volume). Then the kernel dies: a panic (sysrq-c), every
CPU deadlocked (the injected spinlock with interrupts off), a hung driver, an NMI
(unknown_nmi_panic), or a plain QMP stop. `recover` takes every program onto a new
VM on the other kernel, and each is checked from outside: it goes on (its counter,
its rows, its lines continue with no gap), it answers (its port, its data), and
nothing it acknowledged is lost.

Reported: per kill mode and program, the verdict (restored, or refused with the
reason) and whether it survived; the survival rate of what was not refused
(target >= 97 %, Otherworld's figure on one kernel), refusals by reason, and
acknowledged writes lost (target 0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL, Service
from transmigrate.errors import TransmigrateError
from transmigrate.faults.inject import inject
from transmigrate.faults.specs import Deadlock, HungDriver
from transmigrate.guest.agent import GuestAgent
from transmigrate.migrate.plan import GUEST_TOOLS
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.faults import fault_target
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.recover import recover
from transmigrate.orchestrate.services import LoadClient, redis_cli, start_redis, start_service
from transmigrate.polling import wait_for
from transmigrate.vm.image import ImageSpec

VM = "bench-campaign"
IMAGE = ImageSpec(extra_packages=("nginx", "postgresql", "memcached"))
"""The packages test's image: cached once the suite has run."""
PROGRAMS = Path(__file__).resolve().parent.parent / "tests/recover/programs"
MODES = ("panic", "deadlock", "hung-driver", "nmi", "stop")
SERVICES = (
    Service("kv", VM, "redis-server", start=(
        "redis-server", "--port", "6380", "--bind", "0.0.0.0", "--protected-mode", "no",
        "--save", "", "--dir", "/data/kv", "--appendonly", "yes")),
    Service("cache", VM, "memcached", start=(
        "memcached", "-u", "memcache", "-l", "0.0.0.0", "-m", "64")),
    Service("web", VM, "nginx", start=("nginx",),
            state=("/etc/nginx", "/var/log/nginx", "/var/lib/nginx", "/var/www")),
    Service("db", VM, "postgres", start=(
        "sh", "-c", "install -d -o postgres -g postgres /run/postgresql && "
                    "exec pg_ctlcluster 15 main start"),
            state=("/etc/postgresql", "/var/lib/postgresql", "/var/log/postgresql",
                   "/run/postgresql"), namespaces=("ipc", "mount")),
)
SQLITE = """
import sqlite3, time
db = sqlite3.connect("/data/app.db", isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS rows (n INTEGER PRIMARY KEY)")
n = db.execute("SELECT coalesce(max(n), 0) FROM rows").fetchone()[0]
while True:
    n += 1
    db.execute("INSERT INTO rows VALUES (?)", (n,))
    time.sleep(0.05)
"""
APPENDER = """
import os, time
log = open("/data/app.log", "a", buffering=1)
n = 0
while True:
    n += 1
    log.write(f"{n}\\n")
    os.fsync(log.fileno())
    time.sleep(0.05)
"""
TCP_CLIENT = textwrap.dedent("""
    import socket, sys
    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), 10)
    conn.sendall(sys.argv[3].encode().decode("unicode_escape").encode())
    data = b""
    while sys.argv[4].encode() not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise SystemExit(f"closed after {data[:80]!r}")
        data += chunk
""")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _counter() -> bytes:
    with tempfile.TemporaryDirectory() as directory:
        binary = Path(directory) / "counter"
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary),
                        str(PROGRAMS / "counter.c")], check=True)
        return binary.read_bytes()


def _answers(host: Host, address: str, port: int, send: str, expect: str) -> str | None:
    """None if ``address:port`` answers ``send`` with ``expect``, else what went wrong."""
    done = host.network.run([sys.executable, "-c", TCP_CLIENT, address, str(port), send,
                             expect], capture=True, timeout=30)
    return None if done.returncode == 0 else (done.stderr.decode(errors="replace")
                                               .strip().splitlines() or ["failed"])[-1]


def _numbers_go_on(agent: GuestAgent, command: str, wait: float = 15) -> str | None:
    """None if the numbers ``command`` prints (one per line, from 1) have no gap and
    grow within ``wait`` seconds."""
    def numbers() -> list[int]:
        return [int(word.split()[0]) for word in agent.sh(command).text.split("\n")
                if word.strip() and word.split()[0].isdigit()]
    before = numbers()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(1)
        after = numbers()
        if len(after) > len(before):
            if after != list(range(1, len(after) + 1)):
                return "numbers lost or repeated"
            return None
    return f"stopped at {before[-1] if before else 0}"


class Campaign:
    """Every program in one guest, killed one way, recovered, checked."""

    def __init__(self, host: Host, before: str, after: str, counter: bytes) -> None:
        self.host, self.before, self.after, self.counter = host, before, after, counter
        self.pids: dict[str, int] = {}
        self.load: LoadClient | None = None

    def start(self) -> None:
        host = self.host
        lifecycle.up(host, VM, self.before, image_spec=IMAGE, memory_mib=1536,
                     progress=_progress)
        agent = host.agent(host.machines.get(VM))
        agent.sh(f"mountpoint -q /data || {GUEST_TOOLS}/tm-data mount; mkdir -p /data/kv; "
                 "cat > /data/counter && chmod +x /data/counter", input=self.counter)
        for name, source in (("streams.py", (PROGRAMS / "streams.py").read_text()),
                             ("sqlite-app.py", SQLITE), ("appender.py", APPENDER)):
            agent.sh(f"cat > /data/{name}", input=source.encode())
        self.pids["counter"] = self._spawn(
            agent, "sh -c '/data/counter /data/counter.log --threads & wait'",
            "^sh -c /data/counter", "/data/counter.log")
        self.pids["streams"] = self._spawn(agent, "python3 /data/streams.py 7000",
                                           "^python3 /data/streams.py", None)
        self.pids["http.server"] = self._spawn(
            agent, "python3 -m http.server 8000 --directory /data", "^python3 -m http.server",
            None)
        self.pids["sqlite"] = self._spawn(agent, "python3 /data/sqlite-app.py",
                                          "^python3 /data/sqlite-app.py", None,
                                          errors="/data/sqlite-app.err")
        self.pids["appender"] = self._spawn(agent, "python3 /data/appender.py",
                                            "^python3 /data/appender.py", "/data/app.log")
        for service in SERVICES:  # before the daemon, which would pass for "kv"
            self.pids[service.name] = start_service(host, service)
        self.pids["redis"] = start_redis(host, VM)
        address = host.machines.get(VM).record.ip
        redis_cli(host, address, "SET", "before", "kept")
        for port, send, expect in ((6380, "SET before kept\\r\\n", "+OK"),
                                   (11211, "set before 0 0 4\\r\\nkept\\r\\n", "STORED")):
            def stored(port: int = port, send: str = send, expect: str = expect) -> bool:
                return _answers(host, address, port, send, expect) is None
            wait_for(stored, timeout=60, interval=0.5, what=f"port {port} did not answer")
        self.load = LoadClient(host, address)
        time.sleep(3)

    @staticmethod
    def _spawn(agent: GuestAgent, command: str, pattern: str, output: str | None,
               errors: str = "/dev/null") -> int:
        ready = f"while ! [ -s {output} ]; do sleep 0.2; done; " if output else "sleep 2; "
        return int(agent.sh(f"setsid -f {command} </dev/null >/dev/null 2>{errors}; {ready}"
                            f"pgrep -of '{pattern}'", timeout=120).text)

    def kill(self, mode: str) -> None:
        host = self.host
        machine = host.machines.get(VM)
        agent = host.agent(machine)
        if mode == "panic":
            agent.spawn(["sh", "-c", "echo c > /proc/sysrq-trigger"])
        elif mode == "nmi":
            agent.sh("sysctl -qw kernel.unknown_nmi_panic=1")
            machine.qmp("inject-nmi")
        elif mode == "deadlock":
            inject(fault_target(host, VM), Deadlock())
        elif mode == "hung-driver":
            inject(fault_target(host, VM), HungDriver(readers=3))
        elif mode == "stop":
            machine.qmp("stop")
        if mode in ("panic", "nmi"):
            wait_for(lambda: machine.status() == "guest-panicked", timeout=30, interval=0.1,
                     what=f"{mode}: the guest did not panic")

    def recover(self) -> dict[str, Any]:
        pids = [self.pids[name] for name in ("counter", "streams", "http.server", "sqlite",
                                             "appender", "redis")]
        started = time.monotonic()
        try:
            report = recover(self.host, VM, self.after, pids=pids, services=SERVICES,
                             progress=_progress).as_dict()
        except TransmigrateError as exc:
            return {"error": str(exc), "seconds": round(time.monotonic() - started, 1)}
        return report

    def check(self, name: str) -> str | None:
        host = self.host
        agent = host.agent(host.machines.get(VM))
        address = host.machines.get(VM).record.ip
        if name == "counter":
            failed = _numbers_go_on(agent, "cat /data/counter.log")
            bad = agent.sh("grep -c BAD /data/counter.log || true").text.strip()
            return failed or (f"{bad} BAD lines" if bad != "0" else None)
        if name == "streams":
            return None if agent.exec(["kill", "-0", str(self.pids[name])]).exit_code == 0 \
                else "not running"
        if name == "http.server":
            return _answers(host, address, 8000, "GET /app.log HTTP/1.0\\r\\n\\r\\n", "200 OK")
        if name == "sqlite":
            failed = _numbers_go_on(agent, "python3 -c \"import sqlite3; [print(r[0]) for r in "
                                           "sqlite3.connect('/data/app.db').execute("
                                           "'SELECT n FROM rows ORDER BY n')]\"")
            if not failed:
                return None
            running = agent.exec(["kill", "-0", str(self.pids[name])]).exit_code == 0
            said = agent.sh("tail -n 1 /data/sqlite-app.err").text.strip()
            return f"{failed}, {'running' if running else 'gone'}" + (
                f": {said}" if said else "")
        if name == "appender":
            return _numbers_go_on(agent, "cat /data/app.log")
        if name == "redis":
            assert self.load is not None
            summary = self.load.stop()
            if summary["errors"] or summary["out_of_order"]:
                return f"client: {summary['errors'] or summary['out_of_order']}"
            value = int(redis_cli(host, address, "GET", "transmigrate:counter"))
            if value != summary["last_value"]:
                return f"acknowledged INCRs lost: {summary['last_value'] - value}"
            return None if summary["client_id_start"] == summary["client_id_end"] \
                else "a new connection"
        if name == "kv":
            return _answers(host, address, 6380, "GET before\\r\\n", "kept")
        if name == "cache":
            return _answers(host, address, 11211, "get before\\r\\n", "kept")
        if name == "web":
            return _answers(host, address, 80, "GET / HTTP/1.0\\r\\n\\r\\n", "200 OK")
        if name == "db":
            done = agent.exec(["su", "postgres", "-c", "psql -tAc 'select 1'"])
            return None if done.text.strip() == "1" else "psql does not answer"
        raise ValueError(name)

    def finish(self) -> None:
        if self.load is not None and self.load.process.poll() is None:
            self.load.process.kill()
        for name in (VM, f"{VM}-dead"):
            if any(m.name == name for m in self.host.machines.all()):
                lifecycle.down(self.host, name)


def _trial(host: Host, mode: str, before: str, after: str, counter: bytes) -> dict[str, Any]:
    campaign = Campaign(host, before, after, counter)
    try:
        campaign.start()
        campaign.kill(mode)
        report = campaign.recover()
        names = {pid: name for name, pid in campaign.pids.items()}
        results: dict[str, Any] = {}
        for verdict in report.get("processes", []):
            name = names.get(verdict["pid"], str(verdict["pid"]))
            result: dict[str, Any] = {"verdict": verdict["verdict"]}
            if verdict["verdict"] == "refused":
                result["reason"] = verdict["reason"]
            else:
                result["failure"] = campaign.check(name)
                result["survived"] = result["failure"] is None
            results[name] = result
        return {"mode": mode, "direction": f"{before} -> {after}", "programs": results,
                "error": report.get("error"),
                "stop_to_serving_s": report.get("stop_to_serving_seconds")}
    finally:
        campaign.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--direction", choices=("up", "down", "both"), default="up",
                        help="up: 6.1 to 6.12; down: 6.12 to 6.1")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    host = Host.from_environment()
    counter = _counter()
    directions = {"up": [(ACTIVE_KERNEL, STANDBY_KERNEL)],
                  "down": [(STANDBY_KERNEL, ACTIVE_KERNEL)],
                  "both": [(ACTIVE_KERNEL, STANDBY_KERNEL), (STANDBY_KERNEL, ACTIVE_KERNEL)]
                  }[args.direction]
    trials = [_trial(host, mode, before, after, counter) for before, after in directions
              for mode in args.modes.split(",")]
    restored = [r for t in trials for r in t["programs"].values() if r["verdict"] != "refused"]
    refusals = Counter(r["reason"] for t in trials for r in t["programs"].values()
                       if r["verdict"] == "refused")
    summary = {
        "trials": trials,
        "recovered of not refused": f"{sum(r['survived'] for r in restored)}/{len(restored)}",
        "survival rate (target >= 0.97)": round(
            sum(r["survived"] for r in restored) / len(restored), 3) if restored else None,
        "refusals by reason": dict(refusals),
        "acknowledged writes lost (target 0)": sum(
            1 for r in restored if "lost" in (r.get("failure") or ""))}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for trial in trials:
        print(f"{trial['mode']} ({trial['direction']}):"
              + (f" failed: {trial['error']}" if trial["error"] else ""))
        for name, result in trial["programs"].items():
            print(f"  {name}: {result['verdict']}: "
                  + (result.get("reason") or ("survived" if result["survived"]
                                              else result["failure"])))
    for key, value in summary.items():
        if key != "trials":
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
