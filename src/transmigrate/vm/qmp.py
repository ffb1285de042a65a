"""QMP calls with hard time limits, over QEMU's own ``qemu.qmp`` client."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient, QMPError
from qemu.qmp.qmp_client import GreetingError

from transmigrate.errors import MachineError

__all__ = ["qmp_execute"]


async def _connect(socket: Path, timeout: float) -> QMPClient:
    """A QMP session. A session that gave up on a command (its time limit) leaves QEMU's
    late reply to the next one, where the greeting should be: that one is tried again,
    once (nothing was sent yet)."""
    try:
        return await _session(socket, timeout)
    except ConnectError as exc:
        if not isinstance(exc.exc, GreetingError):
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
