"""The steps of one live migration, each with ``run()`` and ``undo()`` (see engine).

The final dump holds the source's tasks frozen (see ``criu-hold``) until the
target runs them, and only the last step, Commit, lets the source's copy go;
so undoing the steps in reverse leaves the service running on the source as it
was. All trees are frozen before any is handed over.

With post-copy the target runs the service before it has all its memory: the
rest is fetched from the source's frozen tasks. CRIU 3.17 serves that memory
only after its post-dump hook has said "go", and from then on it cannot resume
the tasks' TCP sockets itself: so the target is made ready (volume, images,
lazy-pages daemon) before "go", and a failure after it still rolls back to the
source's intact tasks and data, but their TCP connections are lost, and what the
target did after the switch is not undone.

What the guests do while waiting is in ``guest/files/tm-migrate``: one agent
round trip per wait.
"""

from __future__ import annotations

import contextlib
import io
import shlex
import tarfile
import time
from collections.abc import Callable, Sequence

from transmigrate.errors import TransmigrateError
from transmigrate.guest.agent import ExecResult, GuestAgent
from transmigrate.migrate.criu import (
    IMAGES_ROOT,
    RESTORE_ROOT,
    DumpStats,
    RestoreStats,
    parse_stats,
    with_millisecond_timestamps,
)
from transmigrate.migrate.engine import Step
from transmigrate.migrate.plan import GUEST_TOOLS, Plan, Side, Tree, criu_error
from transmigrate.migrate.precheck import Precheck, SourceInspection
from transmigrate.migrate.precopy import CopyMode
from transmigrate.polling import wait_for
from transmigrate.progress import Progress, silent
from transmigrate.vm.volume import DATA_MOUNT

__all__ = ["migration_steps"]

HANDOVER_ARCHIVE = f"{IMAGES_ROOT}/handover.tar"
"""On both sides: the images and carried files, as one tar stream (outside any tree's
directory, so that it never packs itself)."""

COMMIT_WAIT = 10.0
HOLD_MARGIN = 10.0
"""Seconds of hold that must be left for the commit to say "go" in time."""
LAZY_TRANSFER_WAIT = 900.0
CRIU_AT_ONCE = 8
"""CRIU runs at a time in one guest, of a move's many trees: more would only share its
vCPUs, and leave the guest agent too little CPU to answer (50 at once on one vCPU)."""


def _batches(trees: Sequence[Tree]) -> list[Sequence[Tree]]:
    return [trees[i:i + CRIU_AT_ONCE] for i in range(0, len(trees), CRIU_AT_ONCE)]


def _side_by_side(commands: Sequence[str]) -> str:
    """A shell script that runs ``commands`` in the background, CRIU_AT_ONCE at a time."""
    return "".join(f"{{ {command}; }} & " + ("wait; " if i % CRIU_AT_ONCE == 0 else "")
                   for i, command in enumerate(commands, 1)) + "wait; "


def _read_stats(side: Side, paths: Sequence[str]) -> dict[str, DumpStats | RestoreStats]:
    """The CRIU statistics files among ``paths`` that exist, in one round trip."""
    archive = side.agent.exec(["tar", "-cf", "-", "--ignore-failed-read", *paths])
    if archive.exit_code != 0:
        return {}
    stats: dict[str, DumpStats | RestoreStats] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            for member in tar:
                data = tar.extractfile(member)
                if data is not None:
                    stats["/" + member.name] = parse_stats(data.read())
    except tarfile.TarError as exc:
        raise TransmigrateError(f"reading CRIU's statistics in {side.record.name}: "
                                f"{exc}") from exc
    return stats


class PreCopy:
    """Copy memory to the target while the service runs, until each tree's dirty set is
    small: P.Haul's loop, its rounds taken by every tree still copying side by side."""

    name = "pre-copy"

    def __init__(self, progress: Progress = silent) -> None:
        self.progress = progress

    def run(self, plan: Plan) -> None:
        if not plan.copy.precopies:
            return
        written: dict[int, list[int]] = {tree.pid: [] for tree in plan.trees}
        n = 1
        while going := [t for t in plan.trees if plan.policy.should_continue(written[t.pid])]:
            for tree, stats in zip(going, self._round(plan, going, n), strict=True):
                tree.report.precopy.append(stats)
                written[tree.pid].append(stats.pages_written)
                tree.final_iteration = n + 1
                self.progress(f"pre-copy {n} of {tree.pid}: {stats.pages_written} pages "
                              f"written, {stats.pages_skipped_parent} unchanged")
            n += 1
        stalled = [t.pid for t in plan.trees if plan.policy.should_postcopy(written[t.pid])]
        if plan.copy is CopyMode.AUTO and stalled:
            self.progress(f"pre-copy of {', '.join(map(str, stalled))} did not converge "
                          f"({max(written[pid][-1] for pid in stalled)} pages dirty): post-copy")
            plan.copy = CopyMode.POST

    @staticmethod
    def _round(plan: Plan, trees: list[Tree], n: int) -> list[DumpStats]:
        """Pre-dump ``n`` of each of ``trees``, side by side, each to its own page server."""
        source, target = plan.source, plan.target
        address = target.record.migration_ip
        target.agent.sh(" && ".join(f"mkdir -p {t.images.dir(n)} && "
                                    + shlex.join(t.images.page_server(n, address))
                                    for t in trees), what="criu page-server")
        script = _side_by_side([
            f"mkdir -p {t.images.dir(n)} && {shlex.join(t.images.pre_dump(n, t.pid, address))}"
            f"; echo $? > {t.images.dir(n)}/pre-dump.rc" for t in trees]) + \
            "".join(f"cat {t.images.dir(n)}/pre-dump.rc || echo '?'; " for t in trees)
        codes = source.agent.exec(["sh", "-c", script], timeout=300).text.split()
        for tree, code in zip(trees, codes + ["?"] * (len(trees) - len(codes)), strict=False):
            if code != "0":
                error = criu_error(source, f"{tree.images.dir(n)}/pre-dump.log") or "no log"
                raise TransmigrateError(f"criu pre-dump of {tree.pid} failed in "
                                        f"{source.record.name}: {error}")
        paths = [f"{t.images.dir(n)}/stats-dump" for t in trees]
        found = _read_stats(source, paths)
        stats = [s for s in (found.get(path) for path in paths) if isinstance(s, DumpStats)]
        if len(stats) != len(trees):
            raise TransmigrateError(f"criu pre-dump left no statistics in "
                                    f"{source.record.name}")
        return stats

    def undo(self, plan: Plan) -> None:
        """Pre-dumps leave the service running; their images are removed at the end."""


class FinalDump:
    """Freeze the trees and dump them side by side, each held frozen at post-dump."""

    name = "final dump"

    def run(self, plan: Plan) -> None:
        postcopy = plan.copy.lazy
        plan.report.copy = plan.copy.label
        source, target = plan.source, plan.target
        if not postcopy:  # every tree's page server at once: each has its own port
            target.agent.sh(" && ".join(
                f"mkdir -p {t.images.dir(t.final_iteration)} && "
                + shlex.join(t.images.page_server(t.final_iteration, target.record.migration_ip))
                for t in plan.trees), what="criu page-server")
        # Before anything is frozen: the holds' FIFOs are made (one process less in each
        # hold), the link answers (else CRIU's connect would wait minutes, frozen), and
        # the data volume is flushed, so that freezing it later has little left to write.
        link = target.record.migration_ip
        source.agent.sh(" && ".join(f"mkdir -p {t.images.dir(t.final_iteration)} {t.hold_dir}"
                                    f" && mkfifo {t.hold_dir}/wake {t.hold_dir}/dumped-wake"
                                    for t in plan.trees)
                        + f" && if mountpoint -q {DATA_MOUNT}; then sync -f {DATA_MOUNT}; fi"
                        + f" && ping -q -c 1 -W 2 {link} > /dev/null",
                        what=f"checking the migration link to {link}")
        # The trees are frozen and dumped side by side, a batch at a time; each stays
        # frozen, held, until the commit.
        plan.frozen_at = time.monotonic()
        for batch in _batches(plan.trees):
            for tree in batch:
                self._start_dump(plan, tree, postcopy)
            self._wait_dumped(plan, batch)

    @staticmethod
    def _start_dump(plan: Plan, tree: Tree, postcopy: bool) -> None:
        source, target, images, n = plan.source, plan.target, tree.images, tree.final_iteration
        if postcopy:
            argv = images.lazy_dump(n, tree.pid, source.record.migration_ip)
        else:
            argv = images.dump(n, tree.pid, target.record.migration_ip)
            if not plan.copy.precopies:
                argv = [a for a in argv if a != "--track-mem"]
        tree.dump_pid = source.agent.spawn(argv, env=[
            f"TM_HOLD={tree.hold_dir}", f"TM_HOLD_TIMEOUT={plan.hold_seconds:.0f}",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin"])

    @staticmethod
    def _wait_dumped(plan: Plan, trees: Sequence[Tree]) -> None:
        """Until each dump of ``trees`` holds its tree: one call, which sleeps in the
        guest."""
        source = plan.source
        waited = source.agent.exec([f"{GUEST_TOOLS}/tm-wait-dumped",
                                    *(f"{tree.hold_dir}:{tree.dump_pid}" for tree in trees)],
                                   timeout=max(plan.hold_left(), 1.0))
        if waited.exit_code != 0:
            failed = next((t for t in trees if t.hold_dir == waited.text.strip()), None)
            if failed is None:
                raise TransmigrateError(f"waiting for the dumps in {source.record.name} failed: "
                                        f"{waited.text.strip() or waited.exit_code}")
            log = f"{failed.images.dir(failed.final_iteration)}/dump.log"
            raise TransmigrateError(f"criu dump of {failed.pid} failed in {source.record.name}: "
                                    f"{criu_error(source, log) or 'no log'}")

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
        source.tool("decide", "abort", tree.hold_dir, what="aborting the held dump")
        if plan.copy.lazy:
            source.tool("lazy-abort", source.record.migration_ip,
                        str(tree.images.lazy_pages_port), str(tree.dump_pid),
                        what="ending the lazy page server", timeout=60)
        with contextlib.suppress(TransmigrateError):
            _wait_exit(source.agent, tree.dump_pid, timeout=60)
        tree.dump_pid = None
        if tree.lazy_released:
            source.agent.sh(f"nft delete table inet CRIU-{tree.pid} 2>/dev/null; "
                            f"kill -CONT {' '.join(map(str, tree.pids))}",
                            what="continuing the stopped tasks")


def _wait_exit(agent: GuestAgent, pid: int, timeout: float) -> ExecResult:
    return wait_for(lambda: agent.poll(pid), timeout=timeout, interval=0.01,
                    what=f"guest process {pid} did not exit")


class HandOver:
    """Hand the dumps to the target: freeze the data volume, copy the non-page images
    and the files the precheck chose to carry (outside the volume, small, and absent,
    different or being written), now that nothing changes them. On the way, the
    connections' timestamps are kept in milliseconds (``millisecond_timestamp``).

    A few agent calls on each side keep it short. The source's freeze flushes the
    volume; pages already went by the page server. The target mounts the
    volume only when it restores, and writes to an overlay until it has taken
    over, so no failure leaves the volume written by both.
    """

    name = "handover"

    def run(self, plan: Plan) -> None:
        # With post-copy, the memory CRIU cannot fetch lazily is in local page images.
        pages = "" if plan.copy.lazy else \
            "--exclude='pages-*.img' --exclude='pagemap-*.img' "
        root = IMAGES_ROOT.lstrip("/")
        directories = " ".join(f"{root}/{t.index}/{t.final_iteration}" for t in plan.trees)
        # Two archives in one stream: the images' excludes must not touch carried files.
        carried = " ".join(shlex.quote(path.lstrip("/")) for path in plan.report.carried)
        carry = f" && tar -C / -c {carried}" if carried else ""
        plan.source.agent.sh(
            f"if mountpoint -q {DATA_MOUNT}; then {GUEST_TOOLS}/tm-data freeze || exit 1; fi; "
            f"{{ tar -C / -c {pages}--exclude='*.log' --exclude=parent {directories}{carry}; }}"
            f" > {HANDOVER_ARCHIVE}", what="freezing data and packing images")
        # By file, not a command's output: qemu-ga cuts that at 16 MiB, and post-copy's
        # local pages can be far more (all of them, when CRIU takes a thread's stack
        # pointer on a page boundary as a stack page: its is_stack() test).
        archive = plan.source.agent.read_file(HANDOVER_ARCHIVE)
        plan.target.agent.write_file(HANDOVER_ARCHIVE, with_millisecond_timestamps(archive))
        plan.target.agent.sh(f"tar -C / -x --ignore-zeros -f {HANDOVER_ARCHIVE} && "
                             f"rm {HANDOVER_ARCHIVE}", what="unpacking images")

    def undo(self, plan: Plan) -> None:
        """Thaw the source's volume (Restore's undo has made sure the target let go)."""
        plan.source.agent.sh(f"rm -f {HANDOVER_ARCHIVE}; {GUEST_TOOLS}/tm-data thaw",
                             what="thawing the data volume")


class DetachSource:
    """Take the source's service NIC off the bridge: from now on no packet reaches it."""

    name = "network handover"

    def run(self, plan: Plan) -> None:
        plan.network.detach(plan.source.record.service_tap)

    def undo(self, plan: Plan) -> None:
        plan.network.attach(plan.source.record.service_tap)


class Restore:
    """Mount the data volume on the target and recreate the processes by system calls:
    the trees side by side (with post-copy, one after another, each with its lazy-pages
    daemon)."""

    name = "restore"

    def run(self, plan: Plan) -> None:
        # The first command on the target mounts the volume: one round trip less.
        ready = [f"{GUEST_TOOLS}/tm-data mount"]
        if any(tree.shared_mounts is not None for tree in plan.trees):
            # The root that a restored mount namespace gets.
            ready.append(f"mkdir -p {RESTORE_ROOT} && {{ mountpoint -q {RESTORE_ROOT} || "
                         f"mount --bind / {RESTORE_ROOT}; }}")
        if not plan.copy.lazy:
            self._restore_all(plan, f"{' && '.join(ready)} || exit 1; ")
            return
        first = f"{' && '.join(ready)} && "
        for tree in plan.trees:
            self._prepare_lazy(plan, tree, first)
            first = ""
            self._restore_lazily(plan, tree)

    @staticmethod
    def _restore_all(plan: Plan, ready: str) -> None:
        """Every tree side by side, in one command; then each one's exit code and pid."""
        script = ready + _side_by_side([
            f"{shlex.join(t.images.restore(t.final_iteration, t.restored_pidfile))}; "
            f"echo $? > {t.restored_pidfile}.rc" for t in plan.trees]) + \
            "".join(f"echo $(cat {t.restored_pidfile}.rc) $(cat {t.restored_pidfile} || "
                    f"echo -); " for t in plan.trees)
        result = plan.target.agent.exec(["sh", "-c", script], timeout=300)
        lines = result.text.splitlines()
        if result.exit_code != 0 or len(lines) != len(plan.trees):
            stderr = result.stderr.decode(errors="replace").strip().splitlines()
            raise TransmigrateError(f"restoring in {plan.target.record.name} failed: "
                                    f"{stderr[-1] if stderr else result.exit_code}")
        for tree, line in zip(plan.trees, lines, strict=True):
            code, pid = line.split()
            if code != "0" or not pid.isdigit():
                log = f"{tree.images.dir(tree.final_iteration)}/restore.log"
                raise TransmigrateError(f"restore of {tree.pid} failed in "
                                        f"{plan.target.record.name}: "
                                        f"{criu_error(plan.target, log) or f'exit {code}'}")
            tree.report.restored_pid = int(pid)

    @staticmethod
    def _restore_lazily(plan: Plan, tree: Tree) -> None:
        n, images = tree.final_iteration, tree.images
        restore = shlex.join(images.restore(n, tree.restored_pidfile, lazy=True))
        result = plan.target.agent.exec(
            ["sh", "-c", f"{restore} && cat {tree.restored_pidfile}"], timeout=300)
        if result.exit_code != 0:
            stderr = result.stderr.decode(errors="replace").strip().splitlines()
            error = criu_error(plan.target, f"{images.dir(n)}/restore.log") or \
                (stderr[-1] if stderr else f"exit {result.exit_code}")
            daemon_error = criu_error(plan.target, f"{images.dir(n)}/lazy-pages.log")
            raise TransmigrateError(f"restore of {tree.pid} failed in "
                                    f"{plan.target.record.name}: {error} (criu lazy-pages: "
                                    f"{daemon_error or 'no log'})")
        tree.report.restored_pid = int(result.text.split()[-1])

    @staticmethod
    def _prepare_lazy(plan: Plan, tree: Tree, mount: str) -> None:
        """Make the target ready, then let the source's dump serve the memory.

        The lazy-pages daemon must listen on its socket in the images directory
        before the restore connects; it outlives this command and records how it
        ended. It connects to the source only once the restore has connected."""
        n = tree.final_iteration
        start = shlex.join([f"{GUEST_TOOLS}/tm-migrate", "lazy-start", tree.lazy_status,
                            f"{tree.images.dir(n)}/lazy-pages.socket",
                            *tree.images.lazy_pages(n, plan.source.record.migration_ip)])
        plan.target.agent.sh(f"{mount}{start}", what="starting criu lazy-pages")
        tree.lazy_released = True
        plan.source.tool("lazy-serve", tree.hold_dir, str(tree.images.lazy_pages_port),
                         str(tree.dump_pid), what="serving the memory")

    def undo(self, plan: Plan) -> None:
        """Kill what was restored and release the volume; if the target cannot confirm
        that, fence it, so that nothing of the service runs there alongside the source.
        (What it wrote to the volume is in its overlay, thrown away with it.)"""
        trees = [arg for t in plan.trees
                 for arg in (t.lazy_status, t.restored_pidfile, str(t.pid))]
        try:
            plan.target.tool("release", *trees, what="releasing the target")
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
        plan.target.agent.run(["kill", "-0", *(str(t.report.restored_pid) for t in plan.trees)],
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
        if not plan.copy.lazy:
            return
        for tree in plan.trees:
            waited = plan.target.agent.exec([f"{GUEST_TOOLS}/tm-migrate", "lazy-wait",
                                             tree.lazy_status], timeout=LAZY_TRANSFER_WAIT)
            if waited.exit_code != 0:
                log = f"{tree.images.dir(tree.final_iteration)}/lazy-pages.log"
                raise TransmigrateError(
                    f"the post-copy transfer of {tree.pid} to {plan.target.record.name} "
                    f"failed: {criu_error(plan.target, log) or 'no log'}")

    def undo(self, plan: Plan) -> None:
        """Waiting changes nothing; the restore's undo stops the daemons."""


class Commit:
    """Let the held dumps finish: the source's copy of the service is killed there
    (with post-copy they were told to go on already, and leave the tasks stopped).

    First it makes sure that every tree is still held (none gave up and resumed on
    the source), with time left to hear "go"; else it fails, and the whole move
    rolls back. Once "go" is said there is no way back, so nothing after it
    raises. The source's data
    volume stays frozen (the target has it now): a dying task that must write
    there, such as one releasing an unlinked file, blocks, and CRIU with it.
    Then the source VM is retired without waiting for CRIU's statistics.
    """

    name = "commit"

    def run(self, plan: Plan) -> None:
        assert all(tree.dump_pid is not None for tree in plan.trees)
        # All or nothing: every tree must still be held, for long enough to hear "go".
        if not plan.copy.lazy:
            if plan.hold_left() < HOLD_MARGIN:
                raise TransmigrateError(f"the trees have been frozen for "
                                        f"{time.monotonic() - plan.frozen_at:.0f} s, too "
                                        f"close to their holds' {plan.hold_seconds:.0f} s")
            plan.source.tool("held", *(f"{t.hold_dir}:{t.dump_pid}" for t in plan.trees),
                             what="checking that every tree is still held")
        plan.source.agent.exec([f"{GUEST_TOOLS}/tm-migrate", "decide", "go",
                                *(tree.hold_dir for tree in plan.trees)])
        self._finish(plan)

    @staticmethod
    def _finish(plan: Plan) -> None:
        """Wait for the dumps to end, then read every tree's statistics on both sides."""
        ended: list[Tree] = []
        for tree in plan.trees:
            assert tree.dump_pid is not None
            try:
                _wait_exit(plan.source.agent, tree.dump_pid, timeout=COMMIT_WAIT)
                ended.append(tree)
            except TransmigrateError as exc:
                plan.report.warnings.append(f"criu dump of {tree.pid} did not finish after "
                                            f"commit ({exc}); its statistics are missing")
            finally:
                tree.dump_pid = None
        # CRIU 3.17 writes a lazy dump's statistics before it serves the memory, with
        # its timers still running and its page counters empty: not worth reporting.
        # Nothing raises after "go": statistics that cannot be read are missing.
        dumps: dict[str, DumpStats | RestoreStats] = {}
        restores: dict[str, DumpStats | RestoreStats] = {}
        with contextlib.suppress(TransmigrateError):
            if not plan.copy.lazy:
                dumps = _read_stats(plan.source, [
                    f"{t.images.dir(t.final_iteration)}/stats-dump" for t in ended])
            restores = _read_stats(plan.target, [
                f"{t.images.dir(t.final_iteration)}/stats-restore" for t in ended])
        for tree in ended:
            directory = tree.images.dir(tree.final_iteration)
            dump = dumps.get(f"{directory}/stats-dump")
            restore = restores.get(f"{directory}/stats-restore")
            tree.report.dump = dump if isinstance(dump, DumpStats) else None
            tree.report.restore = restore if isinstance(restore, RestoreStats) else None

    def undo(self, plan: Plan) -> None:
        """There is no way back once the source's copy is gone."""


def migration_steps(source: Callable[[], SourceInspection],
                    progress: Progress = silent) -> list[Step]:
    """The steps in order; ``source`` waits for the source's part of the precheck."""
    return [Precheck(source), PreCopy(progress), FinalDump(), HandOver(), DetachSource(),
            Restore(), AttachTarget(), Verify(), PostCopyTransfer(), Commit()]
