"""Choosing QEMU's accelerator: KVM where it really runs a guest, TCG otherwise.

/dev/kvm can exist and still fail at the first vCPU (seen here: QEMU aborts
setting an MSR). So we start a real KVM machine for a moment and see whether it
survives; the answer is cached per host boot.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

__all__ = ["Accelerator", "detect_accelerator"]

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_PROBE_SECONDS = 1.5


class Accelerator(str):
    """``"kvm"`` or ``"tcg"``; knows the QEMU options that go with it."""

    def qemu_args(self) -> list[str]:
        if self == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]


def _kvm_runs(qemu: str) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        probe = subprocess.Popen(
            [qemu, "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "64",
             "-display", "none", "-nodefaults", "-no-user-config"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        return False
    deadline = time.monotonic() + _PROBE_SECONDS
    while time.monotonic() < deadline:
        if probe.poll() is not None:
            return False
        time.sleep(0.05)
    probe.kill()
    probe.wait()
    return True


def detect_accelerator(cache: Path, qemu: str = "qemu-system-x86_64") -> Accelerator:
    """KVM if a KVM guest survives its first moments here, else TCG.

    ``TRANSMIGRATE_ACCEL`` forces one.
    """
    forced = os.environ.get("TRANSMIGRATE_ACCEL")
    if forced in ("kvm", "tcg"):
        return Accelerator(forced)
    boot_id = _BOOT_ID.read_text().strip() if _BOOT_ID.exists() else "unknown"
    stamp = cache / "accel"
    if stamp.exists():
        cached_boot, _, answer = stamp.read_text().partition(" ")
        if cached_boot == boot_id and answer in ("kvm", "tcg"):
            return Accelerator(answer)
    answer = "kvm" if _kvm_runs(qemu) else "tcg"
    cache.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{boot_id} {answer}")
    return Accelerator(answer)
