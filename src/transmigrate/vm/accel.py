"""Choosing QEMU's accelerator: KVM where it really runs guest code, TCG otherwise.

/dev/kvm can exist and still run nothing: QEMU may abort at the first vCPU
(seen here: it fails to set an MSR), or start and stay up while its guest never
executes an instruction. Staying up proves nothing, so the probe boots a few
bytes of our own firmware that write a marker to the serial port and then end
QEMU through its isa-debug-exit device: only code that really ran can say so.
It takes ~0.05 s where the accelerator works. The answer is cached per host
boot. The probe proves that the vCPU runs, not that a kernel will: a KVM whose
instruction emulator fails later (seen here with the MSR worked around: the
kernel's decompressor stops on an "emulation failure") still leaves the console
empty, so :mod:`transmigrate.orchestrate.lifecycle` boots such a guest again
under TCG and records TCG for the boot (:func:`record_accelerator`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KVM", "PROBE_TIMEOUT", "TCG", "Accelerator", "ProbeResult", "detect_accelerator",
           "forced_accelerator", "probe", "record_accelerator"]

QEMU = "qemu-system-x86_64"
PROBE_TIMEOUT = 3.0
"""How long the probe waits for its firmware (it needs ~0.05 s where it runs)."""
_PROBE_VERSION = 2
"""In the stamp: answers of an older probe (version 1 only saw QEMU stay up) are not trusted."""
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_MARKER = b"tm-probe-ran\n"
_EXIT_PORT = 0xF4
_EXIT_VALUE = 0x2A
_EXIT_STATUS = (_EXIT_VALUE << 1) | 1
"""QEMU's exit status when the guest writes ``_EXIT_VALUE`` to isa-debug-exit."""


class Accelerator(str):
    """``"kvm"`` or ``"tcg"``; knows the QEMU options that go with it."""

    def qemu_args(self) -> list[str]:
        if self == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]


KVM = Accelerator("kvm")
TCG = Accelerator("tcg")


@dataclass(frozen=True)
class ProbeResult:
    """Whether guest code ran under an accelerator, and what was seen."""

    ran: bool
    detail: str
    seconds: float


def _firmware() -> bytes:
    """A 64 KiB BIOS image: the reset vector jumps to code that prints the marker on
    COM1 and writes to isa-debug-exit (real mode, no set-up needed for either)."""
    code = bytearray(b"\xfa")                      # cli
    code += b"\xba" + struct.pack("<H", 0x3F8)     # mov dx, COM1
    for byte in _MARKER:
        code += bytes([0xB0, byte, 0xEE])          # mov al, byte; out dx, al
    code += bytes([0xB0, _EXIT_VALUE, 0xE6, _EXIT_PORT])  # mov al, value; out port, al
    code += b"\xf4\xeb\xfd"                        # hlt; jmp back to hlt
    image = bytearray(b"\xf4" * 0x10000)           # hlt everywhere else
    image[: len(code)] = code
    # The CPU starts at offset 0xFFF0 of the image (CS base 0xFFFF0000, IP 0xFFF0):
    # a near jump from there to IP 0, the code above.
    image[0xFFF0:0xFFF3] = b"\xe9" + struct.pack("<H", -0xFFF3 & 0xFFFF)
    return bytes(image)


def probe(accel: Accelerator, qemu: str = QEMU, timeout: float = PROBE_TIMEOUT) -> ProbeResult:
    """Boot the probe firmware under ``accel``, with the CPU options VMs get; ``ran``
    only if its marker and exit status came back within ``timeout`` seconds."""
    start = time.monotonic()

    def result(ran: bool, detail: str) -> ProbeResult:
        return ProbeResult(ran, detail, time.monotonic() - start)

    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return result(False, "/dev/kvm is missing or not ours to use")
    with tempfile.TemporaryDirectory(prefix="tm-probe-") as scratch:
        firmware = Path(scratch) / "probe.bin"
        firmware.write_bytes(_firmware())
        argv = [qemu, *accel.qemu_args(), "-machine", "q35", "-m", "16",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-bios", str(firmware), "-serial", "stdio",
                "-device", f"isa-debug-exit,iobase={_EXIT_PORT:#x},iosize=0x04"]
        try:
            qemu_process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            start_new_session=True)
        except OSError as exc:
            return result(False, f"cannot start {qemu}: {exc.strerror}")
        try:
            out, err = qemu_process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # The whole group: nothing it started may keep our pipes open.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(qemu_process.pid, signal.SIGKILL)
            qemu_process.communicate()
            return result(False, f"no sign of guest code within {timeout:g} s")
    if qemu_process.returncode == _EXIT_STATUS and _MARKER in out:
        return result(True, "guest code ran")
    code = qemu_process.returncode
    how = (f"died ({signal.strsignal(-code) or f'signal {-code}'})" if code < 0
           else f"exited with status {code}")
    said = err.decode(errors="replace").strip().splitlines()
    first_error = next((line for line in said if "error" in line), said[-1] if said else "")
    return result(False, f"QEMU {how}{': ' + first_error if first_error else ''}")


def forced_accelerator() -> Accelerator | None:
    """The accelerator ``TRANSMIGRATE_ACCEL`` forces, if it names one."""
    forced = os.environ.get("TRANSMIGRATE_ACCEL")
    return Accelerator(forced) if forced in ("kvm", "tcg") else None


def _boot_id() -> str:
    return _BOOT_ID.read_text().strip() if _BOOT_ID.exists() else "unknown"


def _stamp(cache: Path) -> Path:
    return cache / "accel"


def record_accelerator(cache: Path, accel: Accelerator, why: str) -> None:
    """Remember ``accel`` as this host's answer until it reboots, and ``why`` for people."""
    cache.mkdir(parents=True, exist_ok=True)
    _stamp(cache).write_text(f"{_boot_id()} probe-{_PROBE_VERSION} {accel}\n{why}\n")


def detect_accelerator(cache: Path, qemu: str = QEMU) -> Accelerator:
    """KVM if guest code runs under it here, else TCG; ``TRANSMIGRATE_ACCEL`` forces one."""
    forced = forced_accelerator()
    if forced is not None:
        return forced
    stamp = _stamp(cache)
    fields = stamp.read_text().partition("\n")[0].split() if stamp.exists() else []
    if fields[:2] == [_boot_id(), f"probe-{_PROBE_VERSION}"] and fields[2:] in (["kvm"], ["tcg"]):
        return Accelerator(fields[2])
    kvm = probe(KVM, qemu)
    answer = KVM if kvm.ran else TCG
    record_accelerator(cache, answer, f"probe of KVM: {kvm.detail}")
    return answer
