"""What explains an operation, kept after its VMs are gone: each VM's console (its
kernel's log, as QEMU wrote it) and CRIU's logs from the VMs that ran CRIU, in one
directory per operation under the data directory."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from transmigrate import paths
from transmigrate.errors import TransmigrateError
from transmigrate.orchestrate.host import Host
from transmigrate.vm.machine import Machine

__all__ = ["keep_logs"]


def keep_logs(host: Host, label: str, consoles: Sequence[Machine],
              criu: Sequence[tuple[Machine, str]] = ()) -> Path:
    """Copy each of ``consoles``' console, and pack the ``*.log`` files under each
    (VM, directory) of ``criu`` (a tar each, from a VM still running), into
    ``<data>/logs/LABEL-TIME``; that directory. Nothing missing stops it."""
    directory = paths.data_dir() / "logs" / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    directory.mkdir(parents=True, exist_ok=True)
    for machine in consoles:
        with contextlib.suppress(OSError):
            shutil.copyfile(machine.console_log, directory / f"{machine.name}.console.log")
    for machine, root in criu:
        if not machine.alive():  # fenced or gone, its logs with it
            continue
        with contextlib.suppress(TransmigrateError, OSError):
            packed = host.agent(machine).sh(
                f"cd {root} 2>/dev/null || exit 0; find . -name '*.log' | tar -c -T -",
                what="packing CRIU's logs", timeout=15).stdout
            (directory / f"{machine.name}.criu-logs.tar").write_bytes(packed)
    return directory
