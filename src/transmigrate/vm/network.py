"""The private network: a network namespace that transmigrate owns, with two bridges.

QEMU runs inside the namespace, so each VM's TAP is created there and nothing
the guests send can leave it: there is no uplink and no route out. Clients for
tests and demos run in the same namespace. Guests use 198.18.0.0/15, the range
reserved for benchmarking: services in 198.18.0.0/16 on one bridge, and a
private migration link between the guests in 198.19.0.0/16 on the other.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

from transmigrate.errors import CommandError, NetworkError
from transmigrate.process import run

__all__ = [
    "BRIDGE",
    "MIGRATION_BRIDGE",
    "MIGRATION_NETWORK",
    "SERVICE_NETWORK",
    "Network",
    "ServiceIdentity",
    "guest_mac",
    "migration_address",
    "service_identity",
]

SERVICE_NETWORK = ipaddress.IPv4Network("198.18.0.0/16")
MIGRATION_NETWORK = ipaddress.IPv4Network("198.19.0.0/16")
BRIDGE = "tm-br0"
MIGRATION_BRIDGE = "tm-mig0"
_HOST_ADDRESS = SERVICE_NETWORK.network_address + 1


@dataclass(frozen=True)
class ServiceIdentity:
    """What clients know a service by: it moves with the service from VM to VM."""

    mac: str
    address: str  # with prefix, e.g. 198.18.0.10/16

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


def guest_mac(slot: int, nic: int) -> str:
    """A locally administered MAC for NIC ``nic`` of the VM in ``slot``."""
    return f"52:54:00:74:{nic:02x}:{slot:02x}"


def service_identity(slot: int) -> ServiceIdentity:
    """A fresh service identity for a VM first booted in ``slot`` (198.18.0.10 for slot 0)."""
    host = SERVICE_NETWORK.network_address + 10 + slot
    return ServiceIdentity(guest_mac(slot, 0), f"{host}/{SERVICE_NETWORK.prefixlen}")


def migration_address(slot: int) -> str:
    """The VM's address on the private migration link between guests."""
    return f"{MIGRATION_NETWORK.network_address + 10 + slot}/{MIGRATION_NETWORK.prefixlen}"


class Network:
    """The namespace ``name`` with its bridge; every method is idempotent."""

    def __init__(self, name: str = "transmigrate") -> None:
        self.name = name

    @property
    def host_address(self) -> ipaddress.IPv4Interface:
        """The bridge's own address, used by clients inside the namespace."""
        return ipaddress.IPv4Interface(f"{_HOST_ADDRESS}/{SERVICE_NETWORK.prefixlen}")

    def exists(self) -> bool:
        return Path("/run/netns", self.name).exists()

    def ensure(self) -> None:
        if self.exists():
            return
        try:
            run(["ip", "netns", "add", self.name])
            self._ip("link", "set", "lo", "up")
            self._ip("link", "add", BRIDGE, "type", "bridge")
            self._ip("addr", "add", str(self.host_address), "dev", BRIDGE)
            self._ip("link", "set", BRIDGE, "up")
            self._ip("link", "add", MIGRATION_BRIDGE, "type", "bridge")
            self._ip("link", "set", MIGRATION_BRIDGE, "up")
        except CommandError as exc:
            self.remove()
            raise NetworkError(f"cannot create network namespace {self.name}: {exc}") from exc

    def remove(self) -> None:
        if self.exists():
            run(["ip", "netns", "del", self.name])

    def prefix(self) -> list[str]:
        """The argv prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def attach(self, tap: str, bridge: str = BRIDGE) -> None:
        self._ip("link", "set", tap, "master", bridge, "up")

    def detach(self, tap: str) -> None:
        self._ip("link", "set", tap, "nomaster")

    def bridge_of(self, link: str) -> str | None:
        """The bridge ``link`` is on, or None."""
        out = self._ip("-o", "link", "show", link)
        words = out.split()
        return words[words.index("master") + 1] if "master" in words else None

    def delete_link(self, name: str) -> None:
        """Remove a link if it is still there (a TAP whose QEMU was killed may linger,
        or vanish while we look: the kernel deletes it once QEMU's descriptor closes)."""
        if name in self.links():
            try:
                self._ip("link", "del", name)
            except CommandError:
                if name in self.links():
                    raise

    def links(self) -> list[str]:
        if not self.exists():
            return []
        out = self._ip("-o", "link", "show")
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]

    def run(self, argv: list[str], *, capture: bool = False,
            timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run a client command in the namespace; its output is passed through or captured."""
        if not self.exists():
            raise NetworkError(f"network namespace {self.name} does not exist: start a VM first")
        return subprocess.run([*self.prefix(), *argv], capture_output=capture, timeout=timeout,
                              check=False)

    def _ip(self, *args: str) -> str:
        return run(["ip", "-n", self.name, *args])
