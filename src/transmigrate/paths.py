"""Where transmigrate keeps its cache (downloads, kernels, images) and its run state."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Cache for downloads and built artefacts; ``TRANSMIGRATE_CACHE`` overrides."""
    override = os.environ.get("TRANSMIGRATE_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "transmigrate"


def state_dir() -> Path:
    """Run state of VMs and the network; ``TRANSMIGRATE_STATE`` overrides.

    Lives under /run so that a host reboot, which kills every VM, also forgets them.
    """
    override = os.environ.get("TRANSMIGRATE_STATE")
    return Path(override) if override else Path("/run/transmigrate")


def data_dir() -> Path:
    """Services' data volumes, which must outlive any VM; ``TRANSMIGRATE_DATA`` overrides."""
    return Path(os.environ.get("TRANSMIGRATE_DATA", "/var/lib/transmigrate"))


def network_name() -> str:
    """Name of our network namespace; ``TRANSMIGRATE_NETNS`` overrides (tests use their own)."""
    return os.environ.get("TRANSMIGRATE_NETNS", "transmigrate")


def shm_dir() -> Path:
    """Where guest RAM files live: tmpfs, so the host monitor can mmap them cheaply."""
    return Path(os.environ.get("TRANSMIGRATE_SHM", "/dev/shm"))
