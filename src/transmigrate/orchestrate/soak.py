"""A healthy guest under heavy, legitimate load, watched from outside: the detectors
must stay quiet. The suite runs it for two minutes on both kernels at once; bench/soak.py
for ten per kernel."""

from __future__ import annotations

import shlex
import time
from dataclasses import asdict, dataclass
from typing import Any

from transmigrate.detect.events import Event
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.lifecycle import exec_in
from transmigrate.orchestrate.monitor import Monitor, MonitorConfig
from transmigrate.orchestrate.services import start_redis
from transmigrate.progress import Progress, silent
from transmigrate.vm.image import ImageSpec

__all__ = ["SOAK_IMAGE", "SOAK_LOAD", "SoakReport", "soak"]

SOAK_IMAGE = ImageSpec(extra_packages=("gcc", "libc6-dev", "stress-ng"))
"""The guest image plus a compiler and stress-ng, for legitimate heavy load."""
SOAK_LOAD = {
    "redis-benchmark": "redis-benchmark -q -n 1000000000 -c 20",
    "fork-exec loop": "while :; do /bin/true; done",
    "compile": "cd /tmp && i=0; while [ $i -lt 3000 ]; do "
               "echo \"int f$i(int x) { return x * $i + $i; }\"; i=$((i+1)); done > big.c; "
               "while :; do gcc -O2 -c big.c -o big.o; done",
    "stress-ng": "stress-ng --cpu 1 --vm 1 --vm-bytes 96M --io 1 --fork 1 --hdd 1 "
                 "--hdd-bytes 32M --timeout 0",
    "file I/O and fsync": "while :; do dd if=/dev/zero of=/data/fill bs=1M count=64 "
                          "conv=fsync 2>/dev/null; done",
}
"""What loads the guest, by name: a shell loop each, in its own session."""
_STILL_RUNNING = {"redis-benchmark": "redis-benchmark", "stress-ng": "stress-ng"}
"""Long-lived processes that show the load is still there at the end."""


@dataclass(frozen=True)
class SoakReport:
    vm: str
    seconds: float
    samples: int
    torn_samples: int
    monitor_cpu_fraction: float
    events: tuple[Event, ...]
    """Every event is a false alarm: nothing is wrong with this guest."""
    load_running: dict[str, int]
    """Processes of each load still running at the end (0: the load died)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def soak(host: Host, vm: str, seconds: float, progress: Progress = silent) -> SoakReport:
    """Load ``vm`` (booted from :data:`SOAK_IMAGE`) with :data:`SOAK_LOAD` and redis, and
    watch it for ``seconds``."""
    start_redis(host, vm)
    for what, script in SOAK_LOAD.items():
        exec_in(host, vm, ["sh", "-c", f"setsid sh -c {shlex.quote(script)} "
                                       "</dev/null >/dev/null 2>&1 &"]).check(what, vm)
    progress(f"watching {vm} under load for {seconds:g} s")
    with Monitor.attach(host, vm, MonitorConfig(interval_s=0.01)).start() as watch:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 30.0))
            progress(f"{seconds - max(left - 30.0, 0):.0f} s of {seconds:g} s, "
                     f"{len(watch.events)} events")
        counts = exec_in(host, vm, ["sh", "-c", "; ".join(
            f"pgrep -cx {name} || true" for name in _STILL_RUNNING.values())]).text.split()
    stats = watch.stop()
    return SoakReport(vm, stats.wall_seconds, stats.samples, stats.torn_samples,
                      stats.cpu_fraction, tuple(stats.events),
                      {what: int(count) for what, count in zip(_STILL_RUNNING, counts,
                                                                strict=True)})
