"""Kernel panic and oops, seen in the kernel's own memory."""

from __future__ import annotations

from transmigrate.detect.events import Event, Sample

__all__ = ["PanicDetector"]


class PanicDetector:
    name = "panic"
    needs = frozenset({"health"})

    def __init__(self) -> None:
        self._panicked = False
        self._oopsed: bool | None = None

    def observe(self, sample: Sample) -> list[Event]:
        health = sample.health
        assert health is not None
        events = []
        if health.panicked and not self._panicked:
            events.append(Event("panic", health.monotonic_ns,
                                f"kernel panic on CPU {health.panic_cpu}",
                                {"cpu": health.panic_cpu}))
        self._panicked = health.panicked
        if self._oopsed is False and health.oopsed:
            events.append(Event("oops", health.monotonic_ns, "kernel oops (TAINT_DIE set)",
                                {"tainted_mask": hex(health.tainted_mask)}))
        self._oopsed = health.oopsed
        return events
