"""Named kernel locks, read from guest memory: held or free, by whom, and who waits.

The kernel does not list its locks, so a lock is known by the global it lives
in: a vmlinux global (its type comes from DWARF) or a loaded module's global
(its address from the kernel's kallsyms; say its kind, ``name:spinlock``).
Layouts come from DWARF; what the words mean comes from kernel/locking/:

- spinlock (qspinlock): the ``locked`` byte, the ``pending`` byte (one waiter
  spinning on the lock word) and the MCS queue's ``tail``, which names the last
  CPU to queue as ``(cpu + 1) << 2 | nesting``. Spinlocks record no owner, and
  in a VM without paravirtual spinlocks (TCG, for one) x86 spins with plain
  test-and-set (``virt_spin_lock``), which leaves waiters no trace in the word.
- mutex: ``owner`` is the holder's task_struct, flag bits in its low 3 bits
  (bit 0: there are waiters).
- rwlock (qrwlock): ``cnts`` counts readers above bit 9; the low byte is the
  writer's (0xff held), bit 8 a waiting writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from transmigrate.errors import IntrospectionError
from transmigrate.introspect.kernel import Guest, Record

__all__ = ["KINDS", "LockReader", "LockState", "parse_lock"]

KINDS = {"spinlock": "spinlock_t", "mutex": "struct mutex", "rwlock": "rwlock_t"}
"""The lock kinds we can read, and the kernel type of each."""
_TYPE_KINDS = {"spinlock_t": "spinlock", "raw_spinlock_t": "spinlock",
               "struct mutex": "mutex", "rwlock_t": "rwlock"}
_WORD = (1 << 64) - 1
_MUTEX_FLAGS = 0x07
_MUTEX_FLAG_WAITERS = 0x01
_QR_SHIFT = 9
_QW_WAITING = 0x100
_QW_LOCKED = 0xFF


@dataclass(frozen=True, slots=True)
class LockState:
    name: str
    kind: str
    held: bool
    waiters: bool
    """Someone waits: a pending or queued spinner, a mutex waiter, a waiting writer."""
    holder_pid: int | None = None
    """mutex: the task that holds it."""
    holder_comm: str | None = None
    last_queued_cpu: int | None = None
    """spinlock: the last CPU in its queue of spinners."""
    readers: int | None = None
    """rwlock: how many readers hold it."""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parse_lock(text: str) -> tuple[str, str | None]:
    """``'name'`` or ``'name:kind'`` -> (name, kind or None)."""
    name, _, kind = text.partition(":")
    if not name or (kind and kind not in KINDS):
        raise IntrospectionError(f"cannot read lock {text!r}: use NAME or NAME:KIND, "
                                 f"KIND one of {', '.join(KINDS)}")
    return name, kind or None


class LockReader:
    """Reads the locks named at construction; unknown names are refused there."""

    def __init__(self, guest: Guest, locks: Sequence[str]) -> None:
        self.guest = guest
        self._locks: list[tuple[str, str, int, Record]] = []
        for text in locks:
            name, kind = parse_lock(text)
            type_name = KINDS[kind] if kind else self._type_of(name)
            self._locks.append((name, _TYPE_KINDS[type_name], guest.address_of(name),
                                self._record(type_name)))
        self._task = Record(guest, "struct task_struct", ("pid", "comm"))

    def _type_of(self, name: str) -> str:
        variable = self.guest.variable(name)
        if variable is None:
            raise IntrospectionError(f"{name!r} is not a vmlinux global with a known type: "
                                     f"name its kind, {name}:spinlock (or mutex, rwlock)")
        type_name: str = variable.type_.type_name()
        if type_name not in _TYPE_KINDS:
            raise IntrospectionError(f"{name!r} is a {type_name}, not a lock we can read")
        return type_name

    def _record(self, type_name: str) -> Record:
        kind = _TYPE_KINDS[type_name]
        if kind == "spinlock":
            if not self.guest.has("struct qspinlock", "pending"):
                raise IntrospectionError("this kernel's qspinlock has no pending byte "
                                         "(NR_CPUS >= 16K): not supported")
            lock = "raw_lock" if type_name == "raw_spinlock_t" else "rlock.raw_lock"
            return Record(self.guest, type_name, (f"{lock}.locked", f"{lock}.pending",
                                                  f"{lock}.tail"))
        if kind == "mutex":
            return Record(self.guest, type_name, ("owner",))
        return Record(self.guest, type_name, ("raw_lock.cnts",))

    def sample(self) -> tuple[LockState, ...]:
        return tuple(self._read(name, kind, address, record)
                     for name, kind, address, record in self._locks)

    def _read(self, name: str, kind: str, address: int, record: Record) -> LockState:
        values = record.read(address)
        if kind == "spinlock":
            locked, pending, tail = values
            return LockState(name, kind, held=locked != 0, waiters=bool(pending or tail),
                             last_queued_cpu=(tail >> 2) - 1 if tail else None)
        if kind == "mutex":
            owner = values[0] & _WORD  # atomic_long_t is signed
            task = owner & ~_MUTEX_FLAGS
            if not task:
                return LockState(name, kind, held=False, waiters=False)
            pid, comm = self._task.read(task)
            return LockState(name, kind, held=True,
                             waiters=bool(owner & _MUTEX_FLAG_WAITERS), holder_pid=pid,
                             holder_comm=comm.split(b"\0", 1)[0].decode(errors="replace"))
        counts = values[0]
        readers = counts >> _QR_SHIFT
        return LockState(name, kind, held=readers > 0 or (counts & _QW_LOCKED) == _QW_LOCKED,
                         waiters=bool(counts & _QW_WAITING), readers=readers)
