"""Frozen time and client-observed downtime as the number of process trees moved together
grows: redis under load from our client (one connection) and N-1 small trees beside it
(shell loops writing to the volume), moved 6.1 -> 6.12 in one update, from a fresh VM
each time. Figures are ratios against the move of redis alone, in the same run; a
client that gave up (its socket waits 120 s) is named beside its figures.

Targets (issue 11): 10 trees frozen <= 1.2x one tree, 50 trees <= 2x.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.services import LoadClient, start_redis
from transmigrate.orchestrate.update import update

VM = "bench-trees"
TICKER = "i=0; while :; do i=$((i + 1)); echo $i > /data/ticks/$$; sleep 1; done"


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _move(host: Host, trees: int) -> dict[str, Any]:
    # Each tree's held dump needs ~8-12 MiB until the commit (the precheck refuses a
    # move that would not fit): the VM grows with the trees.
    lifecycle.up(host, VM, ACTIVE_KERNEL, memory_mib=max(768, 512 + 16 * trees),
                 progress=_progress)
    try:
        redis = start_redis(host, VM)
        started = lifecycle.exec_in(host, VM, ["sh", "-c", "mkdir -p /data/ticks && " + "".join(
            f"setsid sh -c '{TICKER}' </dev/null >/dev/null 2>&1 & " for _ in range(trees - 1))
            + f"until [ $(ls /data/ticks | wc -l) -ge {trees - 1} ]; do sleep 0.2; done; "
            "ls /data/ticks"], timeout=300)
        tickers = [int(pid) for pid in started.text.split()]
        assert len(tickers) == trees - 1, started.text
        client = LoadClient(host, host.machines.get(VM).record.ip)
        try:
            time.sleep(2)
            report = update(host, VM, STANDBY_KERNEL, pids=[redis, *tickers], progress=_progress)
            time.sleep(2)
        finally:
            summary = client.stop()
        alive = lifecycle.exec_in(host, VM, ["kill", "-0", *map(str, report.pids)])
        assert alive.exit_code == 0, "every tree runs on the new VM"
        return {"trees": trees, "frozen_s": report.frozen_seconds,
                "downtime_s": round(summary["max_gap_s"], 3),
                "total_s": report.total_seconds, "client_errors": summary["errors"],
                "steps": report.steps}
    finally:
        lifecycle.down(host, VM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trees", default="1,10,50", help="tree counts, the first the baseline")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    host = Host.from_environment()
    runs = []
    for n in args.trees.split(","):
        runs.append(_move(host, int(n)))
        _progress(f"measured: {json.dumps({k: v for k, v in runs[-1].items() if k != 'steps'})}")
    base = runs[0]
    for run in runs:
        run["frozen_ratio"] = round(run["frozen_s"] / base["frozen_s"], 2)
        run["downtime_ratio"] = round(run["downtime_s"] / base["downtime_s"], 2)
    if args.json:
        print(json.dumps(runs, indent=2))
        return
    print(f"{'trees':>5}{'frozen s':>10}{'x one':>7}{'client s':>10}{'x one':>7}{'total s':>9}")
    for run in runs:
        print(f"{run['trees']:>5}{run['frozen_s']:>10.2f}{run['frozen_ratio']:>7.2f}"
              f"{run['downtime_s']:>10.2f}{run['downtime_ratio']:>7.2f}{run['total_s']:>9.1f}"
              + (f"  client: {run['client_errors'][0]}" if run["client_errors"] else ""))


if __name__ == "__main__":
    main()
