"""The main job's demo: a live kernel update of redis under load, 6.1 to 6.12.

Boots a guest on Linux 6.1 with redis and 100,000 keys on its data volume,
starts a client in the private network that keeps one connection and INCRs in
a loop, moves redis to a new guest on Linux 6.12, and shows the proof: the
same connection (same CLIENT ID, no error, no lost or repeated reply), every
key present, the client's longest wait, the kernel before and after. The update is
kept in the history, so the controller's page shows it on its timeline.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.errors import TransmigrateError
from transmigrate.orchestrate.history import History
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.lifecycle import down, exec_in, up
from transmigrate.orchestrate.services import LoadClient, redis_cli, start_redis
from transmigrate.orchestrate.update import update
from transmigrate.progress import Progress, silent

__all__ = ["KEYS", "VM", "run"]

VM = "demo"
KEYS = 100_000


def run(host: Host, progress: Progress = silent) -> dict[str, Any]:
    """Run the demo; always stop what it started."""
    up(host, VM, ACTIVE_KERNEL, progress=progress)
    try:
        return _update_under_load(host, progress)
    finally:
        progress(f"stopping {VM}")
        with contextlib.suppress(TransmigrateError):
            down(host, VM)


def _update_under_load(host: Host, progress: Progress) -> dict[str, Any]:
    pid = start_redis(host, VM)
    address = host.machines.get(VM).record.ip
    progress(f"loading {KEYS:,} keys into redis at {address}")
    exec_in(host, VM, ["redis-cli", "DEBUG", "POPULATE", str(KEYS)])
    kernel_before = exec_in(host, VM, ["uname", "-r"]).text.strip()
    progress("starting a client that INCRs on one connection")
    client = LoadClient(host, address)
    try:
        time.sleep(2.0)
        keys_before = int(redis_cli(host, address, "DBSIZE"))
        with History.at(host.state).recorded("update", VM, {
                "kernel": STANDBY_KERNEL, "copy": "auto", "pids": [pid]}) as kept:
            report = update(host, VM, STANDBY_KERNEL, pids=[pid], progress=progress)
            kept.report, kept.downtime_seconds = report.as_dict(), report.frozen_seconds
        time.sleep(2.0)
    finally:
        summary = client.stop()
    keys_after = int(redis_cli(host, address, "DBSIZE"))
    return {
        "kernel before": kernel_before,
        "kernel after": exec_in(host, VM, ["uname", "-r"]).text.strip(),
        "redis pid before / after": f"{pid} / {report.pids[0]}",
        "keys before / after": f"{keys_before} / {keys_after}",
        "same connection": summary.get("client_id_start") == summary.get("client_id_end")
        and not summary["errors"],
        "client CLIENT ID start / end": f"{summary.get('client_id_start')} / "
                                        f"{summary.get('client_id_end')}",
        "client replies": summary["replies"],
        "lost or repeated replies": summary["out_of_order"],
        "client errors": summary["errors"],
        "client's longest wait (s)": summary["max_gap_s"],
        "frozen (s)": report.frozen_seconds,
        "update total (s)": report.total_seconds,
        "steps (s)": report.steps,
    }
