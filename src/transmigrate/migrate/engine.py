"""Running a migration's steps: in order, and on failure undone in reverse.

Each step has ``run()`` and ``undo()``. If one fails, the steps already run,
and the failed one, are undone in reverse, which leaves the service running on
the source as it was. An interruption (Ctrl-C) rolls back the same way and then
propagates as itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from transmigrate.errors import TransmigrateError
from transmigrate.migrate.plan import MigrationReport, Plan
from transmigrate.migrate.precheck import PrecheckFailed
from transmigrate.progress import Progress, silent

__all__ = ["MigrationFailed", "Step", "StepHook", "run_steps"]

StepHook = Callable[[str], None]
"""Called with a step's name just before it runs (tests use it to break things)."""


class MigrationFailed(TransmigrateError):
    """A migration failed and was rolled back; the service runs where it was."""


class Step(Protocol):
    name: str

    def run(self, plan: Plan) -> None: ...

    def undo(self, plan: Plan) -> None: ...


def run_steps(plan: Plan, steps: Sequence[Step], progress: Progress = silent,
              before_step: StepHook | None = None) -> MigrationReport:
    """Run the steps; on failure undo them in reverse and raise MigrationFailed (or,
    if interrupted, the interruption itself)."""
    done: list[Step] = []
    for step in steps:
        progress(step.name)
        start = time.monotonic()
        try:
            if before_step is not None:
                before_step(step.name)
            step.run(plan)
        except BaseException as exc:
            if isinstance(exc, PrecheckFailed):
                raise
            failures = _undo([*done, step], plan)
            where = plan.source.record.name
            extra = f" (and {'; '.join(failures)})" if failures else ""
            if not isinstance(exc, Exception):
                progress(f"interrupted during {step.name}: rolled back, the service runs on "
                         f"in {where}{extra}")
                raise
            raise MigrationFailed(f"{step.name} failed: {exc}; rolled back, the service runs "
                                  f"on in {where}{extra}") from exc
        plan.report.steps[step.name] = round(time.monotonic() - start, 3)
        done.append(step)
    return plan.report


def _undo(steps: list[Step], plan: Plan) -> list[str]:
    failures = []
    for step in reversed(steps):
        try:
            step.undo(plan)
        except Exception as exc:
            failures.append(f"undo {step.name}: {exc}")
    return failures
