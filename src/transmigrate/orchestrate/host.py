"""The host: where the cache, the run state and the network are, wired together once."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from transmigrate import paths
from transmigrate.guest.agent import GuestAgent
from transmigrate.vm.accel import Accelerator, detect_accelerator, record_accelerator
from transmigrate.vm.archive import DebianArchive
from transmigrate.vm.image import GuestImage, ImageSpec
from transmigrate.vm.kernels import KernelCatalog
from transmigrate.vm.machine import Machine, MachineRegistry
from transmigrate.vm.network import Network

__all__ = ["Host"]


@dataclass(frozen=True)
class Host:
    cache: Path
    state: Path
    shm: Path
    data: Path
    network_name: str

    @classmethod
    def from_environment(cls) -> Host:
        return cls(paths.cache_dir(), paths.state_dir(), paths.shm_dir(), paths.data_dir(),
                   paths.network_name())

    def volume(self, service: str) -> Path:
        """The data volume of the service that VM ``service`` runs."""
        return self.data / "volumes" / f"{self.network_name}-{service}.img"

    @cached_property
    def archive(self) -> DebianArchive:
        return DebianArchive(self.cache / "apt")

    @cached_property
    def catalog(self) -> KernelCatalog:
        return KernelCatalog(self.archive, self.cache / "kernels")

    @cached_property
    def network(self) -> Network:
        return Network(self.network_name)

    @cached_property
    def machines(self) -> MachineRegistry:
        return MachineRegistry(self.state, self.network, self.shm)

    def accelerator(self) -> Accelerator:
        return detect_accelerator(self.cache)

    def record_accelerator(self, accel: Accelerator, why: str) -> None:
        """Make ``accel`` this host's answer until it reboots (a guest showed the probe's
        answer wrong)."""
        record_accelerator(self.cache, accel, why)

    def image(self, spec: ImageSpec) -> GuestImage:
        return GuestImage(spec, self.cache / "images")

    @staticmethod
    def agent(machine: Machine) -> GuestAgent:
        return GuestAgent(machine.agent_socket, machine.agent_lock, machine.name)
