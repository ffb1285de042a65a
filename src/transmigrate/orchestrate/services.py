"""Real services in guests, and real clients for them in the private network."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

from transmigrate.errors import TransmigrateError
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.lifecycle import exec_in
from transmigrate.polling import wait_for
from transmigrate.vm.volume import DATA_MOUNT

__all__ = ["REDIS_PORT", "LoadClient", "redis_cli", "start_redis"]

REDIS_PORT = 6379


def start_redis(host: Host, vm: str, *, timeout: float = 30.0) -> int:
    """Start redis-server in ``vm`` with its data on the data volume; return its pid.

    Everything redis writes (AOF, RDB, log) is on /data, so that it moves with it.
    """
    exec_in(host, vm, [
        "redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--daemonize", "yes",
        "--dir", DATA_MOUNT, "--appendonly", "yes", "--save", "",
        "--logfile", f"{DATA_MOUNT}/redis.log", "--pidfile", f"{DATA_MOUNT}/redis.pid",
        "--enable-debug-command", "local"]).check("starting redis-server", vm)
    wait_for(lambda: exec_in(host, vm, ["redis-cli", "PING"]).text.strip() == "PONG",
             timeout=timeout, interval=0.2, what=f"redis in {vm} did not answer")
    return int(exec_in(host, vm, ["cat", f"{DATA_MOUNT}/redis.pid"]).text)


def redis_cli(host: Host, address: str, *args: str, timeout: float = 30.0) -> str:
    """Run redis-cli against ``address`` from inside the private network."""
    done = host.network.run(["redis-cli", "-h", address, "-p", str(REDIS_PORT), *args],
                            capture=True, timeout=timeout)
    if done.returncode != 0:
        raise TransmigrateError(f"redis-cli {' '.join(args)} failed: "
                                f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode(errors="replace").strip()


class LoadClient:
    """Our redis client (orchestrate.loadgen) running in the private network."""

    def __init__(self, host: Host, address: str, seconds: float = 600.0, *,
                 reconnect: bool = False) -> None:
        self.process = subprocess.Popen(
            [*host.network.prefix(), sys.executable, "-m", "transmigrate.orchestrate.loadgen",
             address, "--seconds", str(seconds), *(["--reconnect"] if reconnect else [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.process.stderr is not None
        started = self.process.stderr.readline().decode()
        if "running" not in started:
            self.process.kill()
            raise TransmigrateError(f"the load client did not start: {started.strip()}")

    def stop(self) -> dict[str, Any]:
        """Stop it (by its pid) and return its summary."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=60)
        summary: dict[str, Any] = json.loads(out.decode())
        return summary
