"""Faults by VM name: finds the running guest that :mod:`transmigrate.faults` injects into."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transmigrate.faults import FAULTS, FaultTarget, InjectReport, inject, spec_for
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.lifecycle import running
from transmigrate.progress import Progress, silent
from transmigrate.vm.kernels import Kernel

__all__ = ["FAULTS", "fault_target", "inject_by_name"]


def fault_target(host: Host, vm_name: str) -> FaultTarget:
    """The running VM ``vm_name`` as a fault's target; an error if it is not running."""
    machine = running(host, vm_name)
    kernel = Kernel(machine.record.kernel, Path(machine.record.kernel_dir))
    return FaultTarget(vm_name, host.agent(machine), kernel, machine.record.cpus,
                       host.catalog, host.cache)


def inject_by_name(host: Host, vm_name: str, fault: str, *, progress: Progress = silent,
                   **options: Any) -> InjectReport:
    """Inject ``fault`` (a name of :data:`FAULTS`) with ``options`` into VM ``vm_name``."""
    return inject(fault_target(host, vm_name), spec_for(fault, **options), progress)
