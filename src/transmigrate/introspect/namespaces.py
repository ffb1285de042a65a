"""A process's namespaces as a stopped kernel holds them.

A declared service runs in an IPC namespace of its own (so that its SysV objects
move with it, and no other's); CRIU makes a new one at restore with the limits
the old one had. Every other namespace must be the VM's own: recovery does not
rebuild mount, network, UTS, PID, user, cgroup or time namespaces yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import drgn

from transmigrate.errors import Unrecoverable

__all__ = ["IpcNamespaceState", "read_ipc_namespace"]

_INTEGERS = ("msg_ctlmax", "msg_ctlmnb", "msg_ctlmni", "shm_ctlmax", "shm_ctlall",
             "shm_ctlmni", "shm_rmid_forced", "mq_queues_max", "mq_msg_max",
             "mq_msgsize_max", "mq_msg_default", "mq_msgsize_default")
"""The limits of an IPC namespace (its sysctls), as CRIU's ipc_var_entry names them."""
_OTHER_NAMESPACES = {"mnt_ns": "mount", "net_ns": "network", "uts_ns": "UTS",
                     "cgroup_ns": "cgroup", "time_ns": "time"}
_IPC_KINDS = ("semaphore set", "message queue", "shared memory segment")
"""ipc_namespace.ids[] in the kernel's order (IPC_SEM_IDS, IPC_MSG_IDS, IPC_SHM_IDS)."""


@dataclass(frozen=True)
class IpcNamespaceState:
    key: int
    """The ``struct ipc_namespace``: one image per namespace, shared by its processes."""
    variables: dict[str, object]
    """CRIU's ipc_var_entry."""


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
