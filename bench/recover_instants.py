"""At how many instants is a busy service recoverable: redis under load, read from the
host at random instants.

redis (AOF on, on the data volume) on 6.1 with 2 CPUs, our client INCRementing on one
connection in lockstep (its busiest case: every reply is a write on that connection).
At ``--instants`` random instants the VM is stopped (QMP ``stop``, as a dying kernel's
CPUs stop at an arbitrary point), the system call each of redis's threads was inside is
noted, redis is read out of the stopped VM's memory as `recover` reads it (the host-side
checkpoint, CRIU images written), and the VM runs on. Per instant, the verdict: read
whole, read with its client's connection cut (redis was reading or writing on it), or
refused (with the reason). The client checks its own replies throughout: it must see
no error and no reply lost or repeated (the stops are only stops).

What a random instant means here is what a panic's or a deadlock's moment means: the
other CPU stops wherever it was.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from drgn.helpers.linux.pid import find_task, for_each_task_in_group

from transmigrate.config import ACTIVE_KERNEL, Service
from transmigrate.introspect.kernel import attach
from transmigrate.introspect.process import unfinished_call
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.orchestrate.recover import dump
from transmigrate.orchestrate.services import LoadClient, start_service

VM = "bench-instants"
_WAITING = {7: "poll", 202: "futex", 232: "epoll_wait"}
_NAMES = {0: "read", 1: "write", 75: "fdatasync", 96: "gettimeofday", 228: "clock_gettime",
          257: "openat"}


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _calls(host: Host, pid: int) -> list[str]:
    """The system calls redis's threads were inside (not waiting in), by name."""
    calls = []
    with attach(host.machines.get(VM), catalog=host.catalog) as guest:
        for thread in for_each_task_in_group(find_task(guest.prog, pid), include_self=True):
            number = unfinished_call(thread)
            if number is not None and number not in _WAITING:
                calls.append(_NAMES.get(number, str(number)))
    return calls


def run(instants: int) -> dict[str, Any]:
    host = Host.from_environment()
    service = Service("kv", VM, "redis-server", start=(
        "redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "",
        "--dir", "/data", "--appendonly", "yes"))
    lifecycle.up(host, VM, ACTIVE_KERNEL, memory_mib=512, cpus=2, progress=_progress)
    load = None
    try:
        start_service(host, service)
        machine = host.machines.get(VM)
        redis = int(host.agent(machine).sh("pgrep -ox redis-server").text)
        load = LoadClient(host, machine.record.ip)
        verdicts: collections.Counter[str] = collections.Counter()
        inside: collections.Counter[str] = collections.Counter()
        with tempfile.TemporaryDirectory() as images:
            for instant in range(instants):
                time.sleep(random.uniform(0.05, 0.4))
                machine.qmp("stop")
                calls = _calls(host, redis)
                report = dump(host, VM, [redis], Path(images) / str(instant))
                machine.qmp("cont")
                verdict = report.processes[0]
                outcome = ("refused: " + verdict.reason if verdict.verdict != "dumped"
                           else "connection cut" if verdict.losses else "whole")
                verdicts[outcome] += 1
                inside[f"{outcome} | inside {', '.join(calls) or 'no call'}"] += 1
                if instant % 25 == 24:
                    _progress(f"{instant + 1} instants: {dict(verdicts)}")
        summary = load.stop()
        load = None
    finally:
        if load is not None:
            load.stop()
        lifecycle.down(host, VM)
    refused = sum(n for outcome, n in verdicts.items() if outcome.startswith("refused"))
    return {"instants": instants, "verdicts": dict(verdicts), "by_call": dict(inside),
            "recoverable": round(1 - refused / instants, 4),
            "client": {k: summary[k] for k in ("replies", "errors", "out_of_order")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instants", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.instants)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['instants']} instants: recoverable at {result['recoverable']:.1%}")
    for outcome, count in sorted(result["by_call"].items(), key=lambda item: -item[1]):
        print(f"  {count:4}  {outcome}")
    print(f"client: {result['client']}")


if __name__ == "__main__":
    main()
