"""The main job's demo: two kernels side by side and a real service between them."""

from __future__ import annotations

import contextlib
from typing import Any

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.errors import TransmigrateError
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.lifecycle import down, exec_in, up
from transmigrate.orchestrate.services import redis_cli, start_redis
from transmigrate.progress import Progress, silent

__all__ = ["run"]

ACTIVE, STANDBY = "demo-active", "demo-standby"


def run(host: Host, progress: Progress = silent) -> dict[str, Any]:
    """Boot 6.1 and 6.12 guests, serve redis from the first, query it; stop both."""
    report: dict[str, Any] = {}
    started: list[str] = []
    try:
        for name, kernel in ((ACTIVE, ACTIVE_KERNEL), (STANDBY, STANDBY_KERNEL)):
            booted = up(host, name, kernel, progress=progress)
            started.append(name)
            report[f"{name} kernel"] = exec_in(host, name, ["uname", "-r"]).text.strip()
            report[f"{name} boot seconds"] = round(booted.boot_seconds, 2)
        address = host.machines.get(ACTIVE).record.ip
        progress(f"starting redis in {ACTIVE}")
        start_redis(host, ACTIVE)
        progress(f"querying redis at {address} from the private network")
        report["PING"] = redis_cli(host, address, "PING")
        redis_cli(host, address, "SET", "transmigrate:demo", "kept")
        report["GET transmigrate:demo"] = redis_cli(host, address, "GET", "transmigrate:demo")
        info = redis_cli(host, address, "INFO", "server")
        report["redis_version"] = next(
            (line.split(":", 1)[1] for line in info.splitlines()
             if line.startswith("redis_version:")), "?")
    finally:
        for name in reversed(started):
            progress(f"stopping {name}")
            with contextlib.suppress(TransmigrateError):
                down(host, name)
    return report
