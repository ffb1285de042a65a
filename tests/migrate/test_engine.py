"""The step engine: steps run in order; a failure or an interruption undoes them in reverse."""

from __future__ import annotations

from pathlib import Path

import pytest

from transmigrate.guest.agent import GuestAgent
from transmigrate.migrate.engine import MigrationFailed, run_steps
from transmigrate.migrate.plan import Plan, Side
from transmigrate.vm.machine import MachineRecord
from transmigrate.vm.network import Network


def _side(name: str) -> Side:
    record = MachineRecord(
        id=name, name=name, slot=0, kernel="k", kernel_dir="", image="", memory_mib=1,
        cpus=1, accel="tcg", service_mac="", service_address="", service_tap="",
        migration_mac="", migration_address="", migration_tap="", data_volume="",
        ram_path="", started_at=0.0)
    return Side(record, GuestAgent(Path("/nonexistent"), Path("/nonexistent"), name))


def _plan() -> Plan:
    return Plan(source=_side("web"), target=_side("web-next"), network=Network("tm-none"),
                pids=[1], fence_target=lambda: None)


class Recorded:
    """A step that records what the engine did with it, and fails when told to."""

    def __init__(self, name: str, log: list[str], fail: BaseException | None = None) -> None:
        self.name, self.log, self.fail = name, log, fail

    def run(self, plan: Plan) -> None:
        self.log.append(f"run {self.name}")
        if self.fail is not None:
            raise self.fail

    def undo(self, plan: Plan) -> None:
        self.log.append(f"undo {self.name}")


def test_steps_run_in_order_and_the_hook_sees_each_first() -> None:
    log: list[str] = []
    report = run_steps(_plan(), [Recorded("a", log), Recorded("b", log)],
                       before_step=lambda name: log.append(f"before {name}"))
    assert log == ["before a", "run a", "before b", "run b"]
    assert set(report.steps) == {"a", "b"}


def test_a_failure_undoes_every_step_run_in_reverse() -> None:
    log: list[str] = []
    steps = [Recorded("a", log), Recorded("b", log), Recorded("c", log, OSError("boom")),
             Recorded("d", log)]
    with pytest.raises(MigrationFailed, match="c failed: boom; rolled back, the service "
                                              "runs on in web"):
        run_steps(_plan(), steps)
    assert log == ["run a", "run b", "run c", "undo c", "undo b", "undo a"]


def test_an_interruption_rolls_back_and_stays_an_interruption() -> None:
    log: list[str] = []
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_steps(_plan(), [Recorded("a", log), Recorded("b", log, KeyboardInterrupt())],
                  progress=said.append)
    assert log == ["run a", "run b", "undo b", "undo a"]
    assert said[-1] == "interrupted during b: rolled back, the service runs on in web"


def test_a_hook_that_breaks_things_counts_as_the_step_failing() -> None:
    log: list[str] = []

    def sabotage(name: str) -> None:
        if name == "b":
            raise OSError("sabotaged")

    with pytest.raises(MigrationFailed, match="b failed: sabotaged"):
        run_steps(_plan(), [Recorded("a", log), Recorded("b", log)], before_step=sabotage)
    assert log == ["run a", "undo b", "undo a"]
