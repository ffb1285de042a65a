"""The operator's configuration: ``transmigrate.toml``.

Looked for at ``--config``, then ``$TRANSMIGRATE_CONFIG``, then ./transmigrate.toml.
Every key is optional::

    [image]
    packages = ["nginx"]        # extra Debian packages for the guest image
    files = "guest-files"       # a directory copied over the image's root

    [vm]                        # defaults for every VM
    memory_mib = 1024
    cpus = 1

    [vms.web]                   # a VM, by name: what `transmigrate up web` boots
    kernel = "6.1.0-57"         # (--kernel may then be left out)
    memory_mib = 2048           # over [vm]'s
    cpus = 2
    data_mib = 8192             # its data volume's size when created (default 4096)

    [services.db]               # a declared service, by name
    vm = "web"                  # the VM that runs it
    start = ["pg_ctlcluster", "15", "main", "start"]
    process = "postgres"        # what `update` moves (default: start's program)
    state = ["/etc/postgresql", "/var/lib/postgresql"]   # kept on the data volume
    namespaces = ["ipc"]        # its own IPC namespace (the default; [] for none), and
                                # with "mount" a private /tmp and /dev/shm
    boot = true                 # `transmigrate up` starts it

    [services]
    web = ["redis-server"]      # the short form: processes that `update web` moves

    [guard.web]                 # `transmigrate serve` guards VM web with this policy
    standby_kernel = "6.12"     # (the keys of `guard --policy`)
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from transmigrate.errors import TransmigrateError

__all__ = ["ACTIVE_KERNEL", "NAMESPACES", "STANDBY_KERNEL", "Config", "Service", "VmSpec",
           "load_config"]

ACTIVE_KERNEL = "6.1.0-57"
STANDBY_KERNEL = "6.12.117"


NAMESPACES = ("ipc", "mount")
"""What a service may get of its own: an IPC namespace (SysV objects, POSIX mqueues),
a mount namespace (its own /tmp and /dev/shm, on tmpfs): CRIU moves them with it."""
_NOT_STATE = ("/", "/etc", "/var", "/run", "/usr", "/bin", "/sbin", "/lib", "/lib64")
"""Paths that cannot be a service's state as a whole: the system's own."""
_NOT_UNDER = ("/proc", "/sys", "/dev", "/data")
"""Nothing under these is state: the kernel's views, and the volume itself."""


def _may_be_state(item: str) -> bool:
    pure = PurePosixPath(item)
    return (pure.is_absolute() and ".." not in pure.parts and str(pure) not in _NOT_STATE
            and not any(pure == PurePosixPath(top) or PurePosixPath(top) in pure.parents
                        for top in _NOT_UNDER))


@dataclass(frozen=True)
class Service:
    """What a service is: where it runs, how it starts, what moves, where its state is."""

    name: str
    vm: str
    process: str
    """The name of the process `update` moves (its oldest, with its tree)."""
    start: tuple[str, ...] = ()
    """The command that starts it; empty: someone else does."""
    state: tuple[str, ...] = ()
    """Absolute paths kept on the data volume, bind-mounted where the service expects them."""
    namespaces: tuple[str, ...] = ("ipc",)
    boot: bool = False


@dataclass(frozen=True)
class VmSpec:
    """A VM as the configuration declares it: what ``up`` boots under its name."""

    name: str
    kernel: str | None = None
    memory_mib: int = 1024
    cpus: int = 1
    data_mib: int = 4096
    """The size of its data volume, when it is created."""


@dataclass(frozen=True)
class Config:
    image_packages: tuple[str, ...] = ()
    image_files: Path | None = None
    memory_mib: int = 1024
    cpus: int = 1
    vms: Mapping[str, VmSpec] = field(default_factory=dict)
    services: tuple[Service, ...] = ()
    guards: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """VM name -> its guard policy, as ``guard --policy`` reads it (checked by the
    controller, which runs a guard for each)."""
    source: Path | None = field(default=None, compare=False)

    def services_of(self, vm: str) -> tuple[Service, ...]:
        return tuple(service for service in self.services if service.vm == vm)

    def vm(self, name: str) -> VmSpec:
        """VM ``name`` as declared, else with the defaults of ``[vm]``."""
        return self.vms.get(name) or VmSpec(name, memory_mib=self.memory_mib, cpus=self.cpus)


def _strings(value: Any, key: str, path: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TransmigrateError(f"config {path}: {key} must be a list of strings")
    return tuple(value)


_SERVICE_KEYS = {"vm", "start", "process", "state", "namespaces", "boot"}


def _service(name: str, table: dict[str, Any], path: Path) -> Service:
    key = f"services.{name}"
    unknown = set(table) - _SERVICE_KEYS
    if unknown:
        raise TransmigrateError(f"config {path}: unknown key {key}.{sorted(unknown)[0]}; "
                                f"known: {', '.join(sorted(_SERVICE_KEYS))}")
    vm = table.get("vm")
    if not isinstance(vm, str) or not vm:
        raise TransmigrateError(f"config {path}: {key}.vm must name the VM that runs it")
    start = _strings(table.get("start", []), f"{key}.start", path)
    process = table.get("process", PurePosixPath(start[0]).name if start else "")
    if not isinstance(process, str) or not process:
        raise TransmigrateError(f"config {path}: {key}.process must name the process "
                                "that update moves")
    state = _strings(table.get("state", []), f"{key}.state", path)
    for item in state:
        if not _may_be_state(item):
            raise TransmigrateError(f"config {path}: {key}.state: {item!r} cannot be state: "
                                    "give an absolute path outside /proc, /sys, /dev, /data "
                                    "and the system's own directories")
    namespaces = _strings(table.get("namespaces", ["ipc"]), f"{key}.namespaces", path)
    bad = set(namespaces) - set(NAMESPACES)
    if bad:
        raise TransmigrateError(f"config {path}: {key}.namespaces: unknown "
                                f"{', '.join(sorted(bad))}; known: {', '.join(NAMESPACES)}")
    boot = table.get("boot", False)
    if not isinstance(boot, bool):
        raise TransmigrateError(f"config {path}: {key}.boot must be true or false")
    return Service(name, vm, process, start, tuple(str(PurePosixPath(p)) for p in state),
                   namespaces, boot)


def _services(data: Any, path: Path) -> tuple[Service, ...]:
    if not isinstance(data, dict):
        raise TransmigrateError(f"config {path}: services must be a table")
    services = []
    for key, value in data.items():
        if isinstance(value, list):  # the short form: VM = [process names]
            services += [Service(process, key, process, namespaces=())
                         for process in _strings(value, f"services.{key}", path)]
        elif isinstance(value, dict):
            services.append(_service(key, value, path))
        else:
            raise TransmigrateError(f"config {path}: services.{key} must be a table "
                                    "or a list of process names")
    names = [service.name for service in services]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise TransmigrateError(f"config {path}: service {twice[0]} is declared twice")
    return tuple(services)


def load_config(path: Path | None = None, settings: Sequence[str] = ()) -> Config:
    """The configuration in ``path`` (or where it is looked for), with ``settings`` over
    it: ``KEY=VALUE``, a TOML key (dotted: ``guard.web.standby_kernel``) and a TOML
    value, else the text as a string (so ``vm.cpus=2`` is a number, and a kernel like
    6.12 must be quoted: ``guard.web.standby_kernel="6.12"``)."""
    optional = path is None
    if path is None:
        env = os.environ.get("TRANSMIGRATE_CONFIG")
        path = Path(env) if env else Path("transmigrate.toml")
        if not path.exists() and not settings:
            return Config()
    try:
        data = {} if optional and not path.exists() else tomllib.loads(path.read_text())
    except OSError as exc:
        raise TransmigrateError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TransmigrateError(f"config {path} is not valid TOML: {exc}") from exc
    for setting in settings:
        _merge(data, _setting(setting))
    _known(data, _TOP_KEYS, "", path)
    image = _table(data, "image", path)
    vm = _table(data, "vm", path)
    _known(image, {"packages", "files"}, "image.", path)
    _known(vm, {"memory_mib", "cpus"}, "vm.", path)
    packages = image.get("packages", [])
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        raise TransmigrateError(f"config {path}: image.packages must be a list of names")
    files = image.get("files")
    memory_mib, cpus = _count(vm, "memory_mib", 1024, path), _count(vm, "cpus", 1, path)
    vms = {}
    for name, table in _table(data, "vms", path).items():
        if not isinstance(table, dict):
            raise TransmigrateError(f"config {path}: vms.{name} must be a table")
        _known(table, _VM_KEYS, f"vms.{name}.", path)
        kernel = table.get("kernel")
        if kernel is not None and (not isinstance(kernel, str) or not kernel):
            raise TransmigrateError(f"config {path}: vms.{name}.kernel must be a kernel "
                                    'release in quotes, e.g. "6.12.117"')
        prefix = f"vms.{name}."
        vms[name] = VmSpec(name, kernel, _count(table, "memory_mib", memory_mib, path, prefix),
                           _count(table, "cpus", cpus, path, prefix),
                           _count(table, "data_mib", 4096, path, prefix))
    guards = _table(data, "guard", path)
    for name, policy in guards.items():
        if not isinstance(policy, dict):
            raise TransmigrateError(f"config {path}: guard.{name} must be a table (the "
                                    f"guard policy of VM {name})")
    return Config(
        image_packages=tuple(packages),
        image_files=(path.parent / files).resolve() if isinstance(files, str) else None,
        memory_mib=memory_mib,
        cpus=cpus,
        vms=vms,
        services=_services(data.get("services", {}), path),
        guards=guards,
        source=path,
    )


_TOP_KEYS = {"image", "vm", "vms", "services", "guard"}
_VM_KEYS = {"kernel", "memory_mib", "cpus", "data_mib"}


def _setting(text: str) -> dict[str, Any]:
    """``KEY=VALUE`` as the TOML table it stands for."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise TransmigrateError(f"--set takes KEY=VALUE (e.g. vm.cpus=2), not {text!r}")
    try:
        return tomllib.loads(f"{key.strip()} = {value.strip()}")
    except tomllib.TOMLDecodeError:
        pass
    try:
        return tomllib.loads(f"{key.strip()} = {json.dumps(value.strip())}")
    except tomllib.TOMLDecodeError as exc:
        raise TransmigrateError(f"--set {text}: {key.strip()!r} is not a configuration key "
                                f"({exc})") from exc


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    """``update``'s values over ``into``'s, table by table."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _known(table: dict[str, Any], known: set[str], prefix: str, path: Path) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise TransmigrateError(f"config {path}: unknown key {prefix}{unknown[0]}; known: "
                                f"{', '.join(sorted(known))}")


def _table(data: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise TransmigrateError(f"config {path}: {key} must be a table")
    return value


def _count(table: dict[str, Any], key: str, default: int, path: Path,
           prefix: str = "vm.") -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TransmigrateError(f"config {path}: {prefix}{key} must be a positive whole "
                                "number")
    return value
