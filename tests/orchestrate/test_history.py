"""The operations' history, in a real SQLite file."""

from __future__ import annotations

from pathlib import Path

from transmigrate.orchestrate.history import History


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
    history.close()


def test_what_a_dead_controller_left_running_is_marked_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    dead = History(path)
    left = dead.start("update", "web", {"kernel": "6.12.117"})
    dead.close()  # as if killed: the row says running
    history = History(path)
    assert [op.id for op in history.close_interrupted()] == [left]
    op = history.get(left)
    assert op is not None and op.outcome == "interrupted" and "controller stopped" in op.error
    assert history.close_interrupted() == []
