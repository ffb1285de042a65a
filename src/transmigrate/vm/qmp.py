"""QMP calls with hard time limits, over QEMU's own ``qemu.qmp`` client."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient, QMPError
from qemu.qmp.qmp_client import GreetingError, NegotiationError

from transmigrate.errors import MachineError

__all__ = ["qmp_execute"]


_SESSION_ATTEMPTS = 3


async def _connect(socket: Path, timeout: float) -> QMPClient:
    """A QMP session. While a block job runs, QEMU can send a new session the job's
    event before its greeting (it is emitted while the monitor still counts the last
    session as negotiated) or before the answer to ``qmp_capabilities`` (that answer
    waits for the main loop); qemu.qmp then gives up on the session. Nothing of ours
    has run, so the session is simply tried again, a few times."""
    for _ in range(_SESSION_ATTEMPTS - 1):
        try:
            return await _session(socket, timeout)
        except ConnectError as exc:
            if not isinstance(exc.exc, (GreetingError, NegotiationError)):
                raise
    return await _session(socket, timeout)


async def _session(socket: Path, timeout: float) -> QMPClient:
    client = QMPClient("transmigrate")
    await asyncio.wait_for(client.connect(str(socket)), timeout)
    return client


async def _execute(socket: Path, command: str, arguments: dict[str, Any] | None,
                   timeout: float) -> Any:
    client = await _connect(socket, timeout)
    try:
        return await asyncio.wait_for(client.execute(command, arguments), timeout)
    finally:
        await client.disconnect()


def qmp_execute(socket: Path, command: str, arguments: dict[str, Any] | None = None,
                *, timeout: float = 10.0) -> Any:
    """Run one QMP command and return its result; every failure is a MachineError."""
    try:
        return asyncio.run(_execute(socket, command, arguments, timeout))
    except (QMPError, OSError, TimeoutError, EOFError) as exc:
        raise MachineError(f"QMP {command} failed: {exc or type(exc).__name__}") from exc
