"""Boot-to-agent-ready time per kernel (median of 5), and an idle standby's host memory.

Run with ``make bench-boot``. Prints a table, and JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host

RUNS = 5
IDLE_SECONDS = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=RUNS)
    args = parser.parse_args()
    host = Host.from_environment()
    results: dict[str, dict[str, float | int]] = {}
    for kernel in (ACTIVE_KERNEL, STANDBY_KERNEL):
        times = []
        for run in range(args.runs):
            report = lifecycle.up(host, f"bench-boot-{run}", kernel, memory_mib=1024)
            times.append(report.boot_seconds)
            if run < args.runs - 1:
                lifecycle.down(host, report.machine.name)
        standby = report.machine
        time.sleep(IDLE_SECONDS)
        footprint = standby.memory_footprint()
        lifecycle.down(host, standby.name)
        results[kernel] = {
            "boot_median_s": round(statistics.median(times), 2),
            "boot_min_s": round(min(times), 2),
            "boot_max_s": round(max(times), 2),
            "idle_rss_mib": footprint["rss_kib"] // 1024,
            "idle_ram_file_mib": footprint["ram_file_kib"] // 1024,
            "guest_ram_mib": 1024,
        }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'kernel':<12} {'boot median':>12} {'min':>6} {'max':>6} "
          f"{'idle RSS':>10} {'RAM backed':>11} {'of guest RAM':>13}")
    for kernel, r in results.items():
        print(f"{kernel:<12} {r['boot_median_s']:>11.2f}s {r['boot_min_s']:>5.2f}s "
              f"{r['boot_max_s']:>5.2f}s {r['idle_rss_mib']:>7} MiB {r['idle_ram_file_mib']:>7} MiB"
              f" {r['guest_ram_mib']:>9} MiB")


if __name__ == "__main__":
    main()
