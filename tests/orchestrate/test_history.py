"""The operations' history, in a real SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest

from transmigrate.errors import TransmigrateError
from transmigrate.orchestrate.history import Busy, History

from ..conftest import left_running_by_a_dead_process, operated_on_elsewhere


def test_an_operation_is_on_record_from_its_start_to_its_end(tmp_path: Path) -> None:
    history = History(tmp_path / "history.sqlite")
    first = history.start("update", "web", {"kernel": "6.12.117"})
    second = history.start("update", "db", {"kernel": "6.12.117"})
    assert [op.outcome for op in history.recent()] == ["running", "running"]
    history.finish(first, "done", report={"frozen_seconds": 1.5}, downtime_seconds=1.5)
    done = history.get(first)
    assert done is not None and done.outcome == "done" and done.downtime_seconds == 1.5
    assert done.report == {"frozen_seconds": 1.5} and done.request == {"kernel": "6.12.117"}
    assert done.finished_at is not None and done.finished_at >= done.started_at
    assert [op.id for op in history.recent()] == [second, first], "the newest first"
    assert [op.id for op in history.recent(vm="db")] == [second]
    assert history.get(999) is None
    assert history.counts() == [("update", "done", 1), ("update", "running", 1)]
    history.finish(second, "failed", error="no")
    later = history.start("update", "web", {})
    history.finish(later, "done", downtime_seconds=0.5)
    assert history.last_downtimes() == [("web", "update", 0.5)], "the newest that measured"
    history.close()


def test_what_a_dead_process_left_running_is_marked_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    left = left_running_by_a_dead_process(path)
    history = History(path)
    assert [op.id for op in history.close_interrupted()] == [left]
    op = history.get(left)
    assert op is not None and op.outcome == "interrupted" and "stopped before" in op.error
    ours = history.start("recover", "db", {})  # this process lives: it is not touched
    assert history.close_interrupted() == []
    assert [op.outcome for op in history.recent(vm="db")] == ["running"], ours
    again = left_running_by_a_dead_process(path)
    history.start("update", "db", {})  # a new operation closes what the dead left first
    closed = history.get(again)
    assert closed is not None and closed.outcome == "interrupted"


def test_a_recorded_block_is_done_failed_or_interrupted(tmp_path: Path) -> None:
    history = History.at(tmp_path)
    with history.recorded("update", "web", {"kernel": "6.12.117"}) as kept:
        kept.report, kept.downtime_seconds = {"frozen_seconds": 0.8}, 0.8
    with pytest.raises(TransmigrateError), history.recorded("recover", "web", {}):
        raise TransmigrateError("vm 'web' is gone")
    with pytest.raises(KeyboardInterrupt), history.recorded("update", "web", {}):
        raise KeyboardInterrupt
    interrupted, failed, done = history.recent()
    assert (done.outcome, done.downtime_seconds, done.report) == \
        ("done", 0.8, {"frozen_seconds": 0.8})
    assert (failed.kind, failed.outcome, failed.error) == \
        ("recover", "failed", "vm 'web' is gone")
    assert interrupted.outcome == "interrupted" and interrupted.downtime_seconds is None


def test_a_vm_another_living_process_operates_on_is_busy(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    history = History(path)
    with operated_on_elsewhere(path, "web") as (pid, theirs):
        with pytest.raises(Busy, match=rf"web is busy: update \(operation {theirs}\) runs in "
                                       rf"process {pid}"):
            history.start("recover", "web", {})
        with pytest.raises(Busy):
            history.refuse_if_busy("web")
        history.refuse_if_busy("db")  # another VM is free
        ours = history.start("update", "db", {})
        history.start("inject", "db", {})  # this process keeps its own operations apart
    history.finish(ours, "done")
    again = history.start("update", "web", {})  # the other process is gone
    gone = history.get(theirs)
    assert gone is not None and gone.outcome == "interrupted"
    assert [op.id for op in history.recent(vm="web")] == [again, theirs]
