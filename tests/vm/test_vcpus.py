"""vCPU run times from the host: a busy vCPU runs, an idle one barely, a dead QEMU reads nothing."""

from __future__ import annotations

import os
import signal

from transmigrate.config import ACTIVE_KERNEL
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.polling import wait_for
from transmigrate.vm.vcpus import VcpuClock


def test_vcpu_clock_follows_what_each_vcpu_runs(prepared: Host) -> None:
    machine = lifecycle.up(prepared, "t-vcpus", ACTIVE_KERNEL, memory_mib=256, cpus=2).machine
    try:
        clock = VcpuClock(machine)
        before = clock.sample()
        spin = lifecycle.exec_in(prepared, "t-vcpus", [
            "taskset", "-c", "1", "timeout", "2", "sh", "-c", "while :; do :; done"])
        after = clock.sample()
        assert spin.exit_code == 124, spin.text
        ran = {cpu: (after[cpu] - before[cpu]) / 1e9 for cpu in after}
        assert sorted(ran) == [0, 1]
        assert ran[1] >= 1.0, ran
        assert ran[0] < ran[1] / 2, ran
        pid = machine.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: clock.sample() == {}, timeout=10,
                 what="the threads of a dead QEMU did not stop giving figures")
        clock.close()
    finally:
        lifecycle.down(prepared, "t-vcpus")
