"""Running host commands: one helper, so every failure carries command, code and output."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from transmigrate.errors import CommandError


def run(
    argv: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run ``argv``; return its stdout as text, or raise :class:`CommandError`."""
    args = [str(a) for a in argv]
    try:
        done = subprocess.run(
            args,
            cwd=cwd,
            input=input,
            capture_output=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(args, 127, f"{args[0]}: not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(args, -1, f"timed out after {timeout} s") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace")
        raise CommandError(args, done.returncode, output)
    return done.stdout.decode(errors="replace")
