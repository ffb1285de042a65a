"""What detectors report, and the samples they read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from transmigrate.introspect.counters import Counters
from transmigrate.introspect.cpus import CpuSample
from transmigrate.introspect.mm import MemorySample
from transmigrate.introspect.panic import KernelHealth
from transmigrate.introspect.tasks import TaskSample

__all__ = ["READERS", "Detector", "Event", "Sample"]

READERS = ("cpus", "tasks", "memory", "counters", "health")


@dataclass(frozen=True)
class Sample:
    """One look at the guest kernel; a reader a detector does not need is None."""

    monotonic_ns: int
    cpus: CpuSample | None = None
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
