"""Panic and oops from the kernel's globals."""

from __future__ import annotations

from transmigrate.detect.panic import PanicDetector
from transmigrate.introspect.panic import TAINT_DIE

from .samples import health


def test_panic_and_oops_are_reported_when_they_happen() -> None:
    detector = PanicDetector()
    stream = [health(0), health(10, tainted=1 << TAINT_DIE),
              health(20, tainted=1 << TAINT_DIE), health(30, panic_cpu=1, tainted=1 << TAINT_DIE)]
    events = [e for s in stream for e in detector.observe(s)]
    assert [(e.kind, e.monotonic_ns) for e in events] == [("oops", 10_000_000),
                                                          ("panic", 30_000_000)]
    assert events[1].evidence["cpu"] == 1


def test_an_old_taint_is_not_a_new_oops() -> None:
    detector = PanicDetector()
    assert detector.observe(health(0, tainted=1 << TAINT_DIE)) == []
