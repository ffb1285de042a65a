"""What was done to the VMs, kept: every update, recovery and failover, in SQLite.

One row per operation, written when it starts and again when it ends, by the
process that runs it (the controller, or a one-shot command), so an operation
whose process was killed is still on record: the next controller marks it
``interrupted`` (:meth:`History.close_interrupted`) once that process is gone. The
report is the operation's own (``UpdateReport.as_dict()`` and the like), kept whole
as JSON; the columns are what a list of operations shows. SQLite, because
operators read it for months with the tools they have, and its few writers (the
controller, the odd command beside it) need no server.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transmigrate.errors import TransmigrateError

__all__ = ["Busy", "History", "Operation", "Outcome"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS operations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    vm TEXT NOT NULL,
    request TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    outcome TEXT NOT NULL,
    downtime_seconds REAL,
    error TEXT NOT NULL DEFAULT '',
    report TEXT NOT NULL DEFAULT '{}',
    owner INTEGER NOT NULL DEFAULT 0
)
"""
RUNNING = "running"

FILE = "history.sqlite"
"""In the state directory."""


@dataclass
class Outcome:
    """What a :meth:`History.recorded` block ran to: its report and the downtime."""

    operation: int
    report: dict[str, Any] = field(default_factory=dict)
    downtime_seconds: float | None = None


class Busy(TransmigrateError):
    """The VM already has an operation running."""


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Operation:
    """One operation as the history keeps it (times are the host's wall clock)."""

    id: int
    kind: str
    """'update', 'recover', 'failover' or 'inject'."""
    vm: str
    request: dict[str, Any]
    started_at: float
    finished_at: float | None
    outcome: str
    """'running', 'done', 'failed' or 'interrupted'."""
    downtime_seconds: float | None
    """How long the service was frozen or gone, when the operation measured it."""
    error: str
    report: dict[str, Any]


class History:
    """The operations in ``path`` (created if missing); safe to share between threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(operations)")}
            if "owner" not in columns:  # kept by a controller before one-shot commands were
                self._db.execute("ALTER TABLE operations ADD COLUMN owner INTEGER NOT NULL "
                                 "DEFAULT 0")

    @classmethod
    def at(cls, state: Path) -> History:
        """The history kept in the state directory ``state``."""
        return cls(state / FILE)

    def start(self, kind: str, vm: str, request: dict[str, Any]) -> int:
        """A new operation, running, owned by this process (those a dead process left
        running are marked interrupted first). Refused (:class:`Busy`) while another
        process runs one on ``vm``: two processes moving one VM's services undo each
        other's work. Within a process (the controller) keeping them apart is its job."""
        self.close_interrupted()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the check and the insert as one
            try:
                self._refuse_if_busy(vm)
                cursor = self._db.execute(
                    "INSERT INTO operations (kind, vm, request, started_at, outcome, owner) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (kind, vm, json.dumps(request), time.time(), RUNNING, os.getpid()))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def refuse_if_busy(self, vm: str) -> None:
        """Raise :class:`Busy` if another living process runs an operation on ``vm``."""
        with self._lock:
            self._refuse_if_busy(vm)

    def _refuse_if_busy(self, vm: str) -> None:
        rows = self._db.execute(
            "SELECT id, kind, owner FROM operations WHERE outcome = ? AND vm = ? AND owner != ?",
            (RUNNING, vm, os.getpid())).fetchall()
        for operation, kind, owner in rows:
            if _alive(owner):
                raise Busy(f"{vm} is busy: {kind} (operation {operation}) runs in process "
                           f"{owner}; " + ("stop it first" if kind == "guard"
                                           else "wait for it to end"))

    def recorded(self, kind: str, vm: str, request: dict[str, Any]
                 ) -> contextlib.AbstractContextManager[Outcome]:
        """A new operation, on record for as long as the block runs (see ``recording``)."""
        return self.recording(self.start(kind, vm, request))

    @contextlib.contextmanager
    def recording(self, operation: int) -> Iterator[Outcome]:
        """``operation`` (started) on record for as long as the block runs: done with
        what the block put in the :class:`Outcome`, failed with the error that left it,
        or interrupted."""
        outcome = Outcome(operation)
        try:
            yield outcome
        except KeyboardInterrupt:
            self.finish(operation, "interrupted", error="interrupted (SIGINT)")
            raise
        except BaseException as exc:
            self.finish(operation, "failed", error=str(exc) or type(exc).__name__)
            raise
        self.finish(operation, "done", report=outcome.report,
                    downtime_seconds=outcome.downtime_seconds)

    def finish(self, operation: int, outcome: str, *, report: dict[str, Any] | None = None,
               downtime_seconds: float | None = None, error: str = "") -> None:
        with self._lock:
            self._db.execute(
                "UPDATE operations SET finished_at = ?, outcome = ?, downtime_seconds = ?, "
                "error = ?, report = ? WHERE id = ?",
                (time.time(), outcome, downtime_seconds, error,
                 json.dumps(report or {}, default=str), operation))

    def close_interrupted(self) -> list[Operation]:
        """Mark the operations left running by a process that is gone; return them."""
        with self._lock:
            owners = dict(self._db.execute(
                "SELECT id, owner FROM operations WHERE outcome = ?", (RUNNING,)).fetchall())
        gone = [operation for operation, owner in owners.items() if not _alive(owner)]
        left = self._select(f"WHERE id IN ({', '.join('?' * len(gone))}) ORDER BY id DESC",
                            tuple(gone)) if gone else []
        for op in left:
            self.finish(op.id, "interrupted",
                        error="the process running it stopped before the operation ended")
        return left

    def get(self, operation: int) -> Operation | None:
        rows = self._select("WHERE id = ?", (operation,))
        return rows[0] if rows else None

    def recent(self, *, vm: str | None = None, limit: int = 100) -> list[Operation]:
        """The newest ``limit`` operations first, of ``vm`` or of every VM."""
        if vm is None:
            return self._select("ORDER BY id DESC LIMIT ?", (limit,))
        return self._select("WHERE vm = ? ORDER BY id DESC LIMIT ?", (vm, limit))

    def counts(self) -> list[tuple[str, str, int]]:
        """How many operations are on record, by kind and outcome."""
        with self._lock:
            return [(kind, outcome, count) for kind, outcome, count in self._db.execute(
                "SELECT kind, outcome, COUNT(*) FROM operations GROUP BY kind, outcome "
                "ORDER BY kind, outcome")]

    def last_downtimes(self) -> list[tuple[str, str, float]]:
        """Per VM and kind, the downtime of the newest operation that measured one."""
        with self._lock:
            return [(vm, kind, downtime) for vm, kind, downtime in self._db.execute(
                "SELECT vm, kind, downtime_seconds FROM operations WHERE id IN ("
                "SELECT MAX(id) FROM operations WHERE downtime_seconds IS NOT NULL "
                "GROUP BY vm, kind) ORDER BY vm, kind")]

    def _select(self, where: str, arguments: tuple[Any, ...]) -> list[Operation]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, vm, request, started_at, finished_at, outcome, "
                f"downtime_seconds, error, report FROM operations {where}", arguments
            ).fetchall()
        return [Operation(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6],
                          row[7], row[8], json.loads(row[9])) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
