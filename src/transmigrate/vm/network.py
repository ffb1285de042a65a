"""The private network: a network namespace that transmigrate owns, with one bridge.

QEMU runs inside the namespace, so each VM's TAP is created there and nothing
the guests send can leave it: there is no uplink and no route out. Clients for
tests and demos run in the same namespace. Guests use 198.18.0.0/15, the range
reserved for benchmarking.
"""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

from transmigrate.errors import CommandError, NetworkError
from transmigrate.process import run

__all__ = ["BRIDGE", "NETWORK", "Network", "guest_address", "guest_mac"]

NETWORK = ipaddress.IPv4Network("198.18.0.0/15")
BRIDGE = "tm-br0"
_HOST_ADDRESS = NETWORK.network_address + 1


def guest_address(slot: int) -> ipaddress.IPv4Interface:
    """The service address of the VM in ``slot`` (198.18.0.10 for slot 0)."""
    return ipaddress.IPv4Interface(f"{NETWORK.network_address + 10 + slot}/{NETWORK.prefixlen}")


def guest_mac(slot: int, nic: int = 0) -> str:
    """A locally administered MAC for NIC ``nic`` of the VM in ``slot``."""
    return f"52:54:00:74:{nic:02x}:{slot:02x}"


class Network:
    """The namespace ``name`` with its bridge; every method is idempotent."""

    def __init__(self, name: str = "transmigrate") -> None:
        self.name = name

    @property
    def host_address(self) -> ipaddress.IPv4Interface:
        """The bridge's own address, used by clients inside the namespace."""
        return ipaddress.IPv4Interface(f"{_HOST_ADDRESS}/{NETWORK.prefixlen}")

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
        except CommandError as exc:
            self.remove()
            raise NetworkError(f"cannot create network namespace {self.name}: {exc}") from exc

    def remove(self) -> None:
        if self.exists():
            run(["ip", "netns", "del", self.name])

    def prefix(self) -> list[str]:
        """The argv prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def attach(self, tap: str) -> None:
        self._ip("link", "set", tap, "master", BRIDGE, "up")

    def detach(self, tap: str) -> None:
        self._ip("link", "set", tap, "nomaster")

    def delete_link(self, name: str) -> None:
        """Remove a link if it is still there (a TAP whose QEMU was killed may linger)."""
        if name in self.links():
            self._ip("link", "del", name)

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
