"""The steps of one live migration, each with ``run()`` and ``undo()``.

A migration is a list of steps run in order. If one fails, the steps already
run, and the failed one, are undone in reverse, which leaves the service
running on the source exactly as it was: the final dump holds the source's
tasks frozen (see ``criu-hold``) until the target runs them, and only the last
step, Commit, lets the source's copy go.

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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from transmigrate.errors import TransmigrateError
from transmigrate.guest.agent import ExecResult, GuestAgent
from transmigrate.migrate.criu import (
    IMAGES_ROOT,
    LAZY_PAGES_PORT,
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
    "migration_steps",
    "run_steps",
]

GUEST_TOOLS = "/usr/lib/transmigrate"
HOLD_DIR = "/run/transmigrate-hold"
RESTORED_PIDFILE = "/run/transmigrate-restored.pid"
LAZY_STATUS = "/run/transmigrate-lazy-pages"
"""On the target: the lazy-pages daemon's pid (``.pid``) and exit code (``.rc``)."""
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
class MigrationReport:
    """What happened, with CRIU's own figures under CRIU's names."""

    steps: dict[str, float] = field(default_factory=dict)
    precopy: list[DumpStats] = field(default_factory=list)
    dump: DumpStats | None = None
    restore: RestoreStats | None = None
    frozen_seconds: float = 0.0
    """From the final dump's start to the target's NIC on the service bridge."""
    copy: str = ""
    """How memory went: "pre-copy", "post-copy" or "stop-and-copy"."""
    warnings: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """Everything the steps share."""

    source: Side
    target: Side
    network: Network
    pid: int
    fence_target: Callable[[], None]
    """Stop the target VM for good: the last resort when it may still hold the volume."""
    policy: PreCopyPolicy | None = field(default_factory=PreCopyPolicy)
    """None: no pre-copy."""
    postcopy: str = "auto"
    """"yes", "no", or "auto": when pre-copy does not converge (and the target can)."""
    service_check: Callable[[], None] | None = None
    images: Images = field(default_factory=lambda: Images(IMAGES_ROOT))
    report: MigrationReport = field(default_factory=MigrationReport)
    final_iteration: int = 1
    dump_pid: int | None = None
    restored_pid: int | None = None
    """The restored tree's root in the target's pid namespace (differs from ``pid`` only
    for a tree in its own pid namespace, whose outer pid is new)."""
    frozen_at: float = 0.0
    tree_pids: list[int] = field(default_factory=list)
    """Every pid of the tree in the source, from the precheck."""
    lazy_released: bool = False
    """Post-copy: the held dump was told to go on and serve the memory."""


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
            found = source.run([f"{GUEST_TOOLS}/tm-resources", str(plan.pid)],
                               what="listing the process's resources").text
            target_check.result()
        resources = json.loads(found)
        if "error" in resources:
            raise PrecheckFailed(f"{resources['error']} in {source.record.name}")
        plan.tree_pids = list(resources["pids"])
        problems: list[str] = list(resources["problems"])
        local = {p: s for p, s in resources["files"].items()
                 if not p.startswith(DATA_MOUNT + "/")}
        if local:
            script = "for f in " + " ".join(shlex.quote(p) for p in local) + \
                '; do echo "$(stat -c %s "$f" 2>/dev/null || echo -)|$f"; done'
            for line in target.sh(script, what="checking files on the target").text.splitlines():
                size, _, path = line.partition("|")
                if size != str(local.get(path)):
                    problems.append(f"{path} exists only in {source.record.name}: "
                                    f"put it on the data volume ({DATA_MOUNT})")
        in_use = {int(p) for p in target.run(["ps", "-e", "-o", "pid="]).text.split()}
        clashes = sorted(set(resources["pids"]) & in_use)
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
            side.run(["rm", "-rf", plan.images.root])
            side.run(["mkdir", "-p", plan.images.root])

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
        written: list[int] = []
        n = 1
        while plan.policy.should_continue(written):
            directory = plan.images.dir(n)
            plan.target.run(["mkdir", "-p", directory])
            plan.source.run(["mkdir", "-p", directory])
            plan.target.run(plan.images.page_server(n, plan.target.record.migration_ip),
                            what="criu page-server")
            predump = plan.source.agent.exec(
                plan.images.pre_dump(n, plan.pid, plan.target.record.migration_ip), timeout=300)
            if predump.exit_code != 0:
                error = _criu_error(plan.source, f"{directory}/pre-dump.log") or "no log"
                raise TransmigrateError(f"criu pre-dump failed in {plan.source.record.name}: "
                                        f"{error}")
            stats = _read_stats(plan.source, directory, "stats-dump")
            assert isinstance(stats, DumpStats)
            plan.report.precopy.append(stats)
            written.append(stats.pages_written)
            self.progress(f"pre-copy {n}: {stats.pages_written} pages written, "
                          f"{stats.pages_skipped_parent} unchanged")
            n += 1
        plan.final_iteration = n
        if plan.postcopy == "auto" and plan.policy.should_postcopy(written):
            self.progress(f"pre-copy did not converge ({written[-1]} pages dirty): post-copy")
            plan.postcopy = "yes"

    def undo(self, plan: Plan) -> None:
        """Pre-dumps leave the service running; their images are removed at the end."""


class FinalDump:
    """Freeze the service and dump it, holding its tasks frozen at post-dump."""

    name = "final dump"

    def run(self, plan: Plan) -> None:
        n = plan.final_iteration
        source, target = plan.source, plan.target
        postcopy = plan.postcopy == "yes"
        plan.report.copy = "post-copy" if postcopy else \
            "stop-and-copy" if plan.policy is None else "pre-copy"
        if postcopy:
            argv = plan.images.lazy_dump(n, plan.pid, source.record.migration_ip)
        else:
            target.sh(f"mkdir -p {plan.images.dir(n)} && " +
                      shlex.join(plan.images.page_server(n, target.record.migration_ip)),
                      what="criu page-server")
            argv = plan.images.dump(n, plan.pid, target.record.migration_ip)
            if plan.policy is None:
                argv = [a for a in argv if a != "--track-mem"]
        # Flush the data volume now, so that freezing it later has little left to write.
        source.sh(f"mkdir -p {plan.images.dir(n)} && rm -rf {HOLD_DIR} && mkdir -p {HOLD_DIR}"
                  f" && if mountpoint -q {DATA_MOUNT}; then sync -f {DATA_MOUNT}; fi")
        plan.frozen_at = time.monotonic()
        plan.dump_pid = source.agent.spawn(argv, env=[
            f"TM_HOLD={HOLD_DIR}", "TM_HOLD_TIMEOUT=120",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
        waited = source.agent.exec(["sh", "-c", (
            f"until [ -e {HOLD_DIR}/dumped ]; do "
            f"kill -0 {plan.dump_pid} 2>/dev/null || exit 3; sleep 0.005; done")],
            timeout=300)
        if waited.exit_code != 0:
            error = _criu_error(source, f"{plan.images.dir(n)}/dump.log") or "no log"
            raise TransmigrateError(f"criu dump failed in {source.record.name}: {error}")

    def undo(self, plan: Plan) -> None:
        """Tell the held dump to abort: CRIU resumes the tasks and unlocks the network.

        A post-copy dump serves its memory even then, so its page server is ended
        by connections that ask for nothing. One that was already told to go on
        leaves the tasks stopped, network locked and sockets in repair: the lock is
        lifted and the tasks continued here, without their TCP connections."""
        if plan.dump_pid is None:
            return
        source = plan.source
        source.sh(f"touch {HOLD_DIR}/abort")
        if plan.postcopy == "yes":
            address = source.record.migration_ip
            source.agent.exec(["python3", "-c", (
                "import os, socket, time\n"
                f"while os.path.exists('/proc/{plan.dump_pid}'):\n"
                f"    try: socket.create_connection(({address!r}, {LAZY_PAGES_PORT}), 1).close()\n"
                "    except OSError: pass\n"
                "    time.sleep(0.1)")], timeout=60)
        with contextlib.suppress(TransmigrateError):
            _wait_exit(source.agent, plan.dump_pid, timeout=60)
        plan.dump_pid = None
        if plan.lazy_released:
            source.sh(f"nft delete table inet CRIU-{plan.pid} 2>/dev/null; "
                      f"kill -CONT {' '.join(map(str, plan.tree_pids))}",
                      what="continuing the stopped tasks")


def _wait_exit(agent: GuestAgent, pid: int, timeout: float) -> ExecResult:
    deadline = time.monotonic() + timeout
    while (result := agent.poll(pid)) is None:
        if time.monotonic() > deadline:
            raise TransmigrateError(f"guest process {pid} did not exit within {timeout:.0f} s")
        time.sleep(0.01)
    return result


class HandOver:
    """Hand the dump to the target: freeze the data volume, copy the non-page images.

    One command on each side keeps it short. The source's freeze flushes the
    volume; pages already went by the page server. The target mounts the
    volume only when it restores, so a failure up to here never touched it there.
    """

    name = "handover"

    def run(self, plan: Plan) -> None:
        directory = plan.images.dir(plan.final_iteration)
        # With post-copy, the memory CRIU cannot fetch lazily is in local page images.
        pages = "" if plan.postcopy == "yes" else \
            "--exclude='pages-*.img' --exclude='pagemap-*.img' "
        archive = plan.source.sh(
            f"if mountpoint -q {DATA_MOUNT}; then {GUEST_TOOLS}/tm-data freeze || exit 1; fi; "
            f"tar -C {directory} -c {pages}--exclude='*.log' --exclude=parent .",
            what="freezing data and packing images").stdout
        plan.target.agent.exec(["sh", "-c", f"mkdir -p {directory} && tar -C {directory} -x"],
                               input=archive).check(
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
        n = plan.final_iteration
        lazy = plan.postcopy == "yes"
        restore = shlex.join(plan.images.restore(n, RESTORED_PIDFILE, lazy=lazy))
        if lazy:
            self._prepare_lazy(plan, n)
            script = f"{restore} && cat {RESTORED_PIDFILE}"
        else:
            script = f"{GUEST_TOOLS}/tm-data mount && {restore} && cat {RESTORED_PIDFILE}"
        result = plan.target.agent.exec(["sh", "-c", script], timeout=300)
        if result.exit_code != 0:
            stderr = result.stderr.decode(errors="replace").strip().splitlines()
            error = _criu_error(plan.target, f"{plan.images.dir(n)}/restore.log") or \
                (stderr[-1] if stderr else f"exit {result.exit_code}")
            if lazy:
                daemon_error = _criu_error(plan.target, f"{plan.images.dir(n)}/lazy-pages.log")
                error += f" (criu lazy-pages: {daemon_error or 'no log'})"
            raise TransmigrateError(f"restore failed in {plan.target.record.name}: {error}")
        plan.restored_pid = int(result.text.split()[-1])

    @staticmethod
    def _prepare_lazy(plan: Plan, n: int) -> None:
        """Make the target ready, then let the source's dump serve the memory.

        The lazy-pages daemon must listen on its socket in the images directory
        before the restore connects; it outlives this command and records how it
        ended. It connects to the source only once the restore has connected."""
        fetch = shlex.join(plan.images.lazy_pages(n, plan.source.record.migration_ip))
        plan.target.sh(
            f"{GUEST_TOOLS}/tm-data mount && rm -f {LAZY_STATUS}.rc && setsid sh -c "
            f"{shlex.quote(f'{fetch}; echo $? > {LAZY_STATUS}.rc')} "
            f"</dev/null >/dev/null 2>&1 & echo $! > {LAZY_STATUS}.pid; "
            f"until [ -S {plan.images.dir(n)}/lazy-pages.socket ]; do "
            f"[ -e {LAZY_STATUS}.rc ] && exit 4; sleep 0.005; done",
            what="starting criu lazy-pages")
        plan.lazy_released = True
        plan.source.sh(
            f"touch {HOLD_DIR}/go; until ss -Hltn 'sport = :{LAZY_PAGES_PORT}' | grep -q .; do "
            f"kill -0 {plan.dump_pid} 2>/dev/null || exit 3; sleep 0.005; done",
            what="serving the memory")

    def undo(self, plan: Plan) -> None:
        """Kill what was restored and release the volume; if the target cannot confirm
        that, fence it, so that the source never writes the volume alongside it."""
        try:
            plan.target.run(["sh", "-c", (
                f"if [ -s {LAZY_STATUS}.pid ]; then pkill -KILL -s $(cat {LAZY_STATUS}.pid); fi; "
                f"if [ -s {RESTORED_PIDFILE} ]; then "
                f"pkill -KILL --session $(cat {RESTORED_PIDFILE}); "
                f"kill -KILL $(cat {RESTORED_PIDFILE}); fi; "
                f"kill -KILL {plan.pid} 2>/dev/null; rm -f {RESTORED_PIDFILE}; "
                f"sleep 0.2; {GUEST_TOOLS}/tm-data umount")], what="releasing the target")
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
    """The service runs on the target: its process is alive and, if given, it answers."""

    name = "verify"

    def run(self, plan: Plan) -> None:
        plan.target.run(["kill", "-0", str(plan.restored_pid)], what="the restored process")
        if plan.service_check is not None:
            plan.service_check()

    def undo(self, plan: Plan) -> None:
        """Verifying changes nothing."""


class PostCopyTransfer:
    """With post-copy: wait until the target has fetched all the memory the service had.

    Until then the source's frozen tasks hold the only whole copy; if the
    transfer fails, the steps before are undone and the service resumes there.
    """

    name = "post-copy transfer"

    def run(self, plan: Plan) -> None:
        if plan.postcopy != "yes":
            return
        waited = plan.target.agent.exec(["sh", "-c", (
            f"until [ -e {LAZY_STATUS}.rc ]; do sleep 0.05; done; cat {LAZY_STATUS}.rc")],
            timeout=LAZY_TRANSFER_WAIT)
        if waited.exit_code != 0 or waited.text.strip() != "0":
            log = f"{plan.images.dir(plan.final_iteration)}/lazy-pages.log"
            raise TransmigrateError(f"the post-copy transfer to {plan.target.record.name} "
                                    f"failed: {_criu_error(plan.target, log) or 'no log'}")

    def undo(self, plan: Plan) -> None:
        """Waiting changes nothing; the restore's undo stops the daemon."""


class Commit:
    """Let the held dump finish: the source's copy of the service is killed there
    (with post-copy it was told to go on already, and leaves the tasks stopped).

    This is the point of no return, so nothing here raises. The source's data
    volume stays frozen (the target has it now): a dying task that must write
    there, such as one releasing an unlinked file, blocks, and CRIU with it.
    Then the source VM is retired without waiting for CRIU's statistics.
    """

    name = "commit"

    def run(self, plan: Plan) -> None:
        assert plan.dump_pid is not None
        try:
            plan.source.sh(f"touch {HOLD_DIR}/go")
            _wait_exit(plan.source.agent, plan.dump_pid, timeout=COMMIT_WAIT)
        except TransmigrateError as exc:
            plan.report.warnings.append(f"criu dump did not finish after commit ({exc}); "
                                        "its statistics are missing")
            return
        finally:
            plan.dump_pid = None
        n = plan.final_iteration
        # CRIU 3.17 writes a lazy dump's statistics before it serves the memory, with
        # its timers still running and its page counters empty: not worth reporting.
        with contextlib.suppress(TransmigrateError):
            if plan.postcopy != "yes":
                dump = _read_stats(plan.source, plan.images.dir(n), "stats-dump")
                plan.report.dump = dump if isinstance(dump, DumpStats) else None
        with contextlib.suppress(TransmigrateError):
            restore = _read_stats(plan.target, plan.images.dir(n), "stats-restore")
            plan.report.restore = restore if isinstance(restore, RestoreStats) else None

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
