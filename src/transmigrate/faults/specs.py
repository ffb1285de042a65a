"""What to inject: one small, validated spec per fault, instead of one call with every
fault's options."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from transmigrate.errors import FaultError

__all__ = ["FAULTS", "SPECS", "Deadlock", "FaultSpec", "ForkBomb", "HungDriver", "MemoryBomb",
           "Oops", "Panic", "spec_for"]


@dataclass(frozen=True)
class Deadlock:
    """A kthread bound to ``cpu`` (default: the VM's last CPU) takes the module's
    spinlock twice and spins forever with preemption off (and interrupts off with
    ``irqs_off``). With ``all_cpus``, a kthread on every other CPU waits for that
    lock: the whole guest stops. Cannot be cleared; on a 1-CPU VM the whole guest
    stops too."""

    cpu: int | None = None
    irqs_off: bool = False
    all_cpus: bool = False
    name: ClassVar[str] = "deadlock"

    def __post_init__(self) -> None:
        if self.all_cpus and (self.cpu is not None or self.irqs_off):
            raise FaultError("a deadlock on all CPUs takes neither a cpu nor irqs_off")


@dataclass(frozen=True)
class HungDriver:
    """``readers`` processes block in state D reading the module's device, one every
    ``interval_ms``; data written to the device then wakes none of them."""

    readers: int = 16
    interval_ms: int = 0
    name: ClassVar[str] = "hung-driver"

    def __post_init__(self) -> None:
        if self.readers < 1:
            raise FaultError("the hung driver needs at least one reader")


@dataclass(frozen=True)
class ForkBomb:
    """tm-forkbomb for ``seconds``, each child touching ``mib`` MiB, at most ``maximum``
    processes (0: no limit), ``delay_ms`` between forks. ``linear``: only the first
    process forks (steady growth); otherwise every process does (exponential: under
    TCG the guest, its agent included, stops answering until ``seconds`` have passed)."""

    seconds: int = 60
    mib: int = 16
    maximum: int = 0
    delay_ms: int = 100
    linear: bool = True
    name: ClassVar[str] = "fork-bomb"

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise FaultError("the fork bomb needs a duration in seconds")


@dataclass(frozen=True)
class MemoryBomb:
    """One process (tm-forkbomb ``--hog``) that allocates and touches ``mib`` MiB every
    ``delay_ms`` and keeps it all, for ``seconds`` or until the OOM killer takes it
    (it asks to be taken first)."""

    seconds: int = 60
    mib: int = 8
    delay_ms: int = 100
    name: ClassVar[str] = "memory-bomb"

    def __post_init__(self) -> None:
        if self.seconds <= 0 or self.mib <= 0:
            raise FaultError("the memory bomb needs a duration in seconds and a size in MiB")


@dataclass(frozen=True)
class Oops:
    """``BUG()`` in the module, in a shell that writes the command: the kernel oopses,
    kills that shell and runs on, tainted."""

    name: ClassVar[str] = "oops"


@dataclass(frozen=True)
class Panic:
    """The kernel's own ``panic()`` through ``/proc/sysrq-trigger``; the guest's pvpanic
    device makes QEMU pause the VM, memory intact."""

    name: ClassVar[str] = "panic"


FaultSpec = Deadlock | HungDriver | ForkBomb | MemoryBomb | Oops | Panic
SPECS: dict[str, type[FaultSpec]] = {
    spec.name: spec for spec in (Deadlock, HungDriver, ForkBomb, MemoryBomb, Oops, Panic)}
FAULTS = tuple(SPECS)


def spec_for(fault: str, **options: Any) -> FaultSpec:
    """The spec of ``fault`` by name, with ``options`` (those that are None left at their
    defaults)."""
    if fault not in SPECS:
        raise FaultError(f"unknown fault {fault!r}; choose one of {', '.join(FAULTS)}")
    spec = SPECS[fault]
    known = {field.name for field in fields(spec)}
    given = {key: value for key, value in options.items() if value is not None}
    unknown = set(given) - known
    if unknown:
        raise FaultError(f"{fault} takes no {', '.join(sorted(unknown))}")
    return spec(**given)
