"""A process's namespaces as a stopped kernel holds them.

A declared service runs in an IPC namespace of its own (so that its SysV objects
move with it, and no other's); CRIU makes a new one at restore with the limits
the old one had. A process CRIU has restored once runs in a time namespace of its
own, whose offsets keep its clocks going on from where they were; its clocks are
the kernel's plus those offsets. Every other namespace must be the VM's own:
recovery does not rebuild mount, network, UTS, PID, user or cgroup namespaces yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import drgn

from transmigrate.errors import Unrecoverable

__all__ = ["IpcNamespaceState", "TimeNamespaceState", "read_ipc_namespace",
           "read_time_namespace"]

_INTEGERS = ("msg_ctlmax", "msg_ctlmnb", "msg_ctlmni", "shm_ctlmax", "shm_ctlall",
             "shm_ctlmni", "shm_rmid_forced", "mq_queues_max", "mq_msg_max",
             "mq_msgsize_max", "mq_msg_default", "mq_msgsize_default")
"""The limits of an IPC namespace (its sysctls), as CRIU's ipc_var_entry names them."""
_OTHER_NAMESPACES = {"mnt_ns": "mount", "net_ns": "network", "uts_ns": "UTS",
                     "cgroup_ns": "cgroup"}
_IPC_KINDS = ("semaphore set", "message queue", "shared memory segment")
"""ipc_namespace.ids[] in the kernel's order (IPC_SEM_IDS, IPC_MSG_IDS, IPC_SHM_IDS)."""


@dataclass(frozen=True)
class IpcNamespaceState:
    key: int
    """The ``struct ipc_namespace``: one image per namespace, shared by its processes."""
    variables: dict[str, object]
    """CRIU's ipc_var_entry."""


@dataclass(frozen=True)
class TimeNamespaceState:
    key: int
    """The ``struct time_namespace``: a tree's processes must share one."""
    monotonic_ns: int
    boottime_ns: int
    """Its offsets: what it adds to the kernel's CLOCK_MONOTONIC and CLOCK_BOOTTIME."""


def read_time_namespace(prog: drgn.Program, task: drgn.Object) -> TimeNamespaceState | None:
    """The time namespace of ``task`` if it is not the VM's own, else None. Raise
    :class:`Unrecoverable` if its children are to get another one (not rebuilt)."""
    proxy = task.nsproxy
    namespace = proxy.time_ns
    if proxy.time_ns_for_children.value_() != namespace.value_():
        raise Unrecoverable("has a time namespace set for its children (not supported yet)")
    if namespace.value_() == prog["init_time_ns"].address_of_().value_():
        return None
    offsets = namespace.offsets
    return TimeNamespaceState(key=namespace.value_(),
                              monotonic_ns=_nanoseconds(offsets.monotonic),
                              boottime_ns=_nanoseconds(offsets.boottime))


def _nanoseconds(timespec: drgn.Object) -> int:
    return int(timespec.tv_sec) * 1_000_000_000 + int(timespec.tv_nsec)


def read_ipc_namespace(prog: drgn.Program, task: drgn.Object) -> IpcNamespaceState | None:
    """The IPC namespace of ``task`` if it is not the VM's own, else None. Raise
    :class:`Unrecoverable` for another namespace of its own, or SysV or POSIX IPC
    objects in its IPC namespace (not rebuilt yet)."""
    proxy, init = task.nsproxy, prog["init_nsproxy"]
    for member, name in _OTHER_NAMESPACES.items():
        if proxy.member_(member).value_() != init.member_(member).value_():
            raise Unrecoverable(f"lives in a {name} namespace of its own (not supported yet)")
    if task.cred.user_ns.value_() != prog["init_user_ns"].address_of_().value_():
        raise Unrecoverable("lives in a user namespace of its own (not supported yet)")
    namespace = proxy.ipc_ns
    if namespace.value_() == init.ipc_ns.value_():
        return None
    for index, kind in enumerate(_IPC_KINDS):
        count = int(namespace.ids[index].in_use)
        if count:
            raise Unrecoverable(f"has {count} SysV {kind}(s) in its IPC namespace "
                                "(not supported yet)")
    if int(namespace.mq_queues_count):
        raise Unrecoverable("has POSIX message queues in its IPC namespace (not supported yet)")
    variables: dict[str, object] = {
        "sem_ctls": [int(value) for value in namespace.sem_ctls],
        "auto_msgmni": 0,  # gone from the kernel since 4.x; CRIU still asks for it
        **{name: int(namespace.member_(name)) for name in _INTEGERS}}
    return IpcNamespaceState(key=namespace.value_(), variables=variables)
