"""Real services in guests, and real clients for them in the private network."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transmigrate.config import Config, Service
from transmigrate.errors import TransmigrateError
from transmigrate.guest.agent import GuestAgent
from transmigrate.migrate.plan import GUEST_TOOLS
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.lifecycle import exec_in, running
from transmigrate.polling import wait_for
from transmigrate.progress import Progress, silent
from transmigrate.vm.image import ImageSpec
from transmigrate.vm.volume import DATA_MOUNT

__all__ = ["REDIS_PORT", "Booted", "LoadClient", "ServiceStatus", "declared_image",
           "oldest_process", "redis_answers", "redis_cli", "service_root", "service_status",
           "start_redis", "start_service", "stop_service", "up_declared"]

HOLDERS = f"{DATA_MOUNT}/.transmigrate/services"
"""Where tm-service keeps each held service's pid (and output), on the volume."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    vm: str
    running: bool
    root: int | None
    """The pid that `update` moves with its tree (the holder, for a service we started)."""
    pids: int
    """Processes in that tree."""
    own_ipc: bool
    own_mounts: bool
    """In a mount namespace of its own (with a private /tmp and /dev/shm)."""
    state: dict[str, bool]
    """Each state path, and whether it is bound from the volume."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Booted:
    """A VM brought up as the configuration declares it, with its services."""

    boot: lifecycle.BootReport
    services_started: dict[str, int]
    """Each service started at boot (``boot = true``), and the root ``update`` moves."""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self.boot.machine.record),
                "boot_seconds": round(self.boot.boot_seconds, 3),
                "services_started": self.services_started}


def declared_image(config: Config, packages: Sequence[str] = (),
                   files: Path | None = None) -> ImageSpec:
    """The guest image the configuration asks for, with more ``packages`` and other
    ``files`` if given."""
    return ImageSpec(extra_packages=tuple(sorted({*config.image_packages, *packages})),
                     files_dir=files.resolve() if files else config.image_files)


def up_declared(host: Host, config: Config, name: str, *, kernel: str | None = None,
                memory_mib: int | None = None, cpus: int | None = None,
                image: ImageSpec | None = None, progress: Progress = silent) -> Booted:
    """Boot VM ``name`` as the configuration declares it (``[vms.NAME]``, then ``[vm]``),
    what is given overriding it, and start its services that start at boot: what
    ``transmigrate up`` and the controller do."""
    declared = config.vm(name)
    kernel = kernel or declared.kernel
    if kernel is None:
        raise TransmigrateError(f"which kernel? give --kernel, or declare vms.{name}.kernel "
                                "in the configuration")
    boot = lifecycle.up(host, name, kernel, image_spec=image or declared_image(config),
                        memory_mib=memory_mib or declared.memory_mib,
                        cpus=cpus or declared.cpus, data_mib=declared.data_mib,
                        progress=progress)
    started = {}
    for service in config.services_of(name):
        if service.boot:
            progress(f"starting {service.name}")
            started[service.name] = start_service(host, service)
    return Booted(boot, started)


def _holder(agent: GuestAgent, service: Service) -> int | None:
    """The running tm-service of ``service``, from its pid file on the volume."""
    script = (f"p=$(cat {HOLDERS}/{service.name}.pid 2>/dev/null) && "
              f"tr '\\0' ' ' < /proc/$p/cmdline 2>/dev/null | "
              f"grep -q 'tm-service {service.name} ' && echo $p")
    found = agent.exec(["sh", "-c", script]).text.split()
    return int(found[0]) if found else None


def oldest_process(agent: GuestAgent, process: str) -> int | None:
    """The oldest process named ``process`` (its comm), or None."""
    found = agent.exec(["pgrep", "-o", "-x", process]).text.split()
    return int(found[0]) if found else None


def service_root(agent: GuestAgent, service: Service) -> int | None:
    """The root of the tree that is ``service``: its holder, if we started it; else the
    oldest process of its name; None if it does not run."""
    return _holder(agent, service) or oldest_process(agent, service.process)


def start_service(host: Host, service: Service, *, timeout: float = 120.0) -> int:
    """Start a declared service in its VM so that it can move: its state on the data
    volume, bound in place; its own session and the namespaces it declares (IPC; a mount
    namespace with a private /tmp and /dev/shm); held by tm-service.
    Return the root `update` moves. A service that runs already is left as it is."""
    agent = host.agent(running(host, service.vm))
    if service.state:
        agent.run([f"{GUEST_TOOLS}/tm-data", "state", *service.state],
                  what=f"keeping {service.name}'s state on the data volume")
    root = service_root(agent, service)
    if root is not None:
        return root
    if not service.start:
        raise TransmigrateError(f"service {service.name} has no start command and does "
                                f"not run in {service.vm}")
    mount = "mount" in service.namespaces
    unshare = [*(["--ipc"] if "ipc" in service.namespaces else []),
               *(["--mount", "--propagation", "private"] if mount else [])]
    argv = ["setsid", "-f", *(["unshare", *unshare] if unshare else []),
            f"{GUEST_TOOLS}/tm-service", service.name, *(["--private-tmp"] if mount else []),
            "--", *service.start]
    agent.sh(f"{shlex.join(argv)} < /dev/null > /dev/null 2>&1",
             what=f"starting {service.name}")
    holder = wait_for(lambda: _holder(agent, service), timeout=10, interval=0.1,
                      what=f"the holder of {service.name} did not start in {service.vm}")
    wait_for(lambda: _in_tree(agent, holder, service.process), timeout=timeout,
             interval=0.2, what=f"{service.process} did not start in {service.vm} (its "
                                f"output: {HOLDERS}/{service.name}.log there)")
    return holder


def _in_tree(agent: GuestAgent, root: int, process: str) -> bool:
    """Whether a process named ``process`` runs under ``root``."""
    processes = agent.processes()
    parents = {p.pid: p.ppid for p in processes}
    for candidate in processes:
        if candidate.comm != process:
            continue
        pid = candidate.pid
        while pid not in (root, 0, 1) and pid in parents:
            pid = parents[pid]
        if pid == root:
            return True
    return False


def stop_service(host: Host, service: Service, *, timeout: float = 60.0) -> bool:
    """Stop ``service`` (SIGTERM, then SIGKILL to its session after ``timeout``
    seconds); False if it did not run."""
    agent = host.agent(running(host, service.vm))
    root = service_root(agent, service)
    if root is None:
        return False
    agent.run(["kill", "-TERM", str(root)], what=f"stopping {service.name}")
    try:
        wait_for(lambda: agent.exec(["kill", "-0", str(root)]).exit_code != 0,
                 timeout=timeout, interval=0.2, what=f"{service.name} did not stop")
    except TransmigrateError:
        agent.exec(["pkill", "-KILL", "-s", str(root)])
    return True


def service_status(host: Host, services: Sequence[Service]) -> list[ServiceStatus]:
    """Whether each service runs, what would move, and where its state is."""
    statuses = []
    for service in services:
        agent = host.agent(running(host, service.vm))
        root = service_root(agent, service)
        mounts = agent.run(["cat", "/proc/self/mountinfo"]).text.splitlines()
        bound = {line.split()[4] for line in mounts if len(line.split()) > 4}
        pids, own = 0, set()
        if root is not None:
            found = agent.exec(["sh", "-c", "".join(
                f"[ \"$(readlink /proc/{root}/ns/{ns})\" = \"$(readlink /proc/1/ns/{ns})\" ] "
                f"|| echo own-{ns}; " for ns in ("ipc", "mnt"))
                + f"pgrep -c -s \"$(ps -o sid= -p {root} | tr -d ' ')\""]).text
            words = found.split()
            own = set(words)
            pids = int(words[-1]) if words and words[-1].isdigit() else 0
        statuses.append(ServiceStatus(service.name, service.vm, root is not None, root, pids,
                                      "own-ipc" in own, "own-mnt" in own,
                                      {path: path in bound for path in service.state}))
    return statuses

REDIS_PORT = 6379


def start_redis(host: Host, vm: str, *, timeout: float = 30.0) -> int:
    """Start redis-server in ``vm`` with its data on the data volume; return its pid.

    Everything redis writes (AOF, RDB, log) is on /data, so that it moves with it.
    """
    exec_in(host, vm, [
        "redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--daemonize", "yes",
        "--dir", DATA_MOUNT, "--appendonly", "yes", "--save", "",
        "--logfile", f"{DATA_MOUNT}/redis.log", "--pidfile", f"{DATA_MOUNT}/redis.pid",
        "--enable-debug-command", "local"]).check("starting redis-server", vm)
    wait_for(lambda: exec_in(host, vm, ["redis-cli", "PING"]).text.strip() == "PONG",
             timeout=timeout, interval=0.2, what=f"redis in {vm} did not answer")
    return int(exec_in(host, vm, ["cat", f"{DATA_MOUNT}/redis.pid"]).text)


def redis_cli(host: Host, address: str, *args: str, timeout: float = 30.0) -> str:
    """Run redis-cli against ``address`` from inside the private network."""
    done = host.network.run(["redis-cli", "-h", address, "-p", str(REDIS_PORT), *args],
                            capture=True, timeout=timeout)
    if done.returncode != 0:
        raise TransmigrateError(f"redis-cli {' '.join(args)} failed: "
                                f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode(errors="replace").strip()


def redis_answers(host: Host, address: str, timeout: float = 5.0) -> bool:
    """Whether redis at ``address`` answers PING now (False while it is not up)."""
    try:
        return redis_cli(host, address, "PING", timeout=timeout) == "PONG"
    except (TransmigrateError, subprocess.TimeoutExpired):
        return False


class LoadClient:
    """Our redis client (orchestrate.loadgen) running in the private network."""

    def __init__(self, host: Host, address: str, seconds: float = 600.0, *,
                 reconnect: bool = False) -> None:
        self.process = subprocess.Popen(
            [*host.network.prefix(), sys.executable, "-m", "transmigrate.orchestrate.loadgen",
             address, "--seconds", str(seconds), *(["--reconnect"] if reconnect else [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.process.stderr is not None
        started = self.process.stderr.readline().decode()
        if "running" not in started:
            self.process.kill()
            raise TransmigrateError(f"the load client did not start: {started.strip()}")

    def stop(self) -> dict[str, Any]:
        """Stop it (by its pid) and return its summary."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=60)
        summary: dict[str, Any] = json.loads(out.decode())
        return summary
