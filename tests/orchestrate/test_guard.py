"""Guard: the policy and its decisions, then real faults in a real guest running redis
under a client's load, survived one after the other."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL, load_config
from transmigrate.detect.events import Event
from transmigrate.errors import TransmigrateError
from transmigrate.faults import Deadlock, HungDriver, MemoryBomb, Panic, inject
from transmigrate.faults.build import FORKBOMB_NAME, MODULE_NAME
from transmigrate.guest.agent import GuestAgent
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.faults import fault_target
from transmigrate.orchestrate.guard import (
    DEFAULT_ACTIONS,
    MOVE,
    Decision,
    Policy,
    culprit_trees,
    decide,
    guard,
    load_policy,
)
from transmigrate.orchestrate.history import History
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.services import (
    LoadClient,
    redis_answers,
    redis_cli,
    start_service,
)
from transmigrate.polling import wait_for

from ..conftest import CLI, REDIS_SERVICE, cli

KEPT_FOR_DIAGNOSIS = ("paused", "guest-panicked")
"""A recovered VM's stopped states: paused when the guard read the panic in memory
before the kernel reached pvpanic, guest-panicked after."""


def _policy(tmp_path: Path, text: str) -> Policy:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return load_policy(path)


def test_policy_file_overrides_the_defaults(tmp_path: Path) -> None:
    policy = _policy(tmp_path, """
live_deadline_seconds = 90
agent_deadline_seconds = 3
standby_kernel = "6.12.117"
[actions]
fork-storm = "report"
[monitor]
interval = "100ms"
hung_min_tasks = 5
""")
    assert policy.actions == {**DEFAULT_ACTIONS, "fork-storm": "report"}
    assert policy.live_deadline_seconds == 90.0 and policy.standby_kernel == "6.12.117"
    assert policy.lockup_grace_seconds == Policy().lockup_grace_seconds
    assert policy.agent_deadline_seconds == 3.0
    assert policy.monitor == ("interval=100ms", "hung_min_tasks=5")


@pytest.mark.parametrize(("text", "error"), [
    ("deadline = 5", "unknown key 'deadline'"),
    ("[actions]\nreboot = \"recover\"", "unknown key actions.reboot"),
    ("[actions]\npanic = \"reboot\"", "actions.panic = 'reboot'; choose one of"),
    ("[monitor]\nlockup_min = 5", "monitor: unknown setting 'lockup_min'"),
    ("live_deadline_seconds = -1", "live_deadline_seconds must be a positive number"),
    ("agent_deadline_seconds = 0", "agent_deadline_seconds must be a positive number"),
    ("standby_kernel = 6", "standby_kernel must be a string"),
    ("actions = 1", "actions must be a table"),
    ("[actions", "policy .*policy.toml"),
])
def test_bad_policy_is_refused_naming_the_key(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(TransmigrateError, match=error):
        _policy(tmp_path, text)


@pytest.mark.parametrize(("seen", "fault", "action", "culprits"), [
    ([("panic", {})], "panic", "recover", []),
    ([("oops", {})], "oops", "recover", []),
    ([("lockup", {"cpu": 1, "pid": 812})], "lockup", "recover", [812]),
    ([("lockup", {"cpu": 0, "pid": 812}), ("lockup", {"cpu": 1, "pid": 813})],
     "lockup-all", "recover", [812, 813]),
    ([("lockup", {"cpu": 0, "pid": 812}), ("hung-driver", {"pids": [9]})],
     "lockup", "recover", [812]),
    ([("hung-driver", {"pids": [901, 902, 903]})], "hung-driver", "move", [901, 902, 903]),
    ([("fork-storm", {"growth": 200})], "fork-storm", "move", []),
    ([("fork-storm", {"growth": 200, "culprit": 999})], "fork-storm", "move", [999]),
    ([("memory-exhaustion", {"free_mib": 3})], "memory-exhaustion", "move", []),
    ([("memory-exhaustion", {"free_mib": 3, "culprit": 77})], "memory-exhaustion", "move",
     [77]),
    ([("vm-dead", {})], "vm-dead", "report", []),
])
def test_decisions_follow_the_fault(seen: list[tuple[str, dict[str, object]]], fault: str,
                                    action: str, culprits: list[int]) -> None:
    """What the monitor saw (with, after a lockup, what came in the grace) -> the action."""
    events = [Event(kind, time.monotonic_ns(), f"{kind} seen", evidence)
              for kind, evidence in seen]
    decision = decide("web", events, Policy(), cpus=2)
    assert (decision.fault, decision.action, decision.culprits) == (fault, action, culprits)
    assert decision.summary == events[0].summary and decision.evidence == events[0].evidence
    assert abs(decision.detected_at - time.time()) < 5


# init 1 -> tini 50 -> redis 100 -> bomb 300 -> child 301; a stray bomb 400 under init.
_PARENTS = {50: 1, 100: 50, 200: 100, 300: 100, 301: 300, 400: 1, 401: 400}


@pytest.mark.parametrize(("roots", "culprits", "killed"), [
    ([100], [300], {300, 301}),     # forked by the service: it would move along
    ([100], [301], {301}),          # deeper down too
    ([100], [400], {400, 401}),     # outside every moved tree, with what it forked
    ([100], [100], set()),          # the service itself: it moves, never killed
    ([100], [50], {50}),            # above the service: the service's tree is spared
    ([100, 200], [301, 400], {301, 400, 401}),
    ([100], [999], set()),          # gone meanwhile
])
def test_culprit_trees_spare_the_moved_trees(roots: list[int], culprits: list[int],
                                             killed: set[int]) -> None:
    assert culprit_trees(_PARENTS, roots, culprits) == killed


def test_guard_needs_declared_services_and_a_real_kernel(prepared: Host, old_vm: str,
                                                         tmp_path: Path) -> None:
    """Refused in one line, before anything is booted; the VM runs on."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    done = cli("guard", old_vm, "--config", str(empty), "--dry-run")
    assert done.returncode == 1 and f"nothing to guard in {old_vm}" in done.stderr
    declared = tmp_path / "transmigrate.toml"
    declared.write_text(REDIS_SERVICE.format(vm=old_vm))
    done = cli("guard", old_vm, "--config", str(declared), "--standby-kernel", "6.1.0-999")
    assert done.returncode == 1 and "kernel '6.1.0-999' is not in the archive" in done.stderr
    policy = tmp_path / "policy.toml"
    policy.write_text("[actions]\npanic = \"pray\"\n")
    done = cli("guard", old_vm, "--config", str(declared), "--policy", str(policy))
    assert done.returncode == 1 and "actions.panic = 'pray'" in done.stderr
    assert [m.name for m in prepared.machines.all() if m.name.startswith(old_vm)] == [old_vm]
    assert prepared.machines.get(old_vm).status() == "running"


class _Guarded:
    """redis with 10,000 keys in VM ``name`` under our client's load, guarded in a
    thread: what guard decided and said so far."""

    def __init__(self, prepared: Host, name: str, load: LoadClient) -> None:
        self.prepared, self.name, self.load = prepared, name, load
        self.address = prepared.machines.get(name).record.ip
        self.decisions: list[Decision] = []
        self.said: list[str] = []
        self.failed: list[BaseException] = []
        self.stop = threading.Event()

    def wait(self, what: str, done: Callable[[], bool], timeout: float = 600) -> None:
        def check() -> bool:
            assert not self.failed, f"guard failed: {self.failed[0]!r}; it said {self.said[-10:]}"
            return done()
        wait_for(check, timeout=timeout, interval=0.2, what=what)

    def decision(self, number: int, what: str) -> Decision:
        """The ``number``-th decision, once guard is watching again after it."""
        self.wait(f"no decision on {what}", lambda: len(self.decisions) >= number)
        self.wait(f"guard did not watch again after {what}",
                  lambda: self.said[-1] == f"guarding {self.name}")
        return self.decisions[number - 1]

    def agent(self) -> GuestAgent:
        return self.prepared.agent(self.prepared.machines.get(self.name))

    def client_went_on(self, cut: bool = False) -> None:
        """The client's one connection answered throughout, with every acknowledged
        write; a stalled one fails with the guest's socket states. ``cut``: recovery cut
        the connection (redis was inside a call on it): the client was told by a reset,
        and the INCR it waited for may have been made."""
        time.sleep(1)
        try:
            summary = self.load.stop()
        except subprocess.TimeoutExpired:
            pytest.fail("the client's connection stalled; the guest's sockets:\n"
                        + self.agent().sh("ss -tnie").text)
        counter = int(redis_cli(self.prepared, self.address, "GET", "transmigrate:counter"))
        if cut:
            assert summary["errors"] == ["ConnectionResetError: [Errno 104] Connection reset "
                                         "by peer"] and summary["out_of_order"] == 0, summary
            assert counter - summary["last_value"] in (0, 1), "every acknowledged write"
        else:
            assert summary["errors"] == [] and summary["out_of_order"] == 0, summary
            assert summary["client_id_start"] == summary["client_id_end"], \
                "the same connection"
            assert counter == summary["last_value"], "every acknowledged write"
        assert int(redis_cli(self.prepared, self.address, "DBSIZE")) == 10001


@contextlib.contextmanager
def _guarded_redis(prepared: Host, tmp_path: Path, name: str,
                   policy: Policy) -> Iterator[_Guarded]:
    """redis on 6.1 (2 CPUs), guarded with ``policy`` and a warm standby; everything
    stopped and removed afterwards."""
    config = tmp_path / "transmigrate.toml"
    config.write_text(REDIS_SERVICE.format(vm=name))
    service = load_config(config).services_of(name)[0]
    lifecycle.up(prepared, name, ACTIVE_KERNEL, memory_mib=512, cpus=2)
    guarded: _Guarded | None = None
    guarding: threading.Thread | None = None
    try:
        start_service(prepared, service)
        prepared.agent(prepared.machines.get(name)).sh(
            "seq 1 10000 | awk '{print \"SET key:\" $1 \" \" $1}' | redis-cli --pipe",
            what="writing keys")
        guarded = _Guarded(prepared, name, LoadClient(
            prepared, prepared.machines.get(name).record.ip))
        watched = guarded

        def run() -> None:
            try:
                guard(prepared, name, [service], policy, on_decision=watched.decisions.append,
                      progress=watched.said.append, stop=watched.stop)
            except BaseException as exc:
                watched.failed.append(exc)
                raise

        guarding = threading.Thread(target=run, name="guard")
        guarding.start()
        guarded.wait("guard did not start", lambda: f"guarding {name}" in watched.said)
        assert prepared.machines.get(f"{name}-standby").record.kernel.startswith(STANDBY_KERNEL)
        yield guarded
        guarded.stop.set()
        guarding.join(timeout=60)
        assert not guarding.is_alive()
    finally:
        if guarded is not None:
            guarded.stop.set()
            if guarding is not None:
                guarding.join(timeout=600)
            if guarded.load.process.poll() is None:
                guarded.load.process.kill()
                guarded.load.process.wait()
        for vm in [m.name for m in prepared.machines.all() if m.name.startswith(name)]:
            lifecycle.down(prepared, vm)


def test_redis_survives_a_hung_driver_then_a_panic(prepared: Host, tmp_path: Path) -> None:
    """A driver hangs: redis moves live to 6.12, the hung readers stay behind, the
    client's connection goes on. Then the standby dies, and the new kernel panics (the
    client under load): redis (in the time namespace and with the vdso proxy of its first
    restore) is rebuilt from its memory on a VM booted for it, the connection goes on
    again (or, if redis was inside a call on it, is cut and the client told), and a new
    standby boots. No acknowledged write is lost."""
    name = "t-guard"
    # Readers blocked 5 s before it counts: the injection's own last agent calls come
    # first, before the move takes the VM away.
    policy = Policy(standby_kernel=STANDBY_KERNEL, monitor=("hung_min_blocked_ms=5000",))
    with _guarded_redis(prepared, tmp_path, name, policy) as g:
        hung = inject(fault_target(prepared, name), HungDriver(readers=5))
        moved = g.decision(1, "the hang")
        assert (moved.fault, moved.action, moved.outcome) == ("hung-driver", "move", "moved"), \
            moved
        assert len(moved.culprits) >= 3 and moved.kernel_after.startswith(STANDBY_KERNEL)
        assert MODULE_NAME not in g.agent().sh("cat /proc/modules").text, "the driver stayed"
        assert not g.agent().sh(f"ps -o pid= -p {','.join(map(str, moved.culprits))} || true"
                                ).text.strip(), "the hung readers stayed behind"
        assert hung.details  # the fault was injected for real

        # An accident first: the warm standby dies. The recovery boots a VM for itself.
        standby = prepared.machines.get(f"{name}-standby")
        assert standby.pid is not None
        os.kill(standby.pid, signal.SIGKILL)
        inject(fault_target(prepared, name), Panic())
        recovered = g.decision(2, "the panic")
        assert (recovered.fault, recovered.action, recovered.outcome) == \
            ("panic", "recover", "recovered"), recovered
        # Unless the panic caught redis inside a call on the client's connection: then
        # recovery cuts it, as the only loss.
        cut = [part for part in recovered.detail.split("; ") if part]
        assert all(part.startswith("lost: ") and " is cut: " in part for part in cut), cut
        assert prepared.machines.get(f"{name}-standby").status() == "running"
        g.client_went_on(cut=bool(cut))
        names = {m.name: m for m in prepared.machines.all() if m.name.startswith(name)}
        assert set(names) == {name, f"{name}-dead", f"{name}-standby"}, names
        assert names[f"{name}-dead"].status() in KEPT_FOR_DIAGNOSIS


def test_a_hung_driver_with_the_guest_agent_gone_is_recovered_at_once(prepared: Host,
                                                                      tmp_path: Path) -> None:
    """A hung driver, then the guest agent stops answering (SIGSTOP): the kernel cannot
    hand anything over, so the live move ends at the agent's deadline (2 s here) and
    redis is recovered from memory onto the warm standby, every acknowledged write
    with it."""
    name = "t-guard-mute"
    policy = Policy(standby_kernel=STANDBY_KERNEL, agent_deadline_seconds=2,
                    monitor=("hung_min_blocked_ms=5000",))
    with _guarded_redis(prepared, tmp_path, name, policy) as g:
        inject(fault_target(prepared, name), HungDriver(readers=5))
        agent = g.agent()
        [qemu_ga] = agent.sh("pgrep -x qemu-ga").text.split()
        agent.spawn(["sh", "-c", f"sleep 1; kill -STOP {qemu_ga}"])
        recovered = g.decision(1, "the hang")
        assert (recovered.fault, recovered.action, recovered.outcome) == \
            ("hung-driver", "move", "recovered after the live move failed"), recovered
        assert recovered.detail.startswith("live move: the guest agent did not answer "
                                           "within 2 s"), recovered.detail
        assert recovered.kernel_after.startswith(STANDBY_KERNEL)
        lost = [part for part in recovered.detail.split("; ") if part.startswith("lost: ")]
        g.client_went_on(cut=bool(lost))


def test_redis_survives_a_memory_bomb_then_every_cpu_deadlocked(prepared: Host,
                                                                 tmp_path: Path) -> None:
    """A memory bomb: redis moves live to 6.12 and the bomb, named as the biggest
    grower, is killed first and stays behind. Then every CPU of 6.12 deadlocks. Lockups
    on one CPU move live by this policy, so guard waits out the grace, sees every CPU
    locked, and recovers redis from memory onto the warm standby. The client's
    connection goes on through both, with every acknowledged write."""
    name = "t-guard-mem"
    policy = Policy(standby_kernel=STANDBY_KERNEL, actions={**DEFAULT_ACTIONS, "lockup": MOVE},
                    lockup_grace_seconds=5)
    with _guarded_redis(prepared, tmp_path, name, policy) as g:
        bomb = inject(fault_target(prepared, name), MemoryBomb(mib=4, delay_ms=100))
        moved = g.decision(1, "the memory bomb")
        assert (moved.fault, moved.action, moved.outcome) == \
            ("memory-exhaustion", "move", "moved"), moved
        assert moved.evidence["culprit_comm"] == FORKBOMB_NAME, moved.evidence
        assert moved.culprits == [moved.evidence["culprit"]] and bomb.session is not None
        assert moved.detail == f"culprits killed before the move: {moved.evidence['culprit']}"
        assert moved.kernel_after.startswith(STANDBY_KERNEL)
        assert FORKBOMB_NAME not in g.agent().sh("ps -eo comm").text, "the bomb stayed"

        inject(fault_target(prepared, name), Deadlock(all_cpus=True))
        recovered = g.decision(2, "the deadlock")
        assert (recovered.fault, recovered.action, recovered.outcome) == \
            ("lockup-all", "recover", "recovered"), recovered
        g.client_went_on()
        assert prepared.machines.get(f"{name}-dead").status() == "paused", "kept for diagnosis"


def test_a_killed_guard_started_again_carries_on(prepared: Host, tmp_path: Path) -> None:
    """`guard` through the CLI, killed (SIGKILL) once its standby is up, right after the
    VM was fenced (stopped, as a failover does first). Started again, it takes the
    standby it had (no second one), finds the VM stopped, recovers redis from its
    memory (one JSON line), and boots a new standby; a panic after that is recovered
    too, the first dead VM kept beside the second. While it runs, `down` of the VM is
    refused; it stops on SIGTERM, each run on record."""
    name = "t-guard-again"
    config = tmp_path / "transmigrate.toml"
    config.write_text(REDIS_SERVICE.format(vm=name))
    service = load_config(config).services_of(name)[0]
    lifecycle.up(prepared, name, ACTIVE_KERNEL, memory_mib=384)
    command = [str(CLI), "guard", name, "--config", str(config), "--json", "--interval", "100ms"]
    guards: list[subprocess.Popen[str]] = []

    def start_guard() -> subprocess.Popen[str]:
        with open(tmp_path / f"guard{len(guards)}.err", "w") as err:
            guards.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                                           stderr=err))
        return guards[-1]

    def says(index: int, what: str) -> bool:
        assert guards[index].poll() is None, (tmp_path / f"guard{index}.err").read_text()
        return what in (tmp_path / f"guard{index}.err").read_text()

    try:
        holder = start_service(prepared, service)
        address = prepared.machines.get(name).record.ip
        wait_for(lambda: redis_answers(prepared, address), timeout=60, interval=0.2,
                 what="redis did not listen")
        redis_cli(prepared, address, "SET", "kept", "yes")
        first = start_guard()
        wait_for(lambda: says(0, f"guarding {name}"), timeout=300, interval=0.2,
                 what="guard did not start")
        standby = prepared.machines.get(f"{name}-standby").record.id
        first.kill()
        first.wait()
        prepared.machines.get(name).qmp("stop")

        second = start_guard()
        assert second.stdout is not None
        ready, _, _ = select.select([second.stdout], [], [], 600)
        assert ready, (tmp_path / "guard1.err").read_text()
        decision = json.loads(second.stdout.readline())
        assert (decision["fault"], decision["action"], decision["outcome"]) == \
            ("stopped", "recover", "recovered"), decision
        assert f"onto {name}-standby's disk (a warm standby" in \
            (tmp_path / "guard1.err").read_text(), "the standby it had was taken"
        wait_for(lambda: says(1, f"guarding {name}"), timeout=300, interval=0.2,
                 what="guard did not watch again")
        names = [m.name for m in prepared.machines.all() if m.name.startswith(name)]
        assert sorted(names) == sorted([name, f"{name}-dead", f"{name}-standby"]), names
        assert prepared.machines.get(f"{name}-standby").record.id != standby, "a new one"
        assert redis_cli(prepared, address, "GET", "kept") == "yes"
        assert prepared.agent(prepared.machines.get(name)).run(
            ["kill", "-0", str(holder)]).exit_code == 0, "the same tree, recovered"
        refused = cli("down", name)
        assert refused.returncode == 1 and \
            f"{name} is busy: guard (operation" in refused.stderr, refused.stderr

        # Its kernel panics in turn: the first dead VM is kept, this one is NAME-dead-2.
        inject(fault_target(prepared, name), Panic())
        ready, _, _ = select.select([second.stdout], [], [], 600)
        assert ready, (tmp_path / "guard1.err").read_text()
        decision = json.loads(second.stdout.readline())
        assert (decision["fault"], decision["action"], decision["outcome"]) == \
            ("panic", "recover", "recovered"), decision
        assert prepared.machines.get(f"{name}-dead-2").status() in KEPT_FOR_DIAGNOSIS
        assert redis_cli(prepared, address, "GET", "kept") == "yes"
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
        kept = [op for op in History.at(prepared.state).recent(vm=name, limit=10)
                if op.kind == "guard"]
        assert [op.outcome for op in kept[:2]] == ["done", "interrupted"], "each run on record"
        assert [d["fault"] for d in kept[0].report["decisions"]] == ["stopped", "panic"]
    finally:
        for guard_process in guards:
            if guard_process.poll() is None:
                guard_process.kill()
                guard_process.wait()
        for vm in (name, f"{name}-dead", f"{name}-dead-2", f"{name}-standby",
                   f"{name}-next"):
            if any(m.name == vm for m in prepared.machines.all()):
                lifecycle.down(prepared, vm)
