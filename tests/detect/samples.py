"""Building sample streams for detector tests, in the shapes the readers return."""

from __future__ import annotations

from transmigrate.detect.events import Sample
from transmigrate.introspect.counters import Counters
from transmigrate.introspect.cpus import CpuSample, CpuState
from transmigrate.introspect.mm import MemorySample, ZoneState
from transmigrate.introspect.panic import KernelHealth
from transmigrate.introspect.tasks import Task, TaskSample

MS = 1_000_000
MIB = 1024 * 1024


def cpu(n: int, switches: int, *, preempt: int = 0, idle: bool = False,
        pid: int = 100, comm: str = "worker", timer: int = 0) -> CpuState:
    return CpuState(cpu=n, context_switches=switches, clock_ns=0, nr_running=1,
                    timer_interrupts=timer, watchdog_touch_ts=None, hrtimer_interrupts=None,
                    preempt_count=preempt, current_pid=0 if idle else pid,
                    current_comm="swapper/0" if idle else comm, idle=idle)


def cpus(t_ms: float, *states: CpuState, ran_ms: dict[int, float] | None = None) -> Sample:
    """``ran_ms``: how long each vCPU's thread has run on the host so far."""
    vcpus = {n: int(ms * MS) for n, ms in ran_ms.items()} if ran_ms is not None else None
    return Sample(int(t_ms * MS), cpus=CpuSample(0, states, int(t_ms * MS)), vcpus=vcpus)


def counters(t_ms: float, forks: int, processes: int) -> Sample:
    return Sample(int(t_ms * MS), counters=Counters(forks, processes, processes, int(t_ms * MS)))


def memory(t_ms: float, free_mib: int, total_mib: int = 1024, low_mib: int = 8) -> Sample:
    zone = ZoneState(0, "Normal", total_mib * MIB, free_mib * MIB, low_mib * MIB // 2,
                     low_mib * MIB, low_mib * MIB * 2)
    return Sample(int(t_ms * MS), memory=MemorySample(total_mib * MIB, free_mib * MIB, (zone,),
                                                      int(t_ms * MS)))


def task(pid: int, state: str, comm: str = "cat", kernel_thread: bool = False,
         ppid: int = 1) -> Task:
    return Task(pid=pid, tgid=pid, comm=comm, state=state, ppid=ppid,
                kernel_thread=kernel_thread, address=0xFFFF_0000_0000 + pid * 0x1000)


def tasks(t_ms: float, *items: Task) -> Sample:
    return Sample(int(t_ms * MS), tasks=TaskSample(items, int(t_ms * MS)))


def health(t_ms: float, panic_cpu: int = -1, tainted: int = 0) -> Sample:
    return Sample(int(t_ms * MS), health=KernelHealth(panic_cpu, tainted, int(t_ms * MS)))
