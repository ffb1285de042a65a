"""The healthy soak at full length: a guest under heavy, legitimate load (redis-benchmark,
a fork-exec loop, compiles, stress-ng, fsync'd writes) watched at 10 ms for ten minutes
per kernel. Every event is a false alarm; the figure is their count (target: 0), with the
monitor's CPU share and the share of samples a running guest tore."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.soak import SOAK_IMAGE, soak

VM = "bench-soak"


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--kernels", default=f"{ACTIVE_KERNEL},{STANDBY_KERNEL}")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    host = Host.from_environment()
    results: dict[str, Any] = {}
    for kernel in args.kernels.split(","):
        lifecycle.up(host, VM, kernel, image_spec=SOAK_IMAGE, memory_mib=640, cpus=2,
                     progress=_progress)
        try:
            report = soak(host, VM, args.seconds, progress=_progress)
        finally:
            lifecycle.down(host, VM)
        results[kernel] = {
            "seconds": round(report.seconds, 1), "false_alarms": len(report.events),
            "events": [event.summary for event in report.events],
            "samples": report.samples,
            "torn_fraction": round(report.torn_samples / max(report.samples, 1), 4),
            "monitor_cpu_percent": round(report.monitor_cpu_fraction * 100, 1),
            "load_running": report.load_running}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for kernel, result in results.items():
        print(f"{kernel}: {result['false_alarms']} false alarms in {result['seconds']} s, "
              f"{result['samples']} samples ({result['torn_fraction']:.2%} torn), "
              f"monitor CPU {result['monitor_cpu_percent']} %, load {result['load_running']}")


if __name__ == "__main__":
    main()
