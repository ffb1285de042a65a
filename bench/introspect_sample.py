"""Cost of one introspection sample per reader, on each kernel, idle and under a fork storm.

Boots a small VM per kernel, attaches, and times each reader's ``sample()``
(median over many calls); then runs a fork-exec loop in the guest and keeps
sampling the task list, to count walks torn by the guest and failed samples.
Prints a table, and JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.errors import IntrospectionError
from transmigrate.introspect.counters import CounterReader
from transmigrate.introspect.cpus import CpuReader
from transmigrate.introspect.kernel import attach
from transmigrate.introspect.mm import MemoryReader
from transmigrate.introspect.tasks import TaskReader, wait_site
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host

STORM = "timeout {seconds} sh -c 'while :; do /bin/true; done' </dev/null >/dev/null 2>&1 &"


def _median_us(call: Callable[[], object], count: int) -> float:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(host: Host, kernel: str, count: int, storm_seconds: float) -> dict[str, float]:
    name = f"bench-intro-{kernel.split('.')[1]}"
    lifecycle.up(host, name, kernel, memory_mib=512, cpus=2)
    try:
        start = time.perf_counter()
        guest = attach(host.machines.get(name), catalog=host.catalog)
        attach_s = time.perf_counter() - start
        with guest:
            tasks, cpus = TaskReader(guest), CpuReader(guest)
            memory, counters = MemoryReader(guest), CounterReader(guest)
            sample = tasks.sample()
            sleeper = next(t for t in sample.tasks if t.state == "S" and not t.kernel_thread)
            result = {
                "attach_s": round(attach_s, 2),
                "tasks": len(sample.tasks),
                "tasks_us": _median_us(tasks.sample, count),
                "processes_only_us": _median_us(lambda: tasks.sample(threads=False), count),
                "cpus_us": _median_us(cpus.sample, count),
                "memory_us": _median_us(memory.sample, count),
                "counters_us": _median_us(counters.sample, count),
                "wait_site_ms": _median_us(lambda: wait_site(guest, sleeper), 20) / 1000,
            }
            lifecycle.exec_in(host, name, ["sh", "-c", STORM.format(seconds=storm_seconds)])
            samples = failed = 0
            deadline = time.monotonic() + storm_seconds - 0.5
            torn_before = tasks.torn_walks
            while time.monotonic() < deadline:
                samples += 1
                try:
                    tasks.sample()
                except IntrospectionError:
                    failed += 1
            result.update(storm_samples=samples, storm_torn_walks=tasks.torn_walks - torn_before,
                          storm_failed=failed)
    finally:
        lifecycle.down(host, name)
    return {key: round(value, 1) for key, value in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--storm-seconds", type=float, default=5.0)
    args = parser.parse_args()
    host = Host.from_environment()
    results = {kernel: measure(host, kernel, args.count, args.storm_seconds)
               for kernel in (ACTIVE_KERNEL, STANDBY_KERNEL)}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    keys = list(next(iter(results.values())))
    print(f"{'':<22}" + "".join(f"{kernel:>14}" for kernel in results))
    for key in keys:
        print(f"{key:<22}" + "".join(f"{r[key]:>14}" for r in results.values()))


if __name__ == "__main__":
    main()
