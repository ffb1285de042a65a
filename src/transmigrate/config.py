"""The operator's configuration: ``transmigrate.toml``.

Looked for at ``--config``, then ``$TRANSMIGRATE_CONFIG``, then ./transmigrate.toml.
Every key is optional::

    [image]
    packages = ["nginx"]        # extra Debian packages for the guest image
    files = "guest-files"       # a directory copied over the image's root

    [vm]
    memory_mib = 1024
    cpus = 1

    [services]
    web = ["redis-server"]      # processes that `transmigrate update web` moves
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from transmigrate.errors import TransmigrateError

__all__ = ["ACTIVE_KERNEL", "STANDBY_KERNEL", "Config", "load_config"]

ACTIVE_KERNEL = "6.1.0-57"
STANDBY_KERNEL = "6.12.117"


@dataclass(frozen=True)
class Config:
    image_packages: tuple[str, ...] = ()
    image_files: Path | None = None
    memory_mib: int = 1024
    cpus: int = 1
    services: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False)


def load_config(path: Path | None = None) -> Config:
    if path is None:
        env = os.environ.get("TRANSMIGRATE_CONFIG")
        path = Path(env) if env else Path("transmigrate.toml")
        if not path.exists():
            return Config()
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise TransmigrateError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TransmigrateError(f"config {path} is not valid TOML: {exc}") from exc
    image = data.get("image", {})
    vm = data.get("vm", {})
    packages = image.get("packages", [])
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        raise TransmigrateError(f"config {path}: image.packages must be a list of names")
    files = image.get("files")
    services = data.get("services", {})
    if not isinstance(services, dict) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in services.values()):
        raise TransmigrateError(f"config {path}: services must map VM names to process names")
    return Config(
        image_packages=tuple(packages),
        image_files=(path.parent / files).resolve() if isinstance(files, str) else None,
        memory_mib=int(vm.get("memory_mib", 1024)),
        cpus=int(vm.get("cpus", 1)),
        services={vm_name: tuple(names) for vm_name, names in services.items()},
        source=path,
    )
