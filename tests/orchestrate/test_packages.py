"""Services as Debian installs them, declared and started by transmigrate (its CLI),
moved 6.1 -> 6.12 and back with no hand-made layout while real clients keep their
connections: nginx (HTTP keep-alive), PostgreSQL 15 (a session with a transaction open
across both moves; in a mount namespace of its own, whose private /dev/shm and /tmp
CRIU moves),
memcached (one connection) and redis. Config edits made before a
move are in effect after a reload on the new VM; a log held open outside the volume is
carried at the size its writer knows; an undeclared edit in /etc is a warning, and with
strict a refusal before anything is frozen."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL, load_config
from transmigrate.migrate.precheck import PrecheckFailed
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.update import find_services, update
from transmigrate.vm.image import ImageSpec

from ..conftest import cli

VM = "t-pkg"
IMAGE = ImageSpec(extra_packages=("nginx", "postgresql", "memcached"))
CONFIG = f"""
[services.web]
vm = "{VM}"
start = ["nginx"]
state = ["/etc/nginx", "/var/log/nginx", "/var/lib/nginx", "/var/www"]

[services.db]
vm = "{VM}"
start = ["sh", "-c",
         "install -d -o postgres -g postgres /run/postgresql && exec pg_ctlcluster 15 main start"]
process = "postgres"
state = ["/etc/postgresql", "/var/lib/postgresql", "/var/log/postgresql", "/run/postgresql"]
namespaces = ["ipc", "mount"]

[services.cache]
vm = "{VM}"
start = ["memcached", "-d", "-u", "memcache", "-l", "0.0.0.0", "-m", "64"]

[services.kv]
vm = "{VM}"
start = ["redis-server", "/etc/redis/redis.conf", "--daemonize", "yes", "--bind", "0.0.0.0",
         "--protected-mode", "no"]
state = ["/etc/redis", "/var/lib/redis", "/var/log/redis", "/run/redis"]
"""

APPENDER = """
import time
log = open("/var/log/tm-app.log", "a", buffering=1)
n = 0
while True:
    log.write(f"{n}\\n")
    n += 1
    time.sleep(0.05)
"""

CLIENT = textwrap.dedent("""
    import re, socket, sys
    kind, address = sys.argv[1], sys.argv[2]
    conn = socket.create_connection((address, {"http": 80, "memcache": 11211}[kind]), 120)
    data = b""
    def until(end):
        global data
        while end not in data:
            chunk = conn.recv(65536)
            if not chunk:
                raise SystemExit("the connection closed")
            data += chunk
        line, _, data = data.partition(end)
        return line
    def http():
        global data
        conn.sendall(b"GET /tm.txt HTTP/1.1\\r\\nHost: t\\r\\n\\r\\n")
        head = until(b"\\r\\n\\r\\n")
        length = int(re.search(rb"(?i)content-length: *(\\d+)", head).group(1))
        while len(data) < length:
            data += conn.recv(65536)
        body, data = data[:length], data[length:]
        return body.decode().strip()
    def memcache():
        conn.sendall(b"incr hits 1\\r\\n")
        return until(b"\\r\\n").decode()
    if kind == "memcache":
        conn.sendall(b"set hits 0 0 1\\r\\n0\\r\\n")
        until(b"STORED\\r\\n")
    for _ in sys.stdin:
        print(http() if kind == "http" else memcache(), flush=True)
""")


class LineClient:
    """A client in the private network on one connection; each line asks once more."""

    def __init__(self, host: Host, argv: list[str]) -> None:
        self.process = subprocess.Popen([*host.network.prefix(), *argv], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, line: str = "") -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def packaged(prepared: Host, tmp_path: Path) -> Iterator[Path]:
    config = tmp_path / "transmigrate.toml"
    config.write_text(CONFIG)
    lifecycle.up(prepared, VM, ACTIVE_KERNEL, image_spec=IMAGE, memory_mib=1024)
    yield config
    lifecycle.down(prepared, VM)


def _sh(host: Host, script: str) -> str:
    return lifecycle.exec_in(host, VM, ["sh", "-c", script], timeout=120).check(script, VM).text


def _psql(host: Host, address: str) -> LineClient:
    return LineClient(host, ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h",
                             address, "-U", "postgres", "-d", "postgres"])


def _status(config: Path) -> dict[str, dict[str, Any]]:
    done = cli("status", VM, "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    return {status["name"]: status for status in json.loads(done.stdout)}


def _private(host: Host, root: int) -> tuple[bool, bool]:
    """Whether PostgreSQL's segments and a note in its /tmp are in the VM's /dev/shm and
    /tmp, and whether they are in its own."""
    listing = _sh(host, f"ls /dev/shm /tmp; echo ---; nsenter -t {root} -m ls /dev/shm /tmp")
    vm, own = listing.split("---")
    return ("PostgreSQL." in vm or "tm-note" in vm,
            "PostgreSQL." in own and "tm-note" in own)


def _start_appender(host: Host) -> int:
    """Not a declared service: a process in its own session with a log outside /data."""
    agent = host.agent(host.machines.get(VM))
    agent.run(["sh", "-c", "cat > /tmp/appender.py"], input=APPENDER.encode())
    return int(agent.sh("setsid -f sh -c 'echo $$ > /tmp/appender.pid; exec python3 "
                        "/tmp/appender.py' </dev/null >/dev/null 2>&1; sleep 1; "
                        "cat /tmp/appender.pid").text)


def test_debian_services_move_there_and_back(prepared: Host, packaged: Path) -> None:
    address = prepared.machines.get(VM).record.ip
    # The operator's edits before the first start: listen on the service network, and
    # keep idle HTTP connections longer than two moves take here (nginx's 75 s is not).
    conf = "/etc/postgresql/15/main"
    _sh(prepared, f"""echo "listen_addresses = '*'" >> {conf}/postgresql.conf && """
                  f"echo 'host all all 198.18.0.0/15 trust' >> {conf}/pg_hba.conf && "
                  "sed -i '/keepalive_timeout/d' /etc/nginx/nginx.conf && "
                  "echo 'keepalive_timeout 900;' > /etc/nginx/conf.d/keepalive.conf && "
                  "echo before > /var/www/html/tm.txt")
    started = cli("start", VM, "--config", str(packaged))
    assert started.returncode == 0, started.stderr
    status = _status(packaged)
    assert set(status) == {"web", "db", "cache", "kv"}
    for service in status.values():
        assert service["running"] and service["own_ipc"], service
        assert all(service["state"].values()), service
        assert service["own_mounts"] is (service["name"] == "db"), service
    services = load_config(packaged).services_of(VM)
    roots = find_services(prepared, VM, declared=services)
    assert sorted(roots) == sorted(s["root"] for s in status.values()), \
        "update moves each holder, with the daemon it adopted"
    roots.append(_start_appender(prepared))

    web = LineClient(prepared, [sys.executable, "-c", CLIENT, "http", address])
    cache = LineClient(prepared, [sys.executable, "-c", CLIENT, "memcache", address])
    db = _psql(prepared, address)
    try:
        assert web.ask() == "before"
        assert cache.ask() == "1"
        backend = db.ask("CREATE TABLE IF NOT EXISTS moved (n int); BEGIN; "
                         "INSERT INTO moved VALUES (1); SELECT pg_backend_pid();")
        # Edits after start, to state on the volume: in effect after a reload there.
        _sh(prepared, f"""echo "work_mem = '7MB'" >> {conf}/postgresql.conf && """
                      r"sed -i 's/^\(\s*server_name .*\)$/\1 add_header X-Moved yes;/' "
                      "/etc/nginx/sites-enabled/default && redis-cli SET k moved && "
                      "redis-cli CONFIG SET maxmemory-policy allkeys-lru && "
                      "redis-cli CONFIG REWRITE && redis-cli SAVE && "
                      "echo 'edited = yes' > /etc/tm-edited.conf")

        _sh(prepared, f"nsenter -t {status['db']['root']} -m touch /tmp/tm-note")
        assert _private(prepared, status["db"]["root"]) == (False, True)
        with pytest.raises(PrecheckFailed) as refused:
            update(prepared, VM, STANDBY_KERNEL, pids=roots, strict=True)
        assert "/etc/tm-edited.conf" in str(refused.value)
        assert "changed since t-pkg booted" in str(refused.value)
        assert "/var/log/tm-app.log" not in str(refused.value), "a carried file is no news"
        assert prepared.machines.get(VM).record.kernel.startswith(ACTIVE_KERNEL)

        report = update(prepared, VM, STANDBY_KERNEL, pids=roots)
        assert report.kernel_after.startswith(STANDBY_KERNEL)
        assert "/var/log/tm-app.log" in report.carried
        assert "/run/nginx.pid" in report.carried, "a pid file naming a moved process"
        assert any("/etc/tm-edited.conf" in warning for warning in report.warnings)
        assert not [w for w in report.warnings if "merg" in w], report.warnings
        # PostgreSQL's POSIX shared memory is in its private /dev/shm: CRIU moved it.
        assert not [path for path in report.carried if path.startswith("/dev/shm/")]
        assert _private(prepared, status["db"]["root"]) == (False, True)

        assert web.ask() == "before", "the keep-alive connection answers"
        assert cache.ask() == "2", "the memcached connection and its data moved"
        assert db.ask("INSERT INTO moved VALUES (2); SELECT pg_backend_pid();") == backend
        assert db.ask("COMMIT; SELECT 'committed';") == "committed"
        assert db.ask("SELECT count(*) FROM moved;") == "2"
        assert db.ask("SELECT pg_reload_conf();") == "t"
        time.sleep(2)  # the postmaster passes the reload on to each backend
        assert db.ask("SHOW work_mem;") == "7MB"
        assert _sh(prepared, "redis-cli GET k").strip() == "moved"
        assert "allkeys-lru" in _sh(prepared, "grep ^maxmemory-policy /etc/redis/redis.conf")

        back = update(prepared, VM, ACTIVE_KERNEL, pids=roots)  # and back, to a third VM
        assert back.kernel_after.startswith(ACTIVE_KERNEL)
        assert web.ask() == "before" and cache.ask() == "3"
        assert db.ask("SELECT pg_backend_pid();") == backend
        assert db.ask("SHOW work_mem;") == "7MB"
        after = _status(packaged)
        assert {name: s["root"] for name, s in after.items()} == \
            {name: s["root"] for name, s in status.items()}
        assert all(s["running"] and s["own_ipc"] and all(s["state"].values())
                   for s in after.values()), after
        lines = _sh(prepared, "cat /var/log/tm-app.log").split()
        assert lines == [str(n) for n in range(len(lines))], "nothing lost or doubled"
        # Last, since a reload ends nginx's idle keep-alive connections.
        _sh(prepared, "nginx -s reload && sleep 1")
        headers = _sh(prepared, "python3 -c 'import urllib.request as u; "
                                """print(u.urlopen("http://127.0.0.1/tm.txt").headers)'""")
        assert "X-Moved: yes" in headers
    finally:
        for client in (web, cache, db):
            client.close()
    stopped = cli("stop", VM, "kv", "--config", str(packaged))
    assert stopped.returncode == 0 and "kv stopped" in stopped.stdout, stopped.stderr
    assert _status(packaged)["kv"]["running"] is False
    assert _sh(prepared, "pgrep -c -x redis-server || true").strip() == "0"
