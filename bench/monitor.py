"""Out-of-guest detection, measured on both kernels in one run.

- Detection latency (just before the trigger is sent -> the event reaches the
  caller) for each injected fault at 1, 10, 100 and 1000 ms intervals; at
  10 ms, the guest kernel's own detector for the same fault (soft lockup, hung
  task) is left to fire and timed from the console.
- Free memory left at detection of the fork bomb, and blocked processes at
  detection of the hung driver, per interval (the research's two curves).
- Monitor CPU per interval (idle guest, every detector on).
- Guest slowdown with the monitor at 1 ms against off: median of alternating
  runs of a CPU and a syscall benchmark inside the guest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.faults import (
    FaultSpec,
    ForkBomb,
    HungDriver,
    clear,
    inject,
    load_module,
    spec_for,
)
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.faults import fault_target
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.monitor import Monitor, MonitorConfig, Watch

INTERVALS_MS = (1, 10, 100, 1000)
FAULT_EVENT = {"deadlock": "lockup", "hung-driver": "hung-driver", "fork-bomb": "fork-storm"}
KERNEL_DETECTOR = {"deadlock": ("soft lockup", 90.0),
                   "hung-driver": ("blocked for more than", 300.0)}
MIB = 1024 * 1024
TRIAL_SPECS: dict[str, FaultSpec] = {
    "hung-driver": HungDriver(readers=200, interval_ms=20),
    "fork-bomb": ForkBomb(seconds=30, mib=8)}
"""Readers that pile up over seconds, and a bomb that fills memory: the research's curves."""


def _watch(host: Host, vm: str, interval_ms: float) -> Watch:
    return Monitor.attach(host, vm, MonitorConfig(interval_s=interval_ms / 1000)).start()


def _console_wait(host: Host, vm: str, text: str, since: float, timeout: float) -> float | None:
    """Seconds from ``since`` until ``text`` shows on the guest's console, or None."""
    log = host.machines.get(vm).console_log
    deadline = since + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return time.monotonic() - since
        time.sleep(0.2)
    return None


def _trial(host: Host, kernel: str, fault: str, interval_ms: int, own_detector: bool,
           ) -> dict[str, Any]:
    vm = "bench-mon"
    lifecycle.up(host, vm, kernel, memory_mib=768, cpus=2)
    try:
        target = fault_target(host, vm)
        if fault != "fork-bomb":
            load_module(target)
        watch = _watch(host, vm, interval_ms)
        try:
            time.sleep(max(1.0, 3 * interval_ms / 1000))
            report = inject(target, TRIAL_SPECS.get(fault) or spec_for(fault))
            event = watch.wait(FAULT_EVENT[fault], timeout=30 + 3 * interval_ms / 1000)
            result: dict[str, Any] = {"latency_ms": None if event is None else round(
                (watch.received_at[event.kind] - report.triggered_at) * 1000, 2)}
            if report.trigger_returned_at is not None:
                # The trigger itself (an agent command, then the guest starting the fault).
                result["trigger_ms"] = round(
                    (report.trigger_returned_at - report.triggered_at) * 1000, 2)
            if event is not None and fault == "deadlock":
                result["rule"] = event.evidence.get("rule")
            if event is not None and fault == "hung-driver":
                result["blocked_at_detection"] = event.evidence["all_blocked"]
            if fault == "fork-bomb":
                sample = watch.at_event.get("fork-storm")
                if sample is not None and sample.memory is not None:
                    result["free_mib_at_detection"] = sample.memory.free // MIB
                    result["total_mib"] = sample.memory.total // MIB
                memory_event = watch.wait("memory-exhaustion", timeout=20)
                result["memory_exhaustion_ms"] = None if memory_event is None else round(
                    (watch.received_at[memory_event.kind] - report.triggered_at) * 1000, 1)
            if own_detector and fault in KERNEL_DETECTOR:
                text, timeout = KERNEL_DETECTOR[fault]
                seconds = _console_wait(host, vm, text, report.triggered_at, timeout)
                result["kernel_detector_s"] = None if seconds is None else round(seconds, 1)
        finally:
            watch.stop()
        if fault != "deadlock":
            clear(target)
        return result
    finally:
        lifecycle.down(host, vm)


def _cpu_cost(host: Host, kernel: str) -> dict[int, float]:
    vm = "bench-mon"
    lifecycle.up(host, vm, kernel, memory_mib=768, cpus=2)
    try:
        costs = {}
        for interval_ms in INTERVALS_MS:
            monitor = Monitor.attach(host, vm, MonitorConfig(interval_s=interval_ms / 1000))
            try:
                stats = monitor.run(lambda _: None, duration_s=max(10.0, 5 * interval_ms / 1000))
            finally:
                monitor.close()
            costs[interval_ms] = round(stats.cpu_fraction * 100, 2)
        return costs
    finally:
        lifecycle.down(host, vm)


CPU_BENCH = ("import time; t = time.perf_counter(); sum(i * i for i in range(400000)); "
             "print(time.perf_counter() - t)")
SYSCALL_BENCH = ("import os, time; t = time.perf_counter(); "
                 "[os.getppid() for _ in range(150000)]; print(time.perf_counter() - t)")


def _slowdown(host: Host, kernel: str, rounds: int = 5) -> dict[str, float]:
    vm = "bench-mon"
    lifecycle.up(host, vm, kernel, memory_mib=768, cpus=1)
    try:
        times: dict[tuple[str, bool], list[float]] = {}
        for _ in range(rounds):
            for monitored in (False, True):
                watch = _watch(host, vm, 1) if monitored else None
                try:
                    for name, code in (("cpu", CPU_BENCH), ("syscall", SYSCALL_BENCH)):
                        out = lifecycle.exec_in(host, vm, ["python3", "-c", code]).text
                        times.setdefault((name, monitored), []).append(float(out))
                finally:
                    if watch is not None:
                        watch.stop()
        return {name: round((statistics.median(times[(name, True)])
                             / statistics.median(times[(name, False)]) - 1) * 100, 2)
                for name in ("cpu", "syscall")}
    finally:
        lifecycle.down(host, vm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--kernels", default=f"{ACTIVE_KERNEL},{STANDBY_KERNEL}")
    parser.add_argument("--no-kernel-detectors", action="store_true",
                        help="skip waiting for the guest's own detectors (saves ~5 minutes)")
    parser.add_argument("--faults", default=",".join(FAULT_EVENT),
                        help="the faults to time, comma-separated")
    parser.add_argument("--no-cost", action="store_true",
                        help="skip the monitor CPU and guest slowdown runs")
    args = parser.parse_args()
    host = Host.from_environment()
    results: dict[str, Any] = {}
    for kernel in args.kernels.split(","):
        per_kernel: dict[str, Any] = {"latency": {}}
        if not args.no_cost:
            per_kernel["cpu_percent"] = _cpu_cost(host, kernel)
            per_kernel["slowdown_percent_at_1ms"] = _slowdown(host, kernel)
        for fault in args.faults.split(","):
            per_kernel["latency"][fault] = {
                ms: _trial(host, kernel, fault, ms,
                           own_detector=ms == 10 and not args.no_kernel_detectors)
                for ms in INTERVALS_MS}
        results[kernel] = per_kernel
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for kernel, r in results.items():
        print(f"== {kernel}")
        if "cpu_percent" in r:
            print("monitor CPU % by interval: " + ", ".join(
                f"{ms} ms: {pct}" for ms, pct in r["cpu_percent"].items()))
            print(f"guest slowdown at 1 ms: {r['slowdown_percent_at_1ms']} %")
        for fault, rows in r["latency"].items():
            for ms, row in rows.items():
                extra = {k: v for k, v in row.items() if k != "latency_ms"}
                print(f"  {fault:<12} {ms:>5} ms interval: latency {row['latency_ms']} ms {extra}")


if __name__ == "__main__":
    main()
