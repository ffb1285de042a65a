"""A vCPU's registers as QEMU sees them, read without the guest's help.

A CPU stuck in the kernel cannot say where it is stuck; QEMU can, from outside:
its human monitor's ``info registers`` for one CPU. Only the instruction
pointer is parsed: that is what names the function a stuck CPU executes; and
the privilege level, which tells recovery whether a CPU was running user code
(whose registers are then in the vCPU, not in the kernel's memory).
"""

from __future__ import annotations

import re

from transmigrate.errors import MachineError
from transmigrate.vm.machine import Machine

__all__ = ["cpus_in_user_mode", "instruction_pointer"]

_RIP = re.compile(r"\bRIP=([0-9a-f]{16})\b")
_CPL = re.compile(r"\bCPL=(\d)\b")


def _info_registers(machine: Machine, cpu: int, timeout: float) -> str:
    return str(machine.qmp("human-monitor-command",
                           {"command-line": "info registers", "cpu-index": cpu},
                           timeout=timeout))


def instruction_pointer(machine: Machine, cpu: int, timeout: float = 2.0) -> int | None:
    """CPU ``cpu``'s RIP now, or None if QEMU does not answer or has no such CPU."""
    try:
        text = _info_registers(machine, cpu, timeout)
    except MachineError:
        return None
    found = _RIP.search(text)
    return int(found.group(1), 16) if found else None


def cpus_in_user_mode(machine: Machine, cpus: int, timeout: float = 5.0) -> frozenset[int]:
    """The vCPUs of a stopped VM that were running user code (CPL 3)."""
    found = set()
    for cpu in range(cpus):
        level = _CPL.search(_info_registers(machine, cpu, timeout))
        if level is None:
            raise MachineError(f"QEMU did not show CPU {cpu}'s privilege level")
        if level.group(1) == "3":
            found.add(cpu)
    return frozenset(found)
