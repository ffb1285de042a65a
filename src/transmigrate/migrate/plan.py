"""What one live migration shares between its steps: the two sides, the trees, the report.

Several process trees move together. CRIU dumps one tree per run, so each tree
has its own images root, hold directory, pid file and ports in the guests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, field

from transmigrate.guest.agent import GuestAgent
from transmigrate.migrate.criu import (
    IMAGES_ROOT,
    LAZY_PAGES_PORT,
    PAGE_SERVER_PORT,
    DumpStats,
    Images,
    RestoreStats,
)
from transmigrate.migrate.precopy import CopyMode, PreCopyPolicy
from transmigrate.vm.machine import MachineRecord
from transmigrate.vm.network import Network

__all__ = ["GUEST_TOOLS", "HOLD_DIR", "MigrationReport", "Plan", "Side", "Tree", "TreeReport",
           "criu_error"]

GUEST_TOOLS = "/usr/lib/transmigrate"
HOLD_DIR = "/run/transmigrate-hold"
RESTORED_PIDFILE = "/run/transmigrate-restored.pid"
LAZY_STATUS = "/run/transmigrate-lazy-pages"
HOLD_BASE = 120.0
HOLD_PER_TREE = 10.0


@dataclass(frozen=True)
class Side:
    """One end of a migration: a VM and its agent."""

    record: MachineRecord
    agent: GuestAgent

    def tool(self, *args: str, what: str, timeout: float = 120.0) -> str:
        """Run ``tm-migrate ARGS`` (see guest/files); its output, or GuestCommandFailed."""
        return self.agent.run([f"{GUEST_TOOLS}/tm-migrate", *args], what=what,
                              timeout=timeout).text


def criu_error(side: Side, log: str) -> str:
    """CRIU's first error in ``log`` on ``side`` (its last line only says that it failed)."""
    return side.agent.exec([f"{GUEST_TOOLS}/tm-migrate", "criu-error", log]).text.strip()


@dataclass
class TreeReport:
    """One moved tree, with CRIU's own figures under CRIU's names."""

    pid: int
    """The tree's root in the source."""
    restored_pid: int | None = None
    """Its root in the target's pid namespace (differs only for a tree in its own pid
    namespace, whose outer pid is new)."""
    precopy: list[DumpStats] = field(default_factory=list)
    dump: DumpStats | None = None
    restore: RestoreStats | None = None


@dataclass
class MigrationReport:
    """What happened."""

    trees: list[TreeReport] = field(default_factory=list)
    steps: dict[str, float] = field(default_factory=dict)
    frozen_seconds: float = 0.0
    """From the first final dump's start to the target's NIC on the service bridge."""
    copy: str = ""
    """How memory went: a :attr:`CopyMode.label`."""
    carried: list[str] = field(default_factory=list)
    """Files outside the data volume copied to the target inside the freeze."""
    warnings: list[str] = field(default_factory=list)


@dataclass
class Tree:
    """One process tree on the move: where its images, holds and daemons live."""

    index: int
    report: TreeReport
    pids: list[int] = field(default_factory=list)
    """Every pid of the tree in the source, from the precheck."""
    shared_mounts: list[str] | None = None
    """In a mount namespace of its own: the mount points it shares with the VM, from the
    precheck; CRIU dumps the rest of its mounts (its private tmpfs) with it."""
    final_iteration: int = 1
    dump_pid: int | None = None
    lazy_released: bool = False
    """Post-copy: its held dump was told to go on and serve the memory."""

    @property
    def pid(self) -> int:
        return self.report.pid

    @property
    def images(self) -> Images:
        return Images(f"{IMAGES_ROOT}/{self.index}", PAGE_SERVER_PORT + self.index,
                      LAZY_PAGES_PORT + self.index,
                      None if self.shared_mounts is None else tuple(self.shared_mounts))

    @property
    def hold_dir(self) -> str:
        return f"{HOLD_DIR}/{self.index}"

    @property
    def restored_pidfile(self) -> str:
        return f"{RESTORED_PIDFILE}.{self.index}"

    @property
    def lazy_status(self) -> str:
        """On the target: the lazy-pages daemon's pid (``.pid``) and exit code (``.rc``)."""
        return f"{LAZY_STATUS}.{self.index}"


@dataclass
class Plan:
    """Everything the steps share."""

    source: Side
    target: Side
    network: Network
    pids: InitVar[Sequence[int]]
    """The roots of the trees to move: they become ``trees``."""
    fence_target: Callable[[], None]
    """Stop the target VM for good: the last resort when it may still hold the volume."""
    copy: CopyMode = CopyMode.AUTO
    """The operator's choice; the precheck narrows it, pre-copy settles AUTO."""
    policy: PreCopyPolicy = field(default_factory=PreCopyPolicy)
    service_check: Callable[[], None] | None = None
    strict: bool = False
    """Refuse, rather than warn about, changes to the source's root file system."""
    report: MigrationReport = field(default_factory=MigrationReport)
    trees: list[Tree] = field(init=False)
    frozen_at: float = 0.0

    @property
    def hold_seconds(self) -> float:
        """How long each held dump waits for the host's word before it gives up and
        resumes its tree: from freeze to commit, which takes longer with more trees."""
        return HOLD_BASE + HOLD_PER_TREE * len(self.trees)

    def hold_left(self) -> float:
        """Seconds until the first hold could give up (counted from the freeze, which
        is earlier than any hold's start)."""
        return self.frozen_at + self.hold_seconds - time.monotonic()

    def __post_init__(self, pids: Sequence[int]) -> None:
        assert pids and len(set(pids)) == len(pids), pids
        self.trees = [Tree(index, TreeReport(pid)) for index, pid in enumerate(pids)]
        self.report.trees = [tree.report for tree in self.trees]
