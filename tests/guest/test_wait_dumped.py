"""tm-wait-dumped with the real criu-hold hook, run on the host: the hook is what
CRIU runs at post-dump, here started by a shell in CRIU's place."""

from __future__ import annotations

import subprocess
import time
from importlib import resources
from pathlib import Path

FILES = Path(str(resources.files("transmigrate.guest") / "files"))


def _dump(hold: Path, *, holds: bool, after: float) -> subprocess.Popen[bytes]:
    """A process in CRIU's place: after ``after`` seconds it runs the post-dump hook
    (which holds until the host's word), or exits as a failed dump."""
    then = (f"CRTOOLS_SCRIPT_ACTION=post-dump TM_HOLD={hold} TM_HOLD_TIMEOUT=30 "
            f"sh {FILES / 'criu-hold'}" if holds else "exit 1")
    return subprocess.Popen(["sh", "-c", f"sleep {after}; {then}"])


def _wait(*dumps: tuple[Path, subprocess.Popen[bytes]]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["python3", FILES / "tm-wait-dumped",
                           *(f"{hold}:{dump.pid}" for hold, dump in dumps)],
                          capture_output=True, text=True, timeout=20)


def _holds(tmp_path: Path, count: int) -> list[Path]:
    holds = [tmp_path / f"tree-{n}" for n in range(count)]
    for hold in holds:
        hold.mkdir()
    return holds


def test_returns_once_every_dump_holds_its_tree(tmp_path: Path) -> None:
    holds = _holds(tmp_path, 3)
    dumps = [(hold, _dump(hold, holds=True, after=0.2 * n)) for n, hold in enumerate(holds)]
    try:
        started = time.monotonic()
        waited = _wait(*dumps)
        assert waited.returncode == 0, waited.stderr
        assert time.monotonic() - started >= 0.3  # the last one held at 0.4 s
        assert all((hold / "dumped").exists() for hold in holds)
        assert all(dump.poll() is None for _, dump in dumps)  # held, waiting for the word
    finally:
        subprocess.run(["sh", FILES / "tm-migrate", "decide", "go", *map(str, holds)],
                       check=True)
        assert [dump.wait(timeout=10) for _, dump in dumps] == [0, 0, 0]


def test_names_the_dump_that_failed_before_holding(tmp_path: Path) -> None:
    good, bad = _holds(tmp_path, 2)
    dumps = [(good, _dump(good, holds=True, after=0.1)), (bad, _dump(bad, holds=False, after=0.3))]
    try:
        waited = _wait(*dumps)
        assert waited.returncode == 3
        assert waited.stdout.strip() == str(bad)
    finally:
        subprocess.run(["sh", FILES / "tm-migrate", "decide", "abort", str(good)], check=True)
        assert dumps[0][1].wait(timeout=10) == 1  # the hold resumes its tree


def test_a_dump_already_gone_is_a_failure_at_once(tmp_path: Path) -> None:
    (hold,) = _holds(tmp_path, 1)
    gone = _dump(hold, holds=False, after=0)
    gone.wait()
    waited = _wait((hold, gone))
    assert (waited.returncode, waited.stdout.strip()) == (3, str(hold))
