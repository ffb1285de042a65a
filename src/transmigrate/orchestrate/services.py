"""Real services in guests, and real clients for them in the private network."""

from __future__ import annotations

import time

from transmigrate.errors import TransmigrateError
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.lifecycle import exec_in

__all__ = ["REDIS_PORT", "redis_cli", "start_redis"]

REDIS_PORT = 6379


def start_redis(host: Host, vm: str, *, timeout: float = 30.0) -> None:
    """Start redis-server in ``vm``, listening on its service address; wait until it answers."""
    started = exec_in(host, vm, [
        "redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--daemonize", "yes",
        "--dir", "/var/lib/redis", "--save", "", "--appendonly", "no",
        "--logfile", "/var/log/redis/redis-server.log"])
    if started.exit_code != 0:
        raise TransmigrateError(f"redis-server did not start in {vm}: {started.stderr!r}")
    deadline = time.monotonic() + timeout
    while exec_in(host, vm, ["redis-cli", "PING"]).text.strip() != "PONG":
        if time.monotonic() > deadline:
            raise TransmigrateError(f"redis in {vm} did not answer within {timeout:.0f} s")
        time.sleep(0.2)


def redis_cli(host: Host, address: str, *args: str, timeout: float = 30.0) -> str:
    """Run redis-cli against ``address`` from inside the private network."""
    done = host.network.run(["redis-cli", "-h", address, "-p", str(REDIS_PORT), *args],
                            capture=True, timeout=timeout)
    if done.returncode != 0:
        raise TransmigrateError(f"redis-cli {' '.join(args)} failed: "
                                f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode(errors="replace").strip()
