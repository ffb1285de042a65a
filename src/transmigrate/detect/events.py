"""What detectors report, and the samples they read."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from transmigrate.introspect.counters import Counters
from transmigrate.introspect.cpus import CpuSample
from transmigrate.introspect.mm import MemorySample
from transmigrate.introspect.panic import KernelHealth
from transmigrate.introspect.tasks import TaskSample

__all__ = ["READERS", "Detector", "Event", "Sample"]

READERS = ("cpus", "vcpus", "tasks", "memory", "counters", "health")


@dataclass(frozen=True)
class Sample:
    """One look at the guest kernel; a reader a detector does not need is None."""

    monotonic_ns: int
    read_seconds: float = 0.0
    """How long reading it took (the monitor's cost per look, and its lag)."""
    cpus: CpuSample | None = None
    vcpus: Mapping[int, int] | None = None
    """Host CPU time, in ns, each vCPU's thread has run (read on the host, not in the guest)."""
    tasks: TaskSample | None = None
    memory: MemorySample | None = None
    counters: Counters | None = None
    health: KernelHealth | None = None


@dataclass(frozen=True)
class Event:
    """A fault seen in the guest: what, when (host clock), and the evidence."""

    kind: str
    monotonic_ns: int
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)


class Detector(Protocol):
    name: str
    needs: frozenset[str]
    """Which of READERS its samples must carry."""

    def observe(self, sample: Sample) -> list[Event]:
        """Events this sample completes; each incident is reported once."""
        ...
