"""What is known about one VM, written to its state directory as ``machine.json``."""

from __future__ import annotations

from dataclasses import dataclass

from transmigrate.vm.network import ServiceIdentity

__all__ = ["MachineRecord"]


@dataclass(frozen=True)
class MachineRecord:
    """What is written to ``machine.json``: enough to find and reach the VM again."""

    id: str
    name: str
    slot: int
    kernel: str
    kernel_dir: str
    image: str
    memory_mib: int
    cpus: int
    accel: str
    service_mac: str
    service_address: str
    service_tap: str
    migration_mac: str
    migration_address: str
    migration_tap: str
    data_volume: str
    ram_path: str
    started_at: float
    data_overlay: str = ""
    """"": the VM writes ``data_volume`` itself. "standby": its writes go to an
    overlay that is thrown away with it. "current": it has taken the service over,
    and the overlay holds the service's newest data until merged into the volume."""
    import_disk: str = ""
    """A read-only disk attached at boot (serial ``tm-import``): what the host hands the
    guest in bulk, such as the images a recovery restores."""

    @property
    def identity(self) -> ServiceIdentity:
        return ServiceIdentity(self.service_mac, self.service_address)

    @property
    def ip(self) -> str:
        return self.identity.ip

    @property
    def migration_ip(self) -> str:
        return self.migration_address.split("/")[0]
