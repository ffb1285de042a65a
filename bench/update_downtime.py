"""Service downtime of a live kernel update, as a client sees it, against two baselines.

redis under load from our client (one connection, INCR in a loop); downtime is
the client's longest gap between two replies. Measured in one run, on this machine:

- live update with pre-copy, and with post-copy (CRIU lazy pages), 6.1 -> 6.12;
- (a) stop-and-copy: the same move without either;
- (b) what operators do today: restart the VM on the new kernel and start redis
  again (it reloads its AOF from the data volume); the client reconnects.

All moves again as redis' resident memory grows (64 MiB, 256 MiB, 1 GiB).
Targets: live update <= 1/10 of (b); with pre-copy or post-copy, 1 GiB costs < 2x
the 64 MiB downtime.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.services import LoadClient, redis_cli, start_redis
from transmigrate.orchestrate.update import update

VM = "bench-redis"
VALUE_BYTES = 1024


def _prepare(host: Host, resident_mib: int) -> tuple[int, str, int]:
    """Boot, start redis, fill it to about ``resident_mib``; return pid, address, RSS MiB."""
    memory = max(768, resident_mib * 2 + 512)
    lifecycle.up(host, VM, ACTIVE_KERNEL, memory_mib=memory)
    pid = start_redis(host, VM)
    keys = resident_mib * 1024 * 1024 // (VALUE_BYTES + 150)
    lifecycle.exec_in(host, VM, ["redis-cli", "DEBUG", "POPULATE", str(keys), "key",
                                 str(VALUE_BYTES)], timeout=1800)
    address = host.machines.get(VM).record.ip
    info = redis_cli(host, address, "INFO", "memory")
    rss = next(int(line.split(":")[1]) for line in info.splitlines()
               if line.startswith("used_memory_rss:"))
    return pid, address, rss // (1024 * 1024)


def _live(host: Host, resident_mib: int, copy: str) -> dict[str, Any]:
    pid, address, rss = _prepare(host, resident_mib)
    try:
        client = LoadClient(host, address)
        try:
            time.sleep(2)
            report = update(host, VM, STANDBY_KERNEL, pids=[pid], copy=copy)
            time.sleep(2)
        finally:
            summary = client.stop()
        assert not summary["errors"], summary["errors"]
        return {"rss_mib": rss, "downtime_s": summary["max_gap_s"],
                "frozen_s": report.frozen_seconds, "total_s": report.total_seconds,
                "steps": report.steps,
                "precopy_iterations": len(report.criu[0]["precopy"])}
    finally:
        lifecycle.down(host, VM)


def _reboot(host: Host, resident_mib: int) -> dict[str, Any]:
    _, address, rss = _prepare(host, resident_mib)
    try:
        client = LoadClient(host, address, reconnect=True)
        try:
            time.sleep(2)
            start = time.monotonic()
            # The data volume stays, and so does the network with the client in it.
            host.machines.remove(host.machines.get(VM), keep_network=True)
            lifecycle.up(host, VM, STANDBY_KERNEL, memory_mib=max(768, resident_mib * 2 + 512))
            assert host.machines.get(VM).record.ip == address
            start_redis(host, VM, timeout=600)
            total = time.monotonic() - start
            time.sleep(2)
        finally:
            summary = client.stop()
        return {"rss_mib": rss, "downtime_s": summary["max_gap_s"], "frozen_s": None,
                "total_s": round(total, 3), "reconnects": summary["reconnects"]}
    finally:
        lifecycle.down(host, VM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sizes", default="64,256,1024", help="resident MiB, comma-separated")
    args = parser.parse_args()
    host = Host.from_environment()
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[str, Any] = {
        "reboot (b)": _reboot(host, sizes[0]),
        "stop-and-copy (a)": {},
        "live update (pre-copy)": {},
        "live update (post-copy)": {},
    }
    for size in sizes:
        results["stop-and-copy (a)"][size] = _live(host, size, "stop")
        results["live update (pre-copy)"][size] = _live(host, size, "pre")
        results["live update (post-copy)"][size] = _live(host, size, "post")
    ratios: dict[str, float] = {}
    for mode in ("pre-copy", "post-copy"):
        live = results[f"live update ({mode})"]
        ratios[f"{mode} / reboot (target <= 0.10)"] = round(
            live[sizes[0]]["downtime_s"] / results["reboot (b)"]["downtime_s"], 3)
        ratios[f"{mode} / stop-and-copy, smallest"] = round(
            live[sizes[0]]["downtime_s"] / results["stop-and-copy (a)"][sizes[0]]["downtime_s"],
            3)
        ratios[f"{mode} largest / smallest (target < 2)"] = round(
            live[sizes[-1]]["downtime_s"] / live[sizes[0]]["downtime_s"], 3)
    results["ratios"] = {
        **ratios,
        "stop-and-copy largest / smallest": round(
            results["stop-and-copy (a)"][sizes[-1]]["downtime_s"]
            / results["stop-and-copy (a)"][sizes[0]]["downtime_s"], 3),
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    reboot = results["reboot (b)"]
    print(f"{'scenario':<26}{'RSS MiB':>8}{'downtime s':>12}{'frozen s':>10}{'total s':>9}")
    print(f"{'reboot + restart (b)':<26}{reboot['rss_mib']:>8}{reboot['downtime_s']:>12.2f}"
          f"{'-':>10}{reboot['total_s']:>9.1f}")
    for name in ("stop-and-copy (a)", "live update (pre-copy)", "live update (post-copy)"):
        for r in results[name].values():
            print(f"{name:<26}{r['rss_mib']:>8}{r['downtime_s']:>12.2f}{r['frozen_s']:>10.2f}"
                  f"{r['total_s']:>9.1f}")
    for name, value in results["ratios"].items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
