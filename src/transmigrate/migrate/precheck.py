"""Before anything is frozen: refuse what CRIU could not move, or the target lacks.

The source's part (CRIU works there, what each tree holds) does not depend on
the target, so it runs while the standby boots (:func:`inspect_source`); the
target's part is one guest round trip once it is up. Refusals are grouped by
cause, one short line each naming the processes and the fix, because one
service can have many processes with the same problem.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from transmigrate.errors import TransmigrateError
from transmigrate.guest.agent import GuestAgent
from transmigrate.migrate.criu import IMAGES_ROOT
from transmigrate.migrate.plan import GUEST_TOOLS, HOLD_DIR, Plan
from transmigrate.migrate.precopy import CopyMode
from transmigrate.vm.volume import DATA_MOUNT

__all__ = ["CARRY_FILE_LIMIT", "CARRY_TOTAL_LIMIT", "FileSeen", "Precheck", "PrecheckFailed",
           "Refusal", "SourceInspection", "carry_or_refuse", "held_dumps_fit", "inspect_source"]

DIRTY_TRACKING = "mem_dirty_track"
LAZY_RESTORE = "uffd-noncoop"
RESET = ["--reset", IMAGES_ROOT, "--reset", HOLD_DIR]
"""Each side's migration directories start empty."""


@dataclass(frozen=True)
class Refusal:
    """One reason not to move, about one process (or one file)."""

    cause: str
    """A key of :data:`CAUSES`."""
    pid: int | None = None
    comm: str = ""
    """The process's name; for a cause about a file, the file's path."""
    detail: str = ""
    """What the cause is about: a file, a device, a kind of file descriptor, a VM."""


CAUSES: dict[str, tuple[str, str]] = {
    "criu": ("CRIU does not work in {detail}", "see 'criu check' there"),
    "lazy": ("{detail} cannot restore lazily (post-copy): its kernel lacks userfaultfd's "
             "non-cooperative events", "use --copy pre"),
    "session": ("their session leader ({detail}) is not moved with them",
                "start the service in its own session (setsid)"),
    "anon": ("hold {detail}, which CRIU cannot move", "close it, or leave them behind"),
    "device": ("have device {detail} open", "close it, or leave them behind"),
    "sysv-shm": ("map SysV shared memory in the VM's own IPC namespace, which CRIU moves "
                 "only with the namespace", "start the service in its own (unshare --ipc)"),
    "sysv-sem": ("run in the VM's own IPC namespace, which holds SysV semaphore sets "
                 "({detail}) that would not move", "start the service in its own "
                 "(unshare --ipc, or declare it: namespaces = [\"ipc\"])"),
    "sysv-msg": ("run in the VM's own IPC namespace, which holds SysV message queues "
                 "({detail}) that would not move", "start the service in its own "
                 "(unshare --ipc, or declare it: namespaces = [\"ipc\"])"),
    "session-member": ("are in the session of a moved process ({detail}) but in no moved "
                       "tree (their parent exited), so they would stay behind",
                       "move them too (--pid), or stop them"),
    "shared": ("belong to more than one of the trees", "name each tree once"),
    "pid-taken": ("have pids that are taken in {detail}", "move them to another standby"),
    "large-file": ("not the same in {detail}, too large to copy while frozen",
                   f"declare them as state, or put them on the data volume ({DATA_MOUNT})"),
    "socket-dir": ("missing in {detail}, where the processes' bound UNIX sockets must be",
                   "declare them as state"),
    "changed": ("changed since {detail} booted, and not on the data volume",
                "declare them as state, or move without --strict"),
    "mount": ("have a mount of their own, {detail}, that CRIU cannot move",
              "mount it in the VM instead, or leave them behind"),
    "large-tmpfs": ("holds {detail}, too much to copy while frozen",
                    f"keep large files on the data volume ({DATA_MOUNT})"),
    "mount-ns": ("are in a mount namespace other than their tree's root's",
                 "move them as a tree of their own (--pid)"),
    "mount-missing": ("not mounted in {detail}, and a moved mount namespace shares it with "
                      "the VM", "mount them there too (at boot)"),
    "memory": ("{detail}", "give the VM more memory, or move fewer trees at once"),
}
"""Per cause: what is wrong (said of the processes or files) and the fix."""


def _processes(refusals: Sequence[Refusal]) -> str:
    """``postgres ×9 (pids 10098…10132)``: the processes of a group, shortly."""
    pids = sorted({r.pid for r in refusals if r.pid is not None})
    names = Counter(r.comm for r in {r.pid: r for r in refusals}.values())
    who = ", ".join(f"{comm} ×{n}" if n > 1 else comm for comm, n in names.most_common()
                    if comm) or "processes"
    if len(pids) <= 3:
        return f"{who} ({'pid' if len(pids) == 1 else 'pids'} {', '.join(map(str, pids))})"
    return f"{who} (pids {pids[0]}…{pids[-1]})"


_ABOUT_FILES = ("large-file", "socket-dir", "changed", "mount-missing", "large-tmpfs")
"""Causes said of files (their path is in ``comm``), not of processes."""


def _files(refusals: Sequence[Refusal]) -> str:
    paths = sorted({r.comm for r in refusals})
    shown = ", ".join(paths[:3]) + (", …" if len(paths) > 3 else "")
    return f"{len(paths)} paths ({shown})" if len(paths) > 1 else paths[0]


def describe(refusals: Sequence[Refusal]) -> list[str]:
    """One line per cause (and detail), naming the processes or files and the fix."""
    groups: dict[tuple[str, str], list[Refusal]] = {}
    for refusal in refusals:
        groups.setdefault((refusal.cause, refusal.detail), []).append(refusal)
    lines = []
    for (cause, detail), group in groups.items():
        problem, fix = CAUSES[cause]
        problem = problem.format(detail=detail)
        if cause in _ABOUT_FILES:
            subject = _files(group)
            if len({r.comm for r in group}) == 1:
                fix = fix.replace(" them ", " it ")
        elif any(r.pid is not None for r in group):
            subject = _processes(group)
        else:
            lines.append(f"{problem}; fix: {fix}")
            continue
        lines.append(f"{subject}: {problem}; fix: {fix}")
    return lines


class PrecheckFailed(TransmigrateError):
    """What is to be moved cannot be moved; nothing was touched."""

    def __init__(self, where: str, refusals: Sequence[Refusal]) -> None:
        self.refusals = list(refusals)
        lines = describe(refusals)
        head = f"cannot move from {where}: "
        super().__init__(head + lines[0] if len(lines) == 1 else
                         head + f"{len(lines)} reasons\n  " + "\n  ".join(lines))

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.refusals]


CARRY_FILE_LIMIT = 8 << 20
CARRY_TOTAL_LIMIT = 32 << 20
"""Files outside the volume copied inside the freeze: each, and all together."""


@dataclass(frozen=True)
class FileSeen:
    """A regular file a tree uses that is not on the data volume (through /data or a
    state path bound from it)."""

    size: int
    sha256: str | None
    """Of a small file that is not pristine; a large one is compared by size."""
    writing: bool
    """Open for writing: it may change until the freeze, so it is always carried."""
    pristine: bool = False
    """On the root file system and unchanged since boot, so as the guest image has it:
    the standby boots from the same image, and a file pristine on both sides is the
    same."""

    def same_as(self, there: dict[str, Any] | None) -> bool:
        """Whether the target's file (its facts as tm-resources reports them) has the
        same content."""
        if there is None or there["size"] != self.size:
            return False
        if self.pristine and there["pristine"]:
            return True
        if self.sha256 is None and not self.pristine:  # large: compared by size
            return True
        return self.sha256 is not None and there["sha256"] == self.sha256


@dataclass(frozen=True)
class TreeInspection:
    root: int
    pids: list[int]
    files: dict[str, FileSeen]
    socket_dirs: list[str]
    """Directories of the UNIX sockets it bound, outside the volume."""
    refusals: list[Refusal]
    shared_mounts: list[str] | None = None
    """For a tree in a mount namespace of its own: the mount points it shares with the
    VM (CRIU's external mounts); None for a tree in the VM's."""
    volume_mounts: list[str] = field(default_factory=list)
    """Of those, the data volume's (the target mounts them when it restores)."""
    tmpfs: dict[str, int] = field(default_factory=dict)
    """Its own tmpfs mounts and the bytes in each, which CRIU copies while it is frozen."""


@dataclass(frozen=True)
class SourceInspection:
    """What the source's guest said about itself and the trees to move."""

    trees: list[TreeInspection]
    refusals: list[Refusal]
    dirty_tracking: bool
    changed: list[str]
    """Files of its root file system changed since it booted."""
    available_mib: float | None
    """The memory its kernel can still give (MemAvailable)."""


def _guest_report(agent: GuestAgent, args: list[str], *, what: str, trees: int = 0,
                  input: bytes | None = None) -> dict[str, Any]:
    """Run ``tm-resources ARGS`` (see guest/files) and read its JSON; each tree it
    inspects may take a few seconds under TCG."""
    text = agent.run([f"{GUEST_TOOLS}/tm-resources", *args], what=what, input=input,
                     timeout=120 + 3 * trees).text
    try:
        report: dict[str, Any] = json.loads(text)
    except ValueError as exc:
        raise TransmigrateError(f"{what} in {agent.name} printed no JSON: {text[:200]}") \
            from exc
    return report


def _criu_refusals(report: dict[str, Any], where: str) -> list[Refusal]:
    criu = report["criu"]
    return [] if criu["ok"] else [Refusal("criu", None, "criu", f"{where}: {criu['error']}")]


def inspect_source(agent: GuestAgent, roots: Sequence[int]) -> SourceInspection:
    """The source's part of the precheck: one round trip, run while the standby boots.

    Also clears the source's migration directories for this migration."""
    report = _guest_report(agent, [
        *RESET, "--criu", "--feature", DIRTY_TRACKING, "--changed", *map(str, roots)],
        what="listing the processes' resources", trees=len(roots))
    refusals = _criu_refusals(report, agent.name)
    trees = []
    for tree in report["trees"]:
        if "error" in tree:
            raise TransmigrateError(f"{tree['error']} in {agent.name}")
        found = [Refusal(p["cause"], p["pid"], p["comm"], p["detail"])
                 for p in tree["problems"]]
        files = {path: FileSeen(seen["size"], seen["sha256"], seen["writing"],
                                seen["pristine"])
                 for path, seen in tree["files"].items()}
        mounts = tree["mounts"]
        trees.append(TreeInspection(
            tree["root"], tree["pids"], files, tree["socket_dirs"], found,
            None if mounts is None else mounts["shared"] + mounts["volume"],
            [] if mounts is None else mounts["volume"],
            {} if mounts is None else mounts["tmpfs"]))
        refusals += found
    return SourceInspection(trees, refusals,
                            bool(report["criu"]["features"].get(DIRTY_TRACKING)),
                            report["changed"],
                            None if report.get("available_kib") is None
                            else report["available_kib"] / 1024)


HELD_DUMP_MIB = 12.0
"""What each tree's held final dump keeps in the source until the commit (CRIU, its
hold, their page tables and pipes): ~8 MiB measured for a small tree, with margin."""
MEMORY_MARGIN_MIB = 64.0


def held_dumps_fit(trees: int, available_mib: float | None, vm: str) -> list[Refusal]:
    """Refuse a move whose held dumps would exhaust the source's memory: the kernel then
    reclaims until nothing, the guest agent included, makes progress (50 trees in 768
    MiB did), while every tree is frozen."""
    needed = trees * HELD_DUMP_MIB + MEMORY_MARGIN_MIB
    if available_mib is None or available_mib >= needed:
        return []
    return [Refusal("memory", detail=(
        f"{vm} has {available_mib:.0f} MiB available; the {trees} trees' final dumps, held "
        f"until the commit, need about {needed:.0f} MiB"))]


def carry_or_refuse(files: Mapping[str, FileSeen], there: Mapping[str, dict[str, Any] | None],
                    target: str) -> tuple[list[str], list[Refusal]]:
    """Which files to copy to the target inside the freeze, and which to refuse: a file
    the target lacks or has otherwise, or one being written, is carried if it is small
    enough; else refused."""
    carried: list[str] = []
    refusals: list[Refusal] = []
    total = 0
    for path, seen in sorted(files.items()):
        if seen.same_as(there.get(path)) and not seen.writing:
            continue
        if seen.size <= CARRY_FILE_LIMIT and total + seen.size <= CARRY_TOTAL_LIMIT:
            carried.append(path)
            total += seen.size
        else:
            refusals.append(Refusal("large-file", None, path, target))
    return carried, refusals


def _large_tmpfs(trees: Sequence[TreeInspection]) -> list[Refusal]:
    """A private tmpfs is copied whole while its tree is frozen, as carried files are:
    the same limit holds."""
    return [Refusal("large-tmpfs", None, point, f"{size / 2**20:.0f} MiB")
            for tree in trees for point, size in sorted(tree.tmpfs.items())
            if size > CARRY_TOTAL_LIMIT]


class Precheck:
    """Refuse, before anything is frozen, what CRIU could not move or the target lacks;
    narrow the copy mode to what both kernels can do."""

    name = "precheck"

    def __init__(self, source: Callable[[], SourceInspection]) -> None:
        self.source = source
        """The source's inspection (started while the standby booted): waits for it."""

    def run(self, plan: Plan) -> None:
        inspection = self.source()
        refusals = list(inspection.refusals)
        by_root = {tree.root: tree for tree in inspection.trees}
        files: dict[str, FileSeen] = {}
        socket_dirs: set[str] = set()
        mounts: set[str] = set()
        for tree in plan.trees:
            seen = by_root[tree.pid]
            tree.pids, tree.shared_mounts = seen.pids, seen.shared_mounts
            files |= seen.files
            socket_dirs.update(seen.socket_dirs)
            mounts.update(set(seen.shared_mounts or []) - set(seen.volume_mounts))
        refusals += held_dumps_fit(len(plan.trees), inspection.available_mib,
                                    plan.source.record.name)
        counted = Counter(pid for tree in plan.trees for pid in set(tree.pids))
        refusals += [Refusal("shared", pid) for pid, n in sorted(counted.items()) if n > 1]
        target = plan.target
        query = {"files": sorted(files), "dirs": sorted(socket_dirs), "mounts": sorted(mounts),
                 "pids": sorted(counted)}
        report = _guest_report(target.agent, [
            *RESET, "--criu", "--feature", LAZY_RESTORE, "--query"],
            what="checking the target", input=json.dumps(query).encode())
        refusals += _criu_refusals(report, target.record.name)
        answer = report["query"]
        plan.report.carried, too_large = carry_or_refuse(files, answer["files"],
                                                         target.record.name)
        refusals += too_large
        refusals += _large_tmpfs([by_root[tree.pid] for tree in plan.trees])
        refusals += [Refusal("socket-dir", None, directory, target.record.name)
                     for directory in answer["dirs_missing"]]
        refusals += [Refusal("mount-missing", None, point, target.record.name)
                     for point in answer["mounts_missing"]]
        changed = [path for path in inspection.changed if path not in files]
        if changed and plan.strict:
            refusals += [Refusal("changed", None, path, plan.source.record.name)
                         for path in changed]
        elif changed:
            plan.report.warnings += describe([Refusal("changed", None, path,
                                                      plan.source.record.name)
                                              for path in changed])
        taken = set(answer["pids_taken"])
        refusals += [Refusal("pid-taken", pid, "", target.record.name)
                     for pid in sorted(taken)]
        lazy_ok = bool(report["criu"]["features"].get(LAZY_RESTORE))
        if plan.copy is CopyMode.POST and not lazy_ok:
            refusals.append(Refusal("lazy", detail=target.record.name))
        if refusals:
            raise PrecheckFailed(plan.source.record.name, refusals)
        if plan.copy is CopyMode.AUTO and not lazy_ok:
            plan.copy = CopyMode.PRE
        if plan.copy.precopies and not inspection.dirty_tracking:
            plan.copy = CopyMode.STOP

    def undo(self, plan: Plan) -> None:
        """Nothing to undo: the precheck only looks."""
