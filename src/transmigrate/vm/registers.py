"""A vCPU's registers as QEMU sees them, read without the guest's help.

A CPU stuck in the kernel cannot say where it is stuck; QEMU can, from outside:
its human monitor's ``info registers`` for one CPU. The instruction pointer
names the function a stuck CPU executes. For recovery, the whole user-visible
state: a task that was running user code when the VM stopped has its registers
in the vCPU, not in the kernel's memory; and a task that was on a CPU at all
has its FPU/SSE/AVX registers there (the kernel saves them only when it
switches away).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transmigrate.errors import MachineError
from transmigrate.vm.machine import Machine

__all__ = ["VcpuState", "instruction_pointer", "parse_info_registers", "vcpu_states"]

_RIP = re.compile(r"\bRIP=([0-9a-f]{16})\b")
_CPL = re.compile(r"\bCPL=(\d)\b")
_GENERAL = re.compile(r"\b(RAX|RBX|RCX|RDX|RSI|RDI|RBP|RSP|R8|R9|R1[0-5]|RIP) ?=([0-9a-f]{16})")
_FLAGS = re.compile(r"\bRFL=([0-9a-f]{8})")
_SEGMENT = re.compile(r"^(ES|CS|SS|DS|FS|GS) =([0-9a-f]{4}) ([0-9a-f]{16})", re.MULTILINE)
_FPU = re.compile(r"FCW=([0-9a-f]{4}) FSW=([0-9a-f]{4}) \[ST=\d\] FTW=([0-9a-f]{2}) "
                  r"MXCSR=([0-9a-f]{8})")
_FPR = re.compile(r"FPR(\d)=([0-9a-f]{16}) ([0-9a-f]{4})")
_VECTOR = re.compile(r"^(XMM|YMM|ZMM)(\d\d)=([0-9a-f ]+)$", re.MULTILINE)
_PT_REGS_NAMES = {"RAX": "ax", "RBX": "bx", "RCX": "cx", "RDX": "dx", "RSI": "si",
                  "RDI": "di", "RBP": "bp", "RSP": "sp", "RIP": "ip",
                  **{f"R{n}": f"r{n}" for n in range(8, 16)}}


@dataclass(frozen=True)
class VcpuState:
    """What a stopped vCPU holds: registers by ``struct pt_regs`` name (ax, ..., r15, ip,
    flags), segment selectors and bases, and the x87/SSE/AVX registers."""

    user_mode: bool
    """CPL 3: it was running user code."""
    general: dict[str, int]
    selectors: dict[str, int]
    """cs, ss, ds, es, fs, gs."""
    fs_base: int
    gs_base: int
    fcw: int
    fsw: int
    """With the top-of-stack field, as FNSTSW stores it."""
    ftw: int
    """The abridged tag byte, as FXSAVE stores it."""
    mxcsr: int
    fpr: tuple[bytes, ...]
    """The 8 physical x87 registers (10 bytes each), not in stack order."""
    xmm: tuple[bytes, ...]
    """XMM0-15, 16 bytes each."""
    ymm_high: tuple[bytes, ...] | None
    """The upper halves of YMM0-15 (16 bytes each), if the CPU has AVX."""
    avx512: bool
    """Whether QEMU showed ZMM registers (AVX-512 state, not kept here)."""


def vcpu_states(machine: Machine, cpus: int, timeout: float = 5.0) -> dict[int, VcpuState]:
    """The state of each vCPU of a stopped VM."""
    return {cpu: parse_info_registers(cpu, _info_registers(machine, cpu, timeout))
            for cpu in range(cpus)}


def parse_info_registers(cpu: int, text: str) -> VcpuState:
    """CPU ``cpu``'s state from QEMU's ``info registers`` text (x86-64)."""
    level, flags, fpu = _CPL.search(text), _FLAGS.search(text), _FPU.search(text)
    general = {_PT_REGS_NAMES[name]: int(value, 16) for name, value in _GENERAL.findall(text)}
    segments = {name.lower(): (int(selector, 16), int(base, 16))
                for name, selector, base in _SEGMENT.findall(text)}
    registers = {int(n): (int(mantissa, 16).to_bytes(8, "little")
                          + int(exponent, 16).to_bytes(2, "little"))
                 for n, mantissa, exponent in _FPR.findall(text)}
    vectors = {int(n): (kind, [int(word, 16) for word in words.split()])
               for kind, n, words in _VECTOR.findall(text)}
    if (level is None or flags is None or fpu is None or len(general) != 17
            or len(segments) != 6 or len(registers) != 8 or sorted(vectors)[:16] != list(
                range(16))):
        raise MachineError(f"QEMU did not show all of CPU {cpu}'s registers")
    general["flags"] = int(flags.group(1), 16)

    def quads(words: list[int], low: int, high: int) -> bytes:
        """Bytes of the 64-bit words ``low``..``high``-1, counted from the least
        significant (QEMU prints the most significant first)."""
        return b"".join(word.to_bytes(8, "little") for word in words[::-1][low:high])

    kinds = {kind for kind, _ in vectors.values()}
    return VcpuState(
        user_mode=level.group(1) == "3", general=general,
        selectors={name: selector for name, (selector, _) in segments.items()},
        fs_base=segments["fs"][1], gs_base=segments["gs"][1],
        fcw=int(fpu.group(1), 16), fsw=int(fpu.group(2), 16), ftw=int(fpu.group(3), 16),
        mxcsr=int(fpu.group(4), 16), fpr=tuple(registers[n] for n in range(8)),
        xmm=tuple(quads(vectors[n][1], 0, 2) for n in range(16)),
        ymm_high=(tuple(quads(vectors[n][1], 2, 4) for n in range(16))
                  if kinds & {"YMM", "ZMM"} else None),
        avx512="ZMM" in kinds)


def _info_registers(machine: Machine, cpu: int, timeout: float) -> str:
    return str(machine.qmp("human-monitor-command",
                           {"command-line": "info registers", "cpu-index": cpu},
                           timeout=timeout)).replace("\r", "")


def instruction_pointer(machine: Machine, cpu: int, timeout: float = 2.0) -> int | None:
    """CPU ``cpu``'s RIP now, or None if QEMU does not answer or has no such CPU."""
    try:
        text = _info_registers(machine, cpu, timeout)
    except MachineError:
        return None
    found = _RIP.search(text)
    return int(found.group(1), 16) if found else None
