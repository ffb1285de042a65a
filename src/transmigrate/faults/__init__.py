"""Fault injection: the research's three faults and the kernel's own crashes, for real.

- ``deadlock``: a kernel thread ``tm_deadlock/CPU`` bound to one CPU takes the
  spinlock ``tm_fault_lock`` and takes it again, spinning forever in the kernel
  with preemption off (optionally interrupts off too). It cannot be cleared.
- ``hung-driver``: the misc device ``/dev/tm_hang`` whose ``read()`` sleeps
  uninterruptibly in ``tm_hang_read`` and is never woken, even after a write.
- ``fork-bomb``: ``tm-forkbomb``, a static program that forks without bound,
  each child touching 16 MiB, in its own session, bounded by a duration.
- ``memory-bomb``: the same program with ``--hog``: one process that allocates and
  touches 8 MiB every 100 ms and keeps it, until the OOM killer takes it.
- ``oops``: ``BUG()`` in the module's ``tm_oops``; the kernel runs on, tainted.
- ``panic``: ``panic()`` through ``/proc/sysrq-trigger``; QEMU pauses the VM.

Deadlock, hung driver and oops live in one kernel module (``faults/transmigrate_faults.c`` at
the repository's root) built on the host against Debian's headers for each
kernel release (:func:`build_module`) and loaded through the guest agent.

A fault is described by its spec (:mod:`.specs`) and injected into a
:class:`FaultTarget`: one guest's agent and kernel. This package knows no VM
names; :mod:`transmigrate.orchestrate.faults` finds the guest by name.
"""

from transmigrate.faults.build import (
    FORKBOMB_NAME,
    MODULE_NAME,
    SOURCE_DIR,
    build_forkbomb,
    build_module,
)
from transmigrate.faults.inject import (
    CONTROL_FILE,
    DEADLOCK_LOCK,
    DEADLOCK_THREAD,
    GUEST_DIR,
    HANG_DEVICE,
    HANG_FUNCTION,
    OOPS_FUNCTION,
    ClearReport,
    FaultTarget,
    InjectReport,
    clear,
    fault_status,
    inject,
    load_module,
    session_pids,
)
from transmigrate.faults.specs import (
    FAULTS,
    Deadlock,
    FaultSpec,
    ForkBomb,
    HungDriver,
    MemoryBomb,
    Oops,
    Panic,
    spec_for,
)

__all__ = [
    "CONTROL_FILE",
    "DEADLOCK_LOCK",
    "DEADLOCK_THREAD",
    "FAULTS",
    "FORKBOMB_NAME",
    "GUEST_DIR",
    "HANG_DEVICE",
    "HANG_FUNCTION",
    "MODULE_NAME",
    "OOPS_FUNCTION",
    "SOURCE_DIR",
    "ClearReport",
    "Deadlock",
    "FaultSpec",
    "FaultTarget",
    "ForkBomb",
    "HungDriver",
    "InjectReport",
    "MemoryBomb",
    "Oops",
    "Panic",
    "build_forkbomb",
    "build_module",
    "clear",
    "fault_status",
    "inject",
    "load_module",
    "session_pids",
    "spec_for",
]
