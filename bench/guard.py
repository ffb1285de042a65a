"""Guard against each fault, at several monitor intervals, against the operator's way.

Per fault and monitor interval: redis as a declared service with 10,000 keys under a
client's load (one connection, INCR in a loop), `guard` running with a warm standby on
the other kernel; the fault is injected and timed from the host: to the monitor's
detection, to guard's decision, and to redis answering on the standby (the decision
carried out). Then: the client's errors (requests lost), whether its connection went
on, and acknowledged writes lost (the counter against the client's last reply).

The operator's way, once per fault in the same run: the kernel's own detector
(soft-lockup and hung-task watchdogs set to panic, as an operator who reboots on them
would), then a fresh boot of the VM and redis started again from its AOF. Measured:
the injection to the kernel's panic (its detector), and to redis answering again.

Targets (issue 13): for the hang faults, the service answers on the standby before the
kernel's own detector fires; for every fault, sooner than reboot-and-restart, with no
acknowledged write lost. Orthros (recovery ~0.4 s, downtime up to ~1.5 s on KVM) is
compared as a ratio to reboot-and-restart on each side.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL, Service
from transmigrate.errors import TransmigrateError
from transmigrate.faults import (
    CONTROL_FILE,
    Deadlock,
    FaultSpec,
    ForkBomb,
    HungDriver,
    MemoryBomb,
    Oops,
    Panic,
    inject,
    load_module,
)
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.faults import fault_target
from transmigrate.orchestrate.guard import Decision, Policy, guard
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.services import (
    LoadClient,
    redis_answers,
    redis_cli,
    start_service,
)
from transmigrate.polling import wait_for

VM = "bench-guard"
SERVICE = Service("kv", VM, "redis-server", start=(
    "redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "",
    "--dir", "/data", "--appendonly", "yes"))
FAULTS: dict[str, FaultSpec] = {
    "deadlock-one-cpu": Deadlock(cpu=1), "deadlock-all-cpus": Deadlock(all_cpus=True),
    "hung-driver": HungDriver(readers=5), "fork-bomb": ForkBomb(seconds=30, mib=8),
    "memory-bomb": MemoryBomb(mib=4, delay_ms=100), "oops": Oops(), "panic": Panic()}
KERNEL_DETECTS = ("deadlock-one-cpu", "deadlock-all-cpus", "hung-driver", "oops", "panic")
"""The faults the kernel's own watchdogs can be set to panic on. None sees a fork bomb;
a memory bomb meets the OOM killer, which takes the bomb and panics nothing."""
ORTHROS_RECOVERY_S, ORTHROS_REBOOT_S = 1.5, 30.0
"""Orthros's longest downtime, and the reboot-and-restart it is weighed against
(its paper's order of magnitude for a VM reboot with a service restart)."""


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _boot(host: Host) -> str:
    lifecycle.up(host, VM, ACTIVE_KERNEL, memory_mib=512, cpus=2, progress=_progress)
    start_service(host, SERVICE)
    host.agent(host.machines.get(VM)).sh(
        "seq 1 10000 | awk '{print \"SET key:\" $1 \" \" $1}' | redis-cli --pipe",
        what="writing keys")
    return host.machines.get(VM).record.ip


def _clean(host: Host) -> None:
    for name in (VM, f"{VM}-dead", f"{VM}-standby", f"{VM}-next"):
        if any(m.name == name for m in host.machines.all()):
            lifecycle.down(host, name)


def _guarded(host: Host, fault: str, interval_ms: int) -> dict[str, Any]:
    address = _boot(host)
    stop, decisions, said, failed = threading.Event(), list[Decision](), list[str](), []

    def run() -> None:
        try:
            guard(host, VM, [SERVICE], Policy(standby_kernel=STANDBY_KERNEL,
                                               monitor=(f"interval={interval_ms}ms",)),
                  on_decision=decisions.append, progress=said.append, stop=stop)
        except TransmigrateError as exc:
            failed.append(exc)

    guarding = threading.Thread(target=run, name="guard")
    load = None
    try:
        guarding.start()
        wait_for(lambda: failed or f"guarding {VM}" in said, timeout=600,
                 what="guard did not start")
        load = LoadClient(host, address)
        time.sleep(2)
        injected_wall, injected = time.time(), time.monotonic()
        inject(fault_target(host, VM), FAULTS[fault])
        wait_for(lambda: failed or decisions, timeout=900, what="guard did not decide")
        done = time.monotonic()
        if failed:
            return {"error": str(failed[0]), "said": said[-5:]}
        decision = decisions[0]
        wait_for(lambda: redis_answers(host, address), timeout=120, what="redis did not answer")
        answered = time.monotonic()
        time.sleep(1)
        summary, load = load.stop(), None
        counter = int(redis_cli(host, address, "GET", "transmigrate:counter"))
        detected = decision.detected_at - injected_wall
        return {
            "action": decision.action, "outcome": decision.outcome,
            "inject_to_detect_s": round(detected, 3),
            "inject_to_decide_s": round(detected + decision.decision_seconds, 3),
            "inject_to_answer_s": round(max(done, answered) - injected, 3),
            "client_longest_silence_s": summary["max_gap_s"],
            "requests_lost": len(summary["errors"]) + summary["out_of_order"],
            "same_connection": summary["client_id_start"] == summary["client_id_end"],
            "acknowledged_writes_lost": max(0, summary["last_value"] - counter),
            "culprits_left_behind": len(decision.culprits),
            "culprit": decision.evidence.get("culprit_comm"), "detail": decision.detail,
            "steps": decision.steps}
    finally:
        stop.set()
        guarding.join(timeout=900)
        if load is not None:
            load.process.kill()
            load.process.wait()
        _clean(host)


def _kernel_detector(host: Host, fault: str) -> dict[str, Any]:
    """The kernel's own way: its watchdogs panic the VM, the operator reboots it and
    starts redis again (it loads its AOF)."""
    address = _boot(host)
    try:
        agent = host.agent(host.machines.get(VM))
        agent.sh("sysctl -qw kernel.softlockup_panic=1 kernel.hung_task_panic=1 "
                 "kernel.panic_on_oops=1 kernel.hardlockup_panic=1")
        target = fault_target(host, VM)
        if fault == "oops":  # it now panics the kernel under its writer: not waited for
            load_module(target)
            injected = time.monotonic()
            agent.spawn(["sh", "-c", f"echo oops > {CONTROL_FILE}"])
        else:
            injected = time.monotonic()
            inject(target, FAULTS[fault])
        machine = host.machines.get(VM)
        wait_for(lambda: machine.status() == "guest-panicked", timeout=600, interval=0.05,
                 what="the kernel's own detector did not fire")
        fired = time.monotonic() - injected
        host.machines.remove(machine, keep_network=True)
        lifecycle.up(host, VM, ACTIVE_KERNEL, memory_mib=512, cpus=2, progress=_progress)
        start_service(host, SERVICE)
        wait_for(lambda: redis_answers(host, address), timeout=300, what="redis did not answer")
        return {"inject_to_kernel_detector_s": round(fired, 3),
                "inject_to_answer_s": round(time.monotonic() - injected, 3)}
    finally:
        _clean(host)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--intervals", default="10,100,1000",
                        help="monitor intervals in ms, comma-separated")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    host = Host.from_environment()
    results: dict[str, Any] = {}
    for fault in args.faults.split(","):
        if fault not in FAULTS:
            parser.error(f"unknown fault {fault!r}")
        baseline = _kernel_detector(host, fault) if fault in KERNEL_DETECTS else {}
        runs = {f"guard at {ms} ms": _guarded(host, fault, int(ms))
                for ms in args.intervals.split(",")}
        results[fault] = {"kernel detector, reboot and restart": baseline, **runs}
        for run in runs.values():
            if baseline and "inject_to_answer_s" in run:
                run["answer / reboot-and-restart"] = round(
                    run["inject_to_answer_s"] / baseline["inject_to_answer_s"], 3)
                run["before the kernel's detector"] = \
                    run["inject_to_answer_s"] < baseline["inject_to_kernel_detector_s"]
        print(f"{fault}: {json.dumps(results[fault])}", file=sys.stderr, flush=True)
    results["orthros downtime / reboot-and-restart"] = round(
        ORTHROS_RECOVERY_S / ORTHROS_REBOOT_S, 3)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for fault, result in results.items():
        if not isinstance(result, dict):
            print(f"{fault}: {result}")
            continue
        baseline = result.pop("kernel detector, reboot and restart")
        print(f"{fault}: the kernel's detector at {baseline['inject_to_kernel_detector_s']} s, "
              f"reboot and restart answers at {baseline['inject_to_answer_s']} s" if baseline
              else f"{fault}: the kernel has no detector for it")
        for way, run in result.items():
            if "error" in run:
                print(f"  {way}: failed: {run['error']}")
                continue
            ratio = (f" ({run['answer / reboot-and-restart']}x reboot-and-restart)"
                     if baseline else "")
            print(f"  {way}: {run['action']} ({run['outcome']}): detected "
                  f"{run['inject_to_detect_s']} s, decided {run['inject_to_decide_s']} s, "
                  f"answering {run['inject_to_answer_s']} s{ratio}, "
                  f"{run['requests_lost']} requests and {run['acknowledged_writes_lost']} "
                  f"acknowledged writes lost, same connection: {run['same_connection']}")


if __name__ == "__main__":
    main()
