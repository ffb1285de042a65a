"""The steps of one live migration, each with ``run()`` and ``undo()``.

A migration is a list of steps run in order. If one fails, the steps already
run, and the failed one, are undone in reverse, which leaves the service
running on the source exactly as it was: the final dump holds the source's
tasks frozen (see ``criu-hold``) until the target runs them, and only the last
step, Commit, lets the source's copy go. Several process trees move together:
CRIU dumps one tree per run, so each step handles every tree, and all of them
are frozen before any is handed over.

With post-copy the target runs the service before it has all its memory: the
rest is fetched from the source's frozen tasks. CRIU 3.17 serves that memory
only after its post-dump hook has said "go", and from then on it cannot resume
the tasks' TCP sockets itself: so the target is made ready (volume, images,
lazy-pages daemon) before "go", and a failure after it still rolls back to the
source's intact tasks and data, but their TCP connections are lost, and what the
target did after the switch is not undone.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import InitVar, dataclass, field
from typing import Protocol

from transmigrate.errors import TransmigrateError
from transmigrate.guest.agent import ExecResult, GuestAgent
from transmigrate.migrate.criu import (
    IMAGES_ROOT,
    LAZY_PAGES_PORT,
    PAGE_SERVER_PORT,
    DumpStats,
    Images,
    RestoreStats,
    parse_stats,
)
from transmigrate.migrate.precopy import PreCopyPolicy
from transmigrate.progress import Progress, silent
from transmigrate.vm.machine import MachineRecord
from transmigrate.vm.network import Network
from transmigrate.vm.volume import DATA_MOUNT

__all__ = [
    "MigrationFailed",
    "MigrationReport",
    "Plan",
    "Side",
    "Step",
    "Tree",
    "TreeReport",
    "migration_steps",
    "run_steps",
]

GUEST_TOOLS = "/usr/lib/transmigrate"
HOLD_DIR = "/run/transmigrate-hold"
RESTORED_PIDFILE = "/run/transmigrate-restored.pid"
LAZY_STATUS = "/run/transmigrate-lazy-pages"
COMMIT_WAIT = 10.0
LAZY_TRANSFER_WAIT = 900.0


class MigrationFailed(TransmigrateError):
    """A migration failed and was rolled back; the service runs where it was."""


class PrecheckFailed(TransmigrateError):
    """What is to be moved cannot be moved; nothing was touched."""


@dataclass(frozen=True)
class Side:
    """One end of a migration: a VM and its agent."""

    record: MachineRecord
    agent: GuestAgent

    def run(self, argv: Sequence[str], *, timeout: float = 120.0, what: str = "") -> ExecResult:
        """Run in the guest; a non-zero exit is an error that names the VM and the command."""
        return self.agent.exec(argv, timeout=timeout).check(what or argv[0], self.record.name)

    def sh(self, script: str, *, timeout: float = 120.0, what: str = "") -> ExecResult:
        return self.run(["sh", "-c", script], timeout=timeout, what=what or script.split()[0])


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
    """How memory went: "pre-copy", "post-copy" or "stop-and-copy"."""
    warnings: list[str] = field(default_factory=list)


@dataclass
class Tree:
    """One process tree on the move: where its images, holds and daemons live.

    Trees are numbered: each has its own images root, hold directory, pid file
    and ports in the guests, so several move in one update.
    """

    index: int
    report: TreeReport
    pids: list[int] = field(default_factory=list)
    """Every pid of the tree in the source, from the precheck."""
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
                      LAZY_PAGES_PORT + self.index)

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
    policy: PreCopyPolicy | None = field(default_factory=PreCopyPolicy)
    """None: no pre-copy."""
    postcopy: str = "auto"
    """"yes", "no", or "auto": when pre-copy does not converge (and the target can)."""
    service_check: Callable[[], None] | None = None
    report: MigrationReport = field(default_factory=MigrationReport)
    trees: list[Tree] = field(init=False)
    frozen_at: float = 0.0

    def __post_init__(self, pids: Sequence[int]) -> None:
        assert pids and len(set(pids)) == len(pids), pids
        self.trees = [Tree(index, TreeReport(pid)) for index, pid in enumerate(pids)]
        self.report.trees = [tree.report for tree in self.trees]


class Step(Protocol):
    name: str

    def run(self, plan: Plan) -> None: ...

    def undo(self, plan: Plan) -> None: ...


def _criu_error(side: Side, log: str) -> str:
    """CRIU's first error in ``log`` (its last line only says that it failed)."""
    found = side.agent.exec(["sh", "-c", f"grep -m1 'Error' {log} || tail -n1 {log}"]).text
    return found.strip()


def _read_stats(side: Side, directory: str, name: str) -> DumpStats | RestoreStats:
    data = side.run(["cat", f"{directory}/{name}"], what=f"reading {name}").stdout
    return parse_stats(data)


class Precheck:
    """Refuse, before anything is frozen, what CRIU could not move or the target lacks."""

    name = "precheck"

    def run(self, plan: Plan) -> None:
        source, target = plan.source, plan.target
        with ThreadPoolExecutor(max_workers=2) as pool:
            # 'criu check' also warms CRIU's cache of kernel features on each side.
            target_check = pool.submit(target.run, ["criu", "check"], what="criu check")
            source.run(["criu", "check"], what="criu check")
            found = [source.run([f"{GUEST_TOOLS}/tm-resources", str(tree.pid)],
                                what="listing the process's resources").text
                     for tree in plan.trees]
            target_check.result()
        problems: list[str] = []
        local: dict[str, int] = {}
        for tree, text in zip(plan.trees, found, strict=True):
            resources = json.loads(text)
            if "error" in resources:
                raise PrecheckFailed(f"{resources['error']} in {source.record.name}")
            tree.pids = list(resources["pids"])
            problems += resources["problems"]
            local |= {p: s for p, s in resources["files"].items()
                      if not p.startswith(DATA_MOUNT + "/")}
        counted = Counter(pid for tree in plan.trees for pid in set(tree.pids))
        shared = sorted(pid for pid, trees in counted.items() if trees > 1)
        if shared:
            problems.append(f"pids {shared} belong to more than one of the trees")
        if local:
            script = "for f in " + " ".join(shlex.quote(p) for p in local) + \
                '; do echo "$(stat -c %s "$f" 2>/dev/null || echo -)|$f"; done'
            for line in target.sh(script, what="checking files on the target").text.splitlines():
                size, _, path = line.partition("|")
                if size != str(local.get(path)):
                    problems.append(f"{path} exists only in {source.record.name}: "
                                    f"put it on the data volume ({DATA_MOUNT})")
        in_use = {int(p) for p in target.run(["ps", "-e", "-o", "pid="]).text.split()}
        clashes = sorted({pid for tree in plan.trees for pid in tree.pids} & in_use)
        if clashes:
            problems.append(f"pids {clashes} are taken in {target.record.name}")
        if problems:
            raise PrecheckFailed("cannot move: " + "; ".join(problems))
        tracking = source.agent.exec(["criu", "check", "--feature", "mem_dirty_track"])
        if tracking.exit_code != 0:
            plan.policy = None
        if plan.postcopy != "no":
            lazy = target.agent.exec(["criu", "check", "--feature", "uffd-noncoop"])
            if lazy.exit_code != 0 and plan.postcopy == "yes":
                raise PrecheckFailed(f"{target.record.name} cannot restore lazily (post-copy): "
                                     "its kernel lacks userfaultfd's non-cooperative events")
            if lazy.exit_code != 0:
                plan.postcopy = "no"
        for side in (source, target):
            side.sh(f"rm -rf {IMAGES_ROOT} {HOLD_DIR} && mkdir -p {IMAGES_ROOT} {HOLD_DIR}")

    def undo(self, plan: Plan) -> None:
        """Nothing to undo: the precheck only looks."""


class PreCopy:
    """Copy memory to the target while the service runs, until the dirty set is small."""

    name = "pre-copy"

    def __init__(self, progress: Progress = silent) -> None:
        self.progress = progress

    def run(self, plan: Plan) -> None:
        if plan.policy is None:
            return
        for tree in plan.trees:
            written = self._iterate(plan, plan.policy, tree)
            if plan.postcopy == "auto" and plan.policy.should_postcopy(written):
                self.progress(f"pre-copy of {tree.pid} did not converge ({written[-1]} pages "
                              "dirty): post-copy")
                plan.postcopy = "yes"

    def _iterate(self, plan: Plan, policy: PreCopyPolicy, tree: Tree) -> list[int]:
        """P.Haul's loop for one tree; the pages each pre-dump wrote."""
        source, target, images = plan.source, plan.target, tree.images
        written: list[int] = []
        n = 1
        while policy.should_continue(written):
            directory = images.dir(n)
            target.sh(f"mkdir -p {directory} && " +
                      shlex.join(images.page_server(n, target.record.migration_ip)),
                      what="criu page-server")
            source.run(["mkdir", "-p", directory])
            predump = source.agent.exec(
                images.pre_dump(n, tree.pid, target.record.migration_ip), timeout=300)
            if predump.exit_code != 0:
                error = _criu_error(source, f"{directory}/pre-dump.log") or "no log"
                raise TransmigrateError(f"criu pre-dump failed in {source.record.name}: "
                                        f"{error}")
            stats = _read_stats(source, directory, "stats-dump")
            assert isinstance(stats, DumpStats)
            tree.report.precopy.append(stats)
            written.append(stats.pages_written)
            self.progress(f"pre-copy {n} of {tree.pid}: {stats.pages_written} pages written, "
                          f"{stats.pages_skipped_parent} unchanged")
            n += 1
        tree.final_iteration = n
        return written

    def undo(self, plan: Plan) -> None:
        """Pre-dumps leave the service running; their images are removed at the end."""


class FinalDump:
    """Freeze the trees and dump them one by one, each held frozen at post-dump."""

    name = "final dump"

    def run(self, plan: Plan) -> None:
        postcopy = plan.postcopy == "yes"
        plan.report.copy = "post-copy" if postcopy else \
            "stop-and-copy" if plan.policy is None else "pre-copy"
        source, target = plan.source, plan.target
        if not postcopy:  # every tree's page server at once: each has its own port
            target.sh(" && ".join(
                f"mkdir -p {t.images.dir(t.final_iteration)} && "
                + shlex.join(t.images.page_server(t.final_iteration, target.record.migration_ip))
                for t in plan.trees), what="criu page-server")
        # Flush the data volume now, so that freezing it later has little left to write.
        source.sh(" && ".join(f"mkdir -p {t.images.dir(t.final_iteration)} {t.hold_dir}"
                              for t in plan.trees)
                  + f" && if mountpoint -q {DATA_MOUNT}; then sync -f {DATA_MOUNT}; fi")
        plan.frozen_at = time.monotonic()
        for tree in plan.trees:
            self._dump(plan, tree, postcopy)

    @staticmethod
    def _dump(plan: Plan, tree: Tree, postcopy: bool) -> None:
        source, target, images, n = plan.source, plan.target, tree.images, tree.final_iteration
        if postcopy:
            argv = images.lazy_dump(n, tree.pid, source.record.migration_ip)
        else:
            argv = images.dump(n, tree.pid, target.record.migration_ip)
            if plan.policy is None:
                argv = [a for a in argv if a != "--track-mem"]
        tree.dump_pid = source.agent.spawn(argv, env=[
            f"TM_HOLD={tree.hold_dir}", "TM_HOLD_TIMEOUT=120",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
        waited = source.agent.exec(["sh", "-c", (
            f"until [ -e {tree.hold_dir}/dumped ]; do "
            f"kill -0 {tree.dump_pid} 2>/dev/null || exit 3; sleep 0.005; done")],
            timeout=300)
        if waited.exit_code != 0:
            error = _criu_error(source, f"{images.dir(n)}/dump.log") or "no log"
            raise TransmigrateError(f"criu dump of {tree.pid} failed in {source.record.name}: "
                                    f"{error}")

    def undo(self, plan: Plan) -> None:
        """Tell each held dump to abort: CRIU resumes the tasks and unlocks the network.

        A post-copy dump serves its memory even then, so its page server is ended
        by connections that ask for nothing. One that was already told to go on
        leaves the tasks stopped, network locked and sockets in repair: the lock is
        lifted and the tasks continued here, without their TCP connections."""
        for tree in plan.trees:
            if tree.dump_pid is not None:
                self._abort(plan, tree)

    @staticmethod
    def _abort(plan: Plan, tree: Tree) -> None:
        source = plan.source
        assert tree.dump_pid is not None
        source.sh(f"touch {tree.hold_dir}/abort")
        if plan.postcopy == "yes":
            address = source.record.migration_ip
            source.agent.exec(["python3", "-c", (
                "import os, socket, time\n"
                f"while os.path.exists('/proc/{tree.dump_pid}'):\n"
                f"    try: socket.create_connection(({address!r}, "
                f"{tree.images.lazy_pages_port}), 1).close()\n"
                "    except OSError: pass\n"
                "    time.sleep(0.1)")], timeout=60)
        with contextlib.suppress(TransmigrateError):
            _wait_exit(source.agent, tree.dump_pid, timeout=60)
        tree.dump_pid = None
        if tree.lazy_released:
            source.sh(f"nft delete table inet CRIU-{tree.pid} 2>/dev/null; "
                      f"kill -CONT {' '.join(map(str, tree.pids))}",
                      what="continuing the stopped tasks")


def _wait_exit(agent: GuestAgent, pid: int, timeout: float) -> ExecResult:
    deadline = time.monotonic() + timeout
    while (result := agent.poll(pid)) is None:
        if time.monotonic() > deadline:
            raise TransmigrateError(f"guest process {pid} did not exit within {timeout:.0f} s")
        time.sleep(0.01)
    return result


class HandOver:
    """Hand the dumps to the target: freeze the data volume, copy the non-page images.

    One command on each side keeps it short. The source's freeze flushes the
    volume; pages already went by the page server. The target mounts the
    volume only when it restores, and writes to an overlay until it has taken
    over, so no failure leaves the volume written by both.
    """

    name = "handover"

    def run(self, plan: Plan) -> None:
        # With post-copy, the memory CRIU cannot fetch lazily is in local page images.
        pages = "" if plan.postcopy == "yes" else \
            "--exclude='pages-*.img' --exclude='pagemap-*.img' "
        directories = " ".join(f"{t.index}/{t.final_iteration}" for t in plan.trees)
        archive = plan.source.sh(
            f"if mountpoint -q {DATA_MOUNT}; then {GUEST_TOOLS}/tm-data freeze || exit 1; fi; "
            f"tar -C {IMAGES_ROOT} -c {pages}--exclude='*.log' --exclude=parent {directories}",
            what="freezing data and packing images").stdout
        plan.target.agent.exec(["tar", "-C", IMAGES_ROOT, "-x"], input=archive).check(
            "unpacking images", plan.target.record.name)

    def undo(self, plan: Plan) -> None:
        """Thaw the source's volume (Restore's undo has made sure the target let go)."""
        plan.source.run([f"{GUEST_TOOLS}/tm-data", "thaw"], what="thawing the data volume")


class DetachSource:
    """Take the source's service NIC off the bridge: from now on no packet reaches it."""

    name = "network handover"

    def run(self, plan: Plan) -> None:
        plan.network.detach(plan.source.record.service_tap)

    def undo(self, plan: Plan) -> None:
        plan.network.attach(plan.source.record.service_tap)


class Restore:
    """Mount the data volume on the target and recreate the processes by system calls."""

    name = "restore"

    def run(self, plan: Plan) -> None:
        lazy = plan.postcopy == "yes"
        for tree in plan.trees:
            # The first command on the target mounts the volume: one round trip less.
            mount = f"{GUEST_TOOLS}/tm-data mount && " if tree is plan.trees[0] else ""
            self._restore(plan, tree, lazy, mount)

    def _restore(self, plan: Plan, tree: Tree, lazy: bool, mount: str) -> None:
        n, images = tree.final_iteration, tree.images
        if lazy:
            self._prepare_lazy(plan, tree, mount)
            mount = ""
        restore = shlex.join(images.restore(n, tree.restored_pidfile, lazy=lazy))
        result = plan.target.agent.exec(
            ["sh", "-c", f"{mount}{restore} && cat {tree.restored_pidfile}"], timeout=300)
        if result.exit_code != 0:
            stderr = result.stderr.decode(errors="replace").strip().splitlines()
            error = _criu_error(plan.target, f"{images.dir(n)}/restore.log") or \
                (stderr[-1] if stderr else f"exit {result.exit_code}")
            if lazy:
                daemon_error = _criu_error(plan.target, f"{images.dir(n)}/lazy-pages.log")
                error += f" (criu lazy-pages: {daemon_error or 'no log'})"
            raise TransmigrateError(f"restore of {tree.pid} failed in "
                                    f"{plan.target.record.name}: {error}")
        tree.report.restored_pid = int(result.text.split()[-1])

    @staticmethod
    def _prepare_lazy(plan: Plan, tree: Tree, mount: str) -> None:
        """Make the target ready, then let the source's dump serve the memory.

        The lazy-pages daemon must listen on its socket in the images directory
        before the restore connects; it outlives this command and records how it
        ended. It connects to the source only once the restore has connected."""
        n, status = tree.final_iteration, tree.lazy_status
        fetch = shlex.join(tree.images.lazy_pages(n, plan.source.record.migration_ip))
        daemon = shlex.quote(f"{fetch}; echo $? > {status}.rc")
        plan.target.sh(
            f"{mount}rm -f {status}.rc && "
            f"{{ setsid sh -c {daemon} </dev/null >/dev/null 2>&1 & echo $! > {status}.pid; }} && "
            f"until [ -S {tree.images.dir(n)}/lazy-pages.socket ]; do "
            f"[ -e {status}.rc ] && exit 4; sleep 0.005; done",
            what="starting criu lazy-pages")
        tree.lazy_released = True
        plan.source.sh(
            f"touch {tree.hold_dir}/go; "
            f"until ss -Hltn 'sport = :{tree.images.lazy_pages_port}' | grep -q .; do "
            f"kill -0 {tree.dump_pid} 2>/dev/null || exit 3; sleep 0.005; done",
            what="serving the memory")

    def undo(self, plan: Plan) -> None:
        """Kill what was restored and release the volume; if the target cannot confirm
        that, fence it, so that nothing of the service runs there alongside the source.
        (What it wrote to the volume is in its overlay, thrown away with it.)"""
        kills = "".join(
            f"if [ -s {t.lazy_status}.pid ]; then pkill -KILL -s $(cat {t.lazy_status}.pid); fi; "
            f"if [ -s {t.restored_pidfile} ]; then "
            f"pkill -KILL --session $(cat {t.restored_pidfile}); "
            f"kill -KILL $(cat {t.restored_pidfile}); fi; "
            f"kill -KILL {t.pid} 2>/dev/null; rm -f {t.restored_pidfile}; " for t in plan.trees)
        try:
            plan.target.run(["sh", "-c", f"{kills}sleep 0.2; {GUEST_TOOLS}/tm-data umount"],
                            what="releasing the target")
        except TransmigrateError:
            plan.fence_target()


class AttachTarget:
    """Put the target's service NIC, with the same MAC and address, on the bridge."""

    name = "attach target"

    def run(self, plan: Plan) -> None:
        plan.network.attach(plan.target.record.service_tap)
        plan.report.frozen_seconds = time.monotonic() - plan.frozen_at

    def undo(self, plan: Plan) -> None:
        plan.network.detach(plan.target.record.service_tap)


class Verify:
    """The service runs on the target: its processes are alive and, if given, it answers."""

    name = "verify"

    def run(self, plan: Plan) -> None:
        plan.target.run(["kill", "-0", *(str(t.report.restored_pid) for t in plan.trees)],
                        what="the restored processes")
        if plan.service_check is not None:
            plan.service_check()

    def undo(self, plan: Plan) -> None:
        """Verifying changes nothing."""


class PostCopyTransfer:
    """With post-copy: wait until the target has fetched all the memory of every tree.

    Until then the source's frozen tasks hold the only whole copy; if the
    transfer fails, the steps before are undone and the service resumes there.
    """

    name = "post-copy transfer"

    def run(self, plan: Plan) -> None:
        if plan.postcopy != "yes":
            return
        for tree in plan.trees:
            waited = plan.target.agent.exec(["sh", "-c", (
                f"until [ -e {tree.lazy_status}.rc ]; do sleep 0.05; done; "
                f"cat {tree.lazy_status}.rc")], timeout=LAZY_TRANSFER_WAIT)
            if waited.exit_code != 0 or waited.text.strip() != "0":
                log = f"{tree.images.dir(tree.final_iteration)}/lazy-pages.log"
                raise TransmigrateError(
                    f"the post-copy transfer of {tree.pid} to {plan.target.record.name} "
                    f"failed: {_criu_error(plan.target, log) or 'no log'}")

    def undo(self, plan: Plan) -> None:
        """Waiting changes nothing; the restore's undo stops the daemons."""


class Commit:
    """Let the held dumps finish: the source's copy of the service is killed there
    (with post-copy they were told to go on already, and leave the tasks stopped).

    This is the point of no return, so nothing here raises. The source's data
    volume stays frozen (the target has it now): a dying task that must write
    there, such as one releasing an unlinked file, blocks, and CRIU with it.
    Then the source VM is retired without waiting for CRIU's statistics.
    """

    name = "commit"

    def run(self, plan: Plan) -> None:
        for tree in plan.trees:
            assert tree.dump_pid is not None
            plan.source.agent.exec(["touch", f"{tree.hold_dir}/go"])
        for tree in plan.trees:
            self._finish(plan, tree)

    @staticmethod
    def _finish(plan: Plan, tree: Tree) -> None:
        assert tree.dump_pid is not None
        try:
            _wait_exit(plan.source.agent, tree.dump_pid, timeout=COMMIT_WAIT)
        except TransmigrateError as exc:
            plan.report.warnings.append(f"criu dump of {tree.pid} did not finish after "
                                        f"commit ({exc}); its statistics are missing")
            return
        finally:
            tree.dump_pid = None
        directory = tree.images.dir(tree.final_iteration)
        # CRIU 3.17 writes a lazy dump's statistics before it serves the memory, with
        # its timers still running and its page counters empty: not worth reporting.
        with contextlib.suppress(TransmigrateError):
            if plan.postcopy != "yes":
                dump = _read_stats(plan.source, directory, "stats-dump")
                tree.report.dump = dump if isinstance(dump, DumpStats) else None
        with contextlib.suppress(TransmigrateError):
            restore = _read_stats(plan.target, directory, "stats-restore")
            tree.report.restore = restore if isinstance(restore, RestoreStats) else None

    def undo(self, plan: Plan) -> None:
        """There is no way back once the source's copy is gone."""


def migration_steps(progress: Progress = silent) -> list[Step]:
    return [Precheck(), PreCopy(progress), FinalDump(), HandOver(), DetachSource(), Restore(),
            AttachTarget(), Verify(), PostCopyTransfer(), Commit()]


def run_steps(plan: Plan, steps: Sequence[Step], progress: Progress = silent) -> MigrationReport:
    """Run the steps; on failure undo them in reverse and raise MigrationFailed."""
    done: list[Step] = []
    for step in steps:
        progress(step.name)
        start = time.monotonic()
        try:
            step.run(plan)
        except BaseException as exc:
            if isinstance(exc, PrecheckFailed):
                raise
            failures = []
            for undone in reversed([*done, step]):
                try:
                    undone.undo(plan)
                except Exception as undo_exc:
                    failures.append(f"undo {undone.name}: {undo_exc}")
            where = plan.source.record.name
            extra = f" (and {'; '.join(failures)})" if failures else ""
            raise MigrationFailed(f"{step.name} failed: {exc}; rolled back, the service runs "
                                  f"on in {where}{extra}") from exc
        plan.report.steps[step.name] = round(time.monotonic() - start, 3)
        done.append(step)
    return plan.report
