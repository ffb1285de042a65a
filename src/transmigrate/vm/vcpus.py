"""How much host CPU time each vCPU of a running QEMU has had.

A guest CPU that makes no progress for 80 ms is stuck only if its vCPU ran
during those 80 ms. Under TCG a vCPU thread also waits, legitimately, for
QEMU's big lock, for another vCPU's exclusive work (atomics, translation-cache
flushes) or for a host core; under heavy load we measured ~85 ms stretches in
which one vCPU thread ran 3 to 5 ms. The kernel's scheduler statistics of each
vCPU thread (``/proc/PID/task/TID/schedstat``, its first field: nanoseconds
on a CPU) tell the two apart, at about a microsecond a read.
"""

from __future__ import annotations

import contextlib
import os

from transmigrate.errors import MachineError
from transmigrate.vm.machine import Machine

__all__ = ["VcpuClock"]


class VcpuClock:
    """Open on each vCPU thread's schedstat; ``sample`` reads them all."""

    def __init__(self, machine: Machine) -> None:
        pid = machine.pid
        answer = machine.qmp("query-cpus-fast")
        if pid is None or not isinstance(answer, list):
            raise MachineError(f"vm {machine.name!r}: cannot find its vCPU threads")
        self._files: dict[int, int] = {}
        try:
            for vcpu in answer:
                path = f"/proc/{pid}/task/{vcpu['thread-id']}/schedstat"
                self._files[int(vcpu["cpu-index"])] = os.open(path, os.O_RDONLY)
        except OSError as error:
            self.close()
            raise MachineError(f"vm {machine.name!r}: cannot read its vCPU threads: "
                               f"{error}") from error

    def sample(self) -> dict[int, int]:
        """Nanoseconds each vCPU's thread has run on the host; a thread that is gone
        (QEMU exiting) is left out."""
        ran = {}
        for cpu, fd in self._files.items():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ran[cpu] = int(os.pread(fd, 64, 0).split()[0])
        return ran

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
