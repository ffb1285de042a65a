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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from transmigrate.errors import TransmigrateError
from transmigrate.guest.agent import GuestAgent
from transmigrate.migrate.criu import IMAGES_ROOT
from transmigrate.migrate.plan import GUEST_TOOLS, HOLD_DIR, Plan
from transmigrate.migrate.precopy import CopyMode
from transmigrate.vm.volume import DATA_MOUNT

__all__ = ["Precheck", "PrecheckFailed", "Refusal", "SourceInspection", "inspect_source"]

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
    "shared": ("belong to more than one of the trees", "name each tree once"),
    "pid-taken": ("have pids that are taken in {detail}", "move them to another standby"),
    "file": ("exist only in {detail}", f"put them on the data volume ({DATA_MOUNT})"),
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


def _files(refusals: Sequence[Refusal]) -> str:
    paths = sorted({r.comm for r in refusals})
    shown = ", ".join(paths[:3]) + (", …" if len(paths) > 3 else "")
    return f"{len(paths)} files ({shown})" if len(paths) > 1 else paths[0]


def describe(refusals: Sequence[Refusal]) -> list[str]:
    """One line per cause (and detail), naming the processes or files and the fix."""
    groups: dict[tuple[str, str], list[Refusal]] = {}
    for refusal in refusals:
        groups.setdefault((refusal.cause, refusal.detail), []).append(refusal)
    lines = []
    for (cause, detail), group in groups.items():
        problem, fix = CAUSES[cause]
        problem = problem.format(detail=detail)
        if cause == "file":
            subject = _files(group)
            if len({r.comm for r in group}) == 1:
                problem, fix = problem.replace("exist ", "exists "), fix.replace("them", "it")
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


@dataclass(frozen=True)
class TreeInspection:
    root: int
    pids: list[int]
    files: dict[str, int]
    """Regular files it uses outside the data volume, with their sizes."""
    refusals: list[Refusal]


@dataclass(frozen=True)
class SourceInspection:
    """What the source's guest said about itself and the trees to move."""

    trees: list[TreeInspection]
    refusals: list[Refusal]
    dirty_tracking: bool


def _guest_report(agent: GuestAgent, args: list[str], *, what: str,
                  input: bytes | None = None) -> dict[str, Any]:
    """Run ``tm-resources ARGS`` (see guest/files) and read its JSON."""
    text = agent.run([f"{GUEST_TOOLS}/tm-resources", *args], what=what, input=input,
                     timeout=120).text
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
        *RESET, "--criu", "--feature", DIRTY_TRACKING, *map(str, roots)],
        what="listing the processes' resources")
    refusals = _criu_refusals(report, agent.name)
    trees = []
    for tree in report["trees"]:
        if "error" in tree:
            raise TransmigrateError(f"{tree['error']} in {agent.name}")
        found = [Refusal(p["cause"], p["pid"], p["comm"], p["detail"])
                 for p in tree["problems"]]
        trees.append(TreeInspection(tree["root"], tree["pids"], {
            path: size for path, size in tree["files"].items()
            if not path.startswith(DATA_MOUNT + "/")}, found))
        refusals += found
    return SourceInspection(trees, refusals,
                            bool(report["criu"]["features"].get(DIRTY_TRACKING)))


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
        files: dict[str, int] = {}
        for tree in plan.trees:
            tree.pids = by_root[tree.pid].pids
            files |= by_root[tree.pid].files
        counted = Counter(pid for tree in plan.trees for pid in set(tree.pids))
        refusals += [Refusal("shared", pid) for pid, n in sorted(counted.items()) if n > 1]
        target = plan.target
        query = {"files": sorted(files), "pids": sorted(counted)}
        report = _guest_report(target.agent, [
            *RESET, "--criu", "--feature", LAZY_RESTORE, "--query"],
            what="checking the target", input=json.dumps(query).encode())
        refusals += _criu_refusals(report, target.record.name)
        sizes = report["query"]["sizes"]
        refusals += [Refusal("file", None, path, plan.source.record.name)
                     for path, size in files.items() if sizes.get(path) != size]
        taken = set(report["query"]["pids_taken"])
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
