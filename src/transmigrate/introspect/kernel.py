"""Attaching to a running guest kernel: its memory, symbols and types, resolved once.

Types and symbols come from the DWARF in Debian's ``linux-image-<release>-dbg``
package, fetched by the kernel catalog and cached per kernel build next to the
kernel (``kernels/<release>/vmlinux``). We do not use the BTF the kernel carries
in its own memory because drgn 0.3.0 cannot read BTF; DWARF also gives what BTF
lacks (the scheduler text bounds, enum constants of every subsystem). drgn
checks the vmlinux's build ID against the guest's vmcoreinfo, so a wrong file is
refused rather than misread.

drgn is used once, at attach time, to resolve addresses and member offsets, and
on demand for slow things (stack traces). Sampling then reads fields with
``struct`` straight off the mapped RAM file: a drgn object walk costs
milliseconds, a ``struct.unpack_from`` at a known offset costs a fraction of a
microsecond. Kernel virtual addresses are translated without page tables where
the kernel maps memory linearly (the direct map at ``page_offset_base``, the
kernel image at its load address); anything else goes through drgn's page-table
walk.
"""

from __future__ import annotations

import contextlib
import operator
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import drgn
from drgn.helpers.linux.cpumask import for_each_possible_cpu
from drgn.helpers.linux.kallsyms import load_module_kallsyms
from drgn.helpers.linux.mm import follow_phys

from transmigrate.errors import IntrospectionError, TransmigrateError
from transmigrate.introspect.ram import GuestRam
from transmigrate.introspect.vmcoreinfo import VmcoreInfo, find_vmcoreinfo
from transmigrate.vm.kernels import KernelCatalog
from transmigrate.vm.machine import Machine

__all__ = ["Guest", "Record", "attach", "debug_vmlinux", "drgn_errors"]

_PLATFORM = drgn.Platform(drgn.Architecture.X86_64,
                          drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN)
_PAGE = 4096
_INTEGER_FORMATS = {(1, False): "B", (1, True): "b", (2, False): "H", (2, True): "h",
                    (4, False): "I", (4, True): "i", (8, False): "Q", (8, True): "q"}
_PATH_PART = re.compile(r"^(\w*)((?:\[\w+\])*)$")
_DRGN_ERRORS = (drgn.FaultError, drgn.ObjectAbsentError, LookupError, ValueError,
                OverflowError, TypeError)


@contextlib.contextmanager
def drgn_errors(what: str) -> Iterator[None]:
    """Turn what drgn raises on unexpected guest memory into one clear error."""
    try:
        yield
    except _DRGN_ERRORS as exc:
        raise IntrospectionError(f"{what}: {exc}") from exc


def debug_vmlinux(release: str, catalog: KernelCatalog) -> Path:
    """The DWARF vmlinux of ``release``, downloaded into the kernel cache on first use."""
    try:
        return catalog.fetch(release, debug=True).vmlinux_debug
    except TransmigrateError as exc:
        raise IntrospectionError(f"no debug info for guest kernel {release}: {exc}") from exc


def attach(target: Machine | Path, vmlinux: Path | None = None, *,
           catalog: KernelCatalog | None = None) -> Guest:
    """Attach to a running VM (or a RAM file): find its kernel and load its types.

    Without ``vmlinux``, the kernel's debug info is fetched through ``catalog``.
    """
    if isinstance(target, Machine):
        if not target.alive():
            raise IntrospectionError(f"vm {target.name!r} is down: no guest memory to read")
        ram_path = target.ram_path
    else:
        ram_path = target
    if not ram_path.is_file():
        raise IntrospectionError(f"no guest RAM file at {ram_path}: is the VM running?")
    info = find_vmcoreinfo(ram_path)
    if vmlinux is None:
        if catalog is None:
            raise IntrospectionError("attach needs a vmlinux or a kernel catalog to fetch it")
        vmlinux = debug_vmlinux(info.osrelease, catalog)
    elif not vmlinux.is_file():
        raise IntrospectionError(f"no debug vmlinux at {vmlinux}")
    ram = GuestRam(ram_path)
    try:
        return Guest(ram, info, _program(ram, info, vmlinux), vmlinux)
    except BaseException:
        ram.close()
        raise


def _segment_reader(buffer: Any, file_offset: int) -> Callable[[int, int, int, bool], bytes]:
    def read(address: int, count: int, offset: int, physical: bool) -> bytes:
        start = file_offset + offset
        return bytes(buffer[start:start + count])
    return read


def _program(ram: GuestRam, info: VmcoreInfo, vmlinux: Path) -> drgn.Program:
    prog = drgn.Program(_PLATFORM)
    for segment in ram.segments:
        prog.add_memory_segment(segment.physical, segment.size,
                                _segment_reader(ram.buffer, segment.file_offset), True)
    with drgn_errors(f"cannot load {vmlinux} for guest kernel {info.osrelease}"):
        prog.set_linux_kernel_custom(info.raw, True)
        prog.set_enabled_debug_info_finders([])
        with contextlib.suppress(drgn.MissingDebugInfoError):
            prog.load_debug_info([str(vmlinux)])
    if prog.main_module().debug_file_path is None:
        raise IntrospectionError(
            f"{vmlinux} is not the debug info of guest kernel {info.osrelease} "
            f"(build id {info.fields.get('BUILD-ID', 'unknown')})")
    return prog


class Guest:
    """An attached guest kernel: fast address translation and reads, plus its drgn Program."""

    def __init__(self, ram: GuestRam, vmcoreinfo: VmcoreInfo, prog: drgn.Program,
                 vmlinux: Path) -> None:
        self.ram = ram
        self.vmcoreinfo = vmcoreinfo
        self.prog = prog
        self.vmlinux = vmlinux
        with drgn_errors("cannot resolve the guest kernel's memory map"):
            self._init_mm = prog["init_mm"].address_of_()
            self.page_offset = int(prog["page_offset_base"])
            self._direct_end = self.page_offset + max(s.end for s in ram.segments)
            self._image_start: int = prog.symbol("_text").address
            self._image_end: int = prog.symbol("_end").address
            self._image_delta: int = int(follow_phys(self._init_mm, self._image_start)) \
                - self._image_start
            self._check_ram_layout()
            self.possible_cpus = tuple(for_each_possible_cpu(prog))
            offsets = prog["__per_cpu_offset"]
            self.per_cpu_offsets = {cpu: int(offsets[cpu]) for cpu in self.possible_cpus}
            self._online_mask = prog["__cpu_online_mask"].address_
            self._online_words = struct.Struct(f"<{max(self.possible_cpus) // 64 + 1}Q")
        self._module_symbols: drgn.SymbolIndex | None = None

    def module_symbol(self, address: int) -> str | None:
        """The module function at ``address``, from the kernel's own kallsyms of its
        modules (we have DWARF for vmlinux only). The table is read again on a miss,
        since modules load while we watch; misses are rare (a new blocked task)."""
        for reread in (False, True):
            if self._module_symbols is None or reread:
                with drgn_errors("cannot read the kernel's module symbols"):
                    self._module_symbols = load_module_kallsyms(self.prog)
            found = self._module_symbols(self.prog, None, address, True)
            if found:
                return str(found[0].name)
        return None

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.ram.close()

    @property
    def release(self) -> str:
        return self.vmcoreinfo.osrelease

    def _check_ram_layout(self) -> None:
        """Every RAM range of the kernel's e820 map must be in our RAM file segments."""
        table = self.prog["e820_table"]
        ram_type = self.prog.constant("E820_TYPE_RAM").value_()
        for index in range(min(int(table.nr_entries), len(table.entries))):
            entry = table.entries[index]
            start, size = int(entry.addr), int(entry.size)
            if int(entry.type) == ram_type and not self.ram.covers(start, size):
                raise IntrospectionError(
                    f"guest RAM {start:#x}+{size:#x} is not where this RAM file layout "
                    f"puts it ({self.ram.size >> 20} MiB on q35); cannot read this guest")

    def physical(self, address: int) -> int:
        """The guest-physical address of a kernel virtual address."""
        if self.page_offset <= address < self._direct_end:
            return address - self.page_offset
        if self._image_start <= address < self._image_end:
            return address + self._image_delta
        with drgn_errors(f"kernel address {address:#x} is not mapped"):
            return int(follow_phys(self._init_mm, address))

    def offset(self, address: int, size: int) -> int:
        """RAM-file offset of ``size`` bytes at a kernel virtual address."""
        if self.page_offset <= address < self._direct_end:
            return self.ram.offset(address - self.page_offset, size)
        if self._image_start <= address and address + size <= self._image_end:
            return self.ram.offset(address + self._image_delta, size)
        if address // _PAGE != (address + size - 1) // _PAGE:
            raise IntrospectionError(
                f"{size} bytes at {address:#x} cross a page outside linear kernel memory")
        return self.ram.offset(self.physical(address), size)

    def read(self, address: int, size: int) -> bytes:
        start = self.offset(address, size)
        return bytes(self.ram.buffer[start:start + size])

    def address_of(self, name: str) -> int:
        """Address of a kernel global (for a per-CPU variable: its offset in the per-CPU area),
        or of a loaded module's global, from the kernel's kallsyms."""
        with contextlib.suppress(LookupError):
            address: int = self.prog.symbol(name).address
            return address
        with drgn_errors(f"cannot read the kernel's module symbols for {name!r}"):
            self._module_symbols = load_module_kallsyms(self.prog)
            found = self._module_symbols(self.prog, name, None, True)
        if not found:
            raise IntrospectionError(f"guest kernel {self.release} has no symbol {name!r} "
                                     "in vmlinux or any loaded module")
        return int(found[0].address)

    def has(self, type_name: str, member: str) -> bool:
        """Whether the kernel's ``type_name`` has ``member``: picks between kernel versions."""
        try:
            drgn.offsetof(self.prog.type(type_name), member)
        except LookupError:
            return False
        return True

    def online_cpus(self) -> tuple[int, ...]:
        """The CPUs online now (read from ``__cpu_online_mask``, cheap)."""
        words = self._online_words.unpack_from(
            self.ram.buffer, self.offset(self._online_mask, self._online_words.size))
        return tuple(cpu for cpu in self.possible_cpus if words[cpu // 64] >> (cpu % 64) & 1)

    def record(self, kind: str | drgn.Type, members: Sequence[str]) -> Record:
        return Record(self, kind, members)

    def variable(self, name: str) -> drgn.Object | None:
        """A kernel global, or None when this kernel build has no such variable."""
        try:
            return self.prog.variable(name)
        except LookupError:
            return None

    def per_cpu_addresses(self, name: str) -> dict[int, int]:
        """Where each possible CPU's copy of the per-CPU variable ``name`` lies."""
        with drgn_errors(f"guest kernel {self.release} has no per-CPU {name!r}"):
            base = self.prog.variable(name).address_
            assert base is not None
        return {cpu: base + offset for cpu, offset in self.per_cpu_offsets.items()}


def _format(kind: drgn.Type) -> str:
    kind = kind.unaliased()
    if kind.kind == drgn.TypeKind.STRUCT and [m.name for m in kind.members] == ["counter"]:
        return _format(kind.members[0].type)  # atomic_t, atomic_long_t, atomic64_t
    if kind.kind == drgn.TypeKind.ENUM and kind.type is not None:
        return _format(kind.type)
    if kind.kind == drgn.TypeKind.BOOL:
        return "?"
    if kind.kind == drgn.TypeKind.INT:
        return _INTEGER_FORMATS[(kind.size, bool(kind.is_signed))]
    if kind.kind == drgn.TypeKind.POINTER:
        return "Q"
    if (kind.kind == drgn.TypeKind.ARRAY and kind.length is not None
            and kind.type.unaliased().kind == drgn.TypeKind.INT
            and kind.type.unaliased().size == 1):
        return f"{kind.length}s"
    raise IntrospectionError(f"cannot read a member of type {kind} as plain data")


def _member(base: drgn.Object, path: str) -> drgn.Object:
    """``base.a.b[3].c[NR_X]``: designators may index with a kernel enum constant.

    The empty path is the object itself (a per-CPU counter, say).
    """
    obj = base
    for part in path.split(".") if path else ():
        match = _PATH_PART.match(part)
        if match is None:
            raise IntrospectionError(f"bad member path {path!r}")
        if match.group(1):
            obj = obj.member_(match.group(1))
        for index in re.findall(r"\[(\w+)\]", match.group(2)):
            value = int(index) if index.isdigit() else obj.prog_.constant(index).value_()
            obj = obj[value]
    return obj


class Record:
    """Chosen members of one kernel type, read from guest memory with one ``unpack_from``.

    Offsets and formats come from DWARF, so the same record reads every kernel version.
    """

    def __init__(self, guest: Guest, kind: str | drgn.Type, members: Sequence[str]) -> None:
        self.guest = guest
        self.members = tuple(members)
        type_name = str(kind) if isinstance(kind, str) else kind.type_name()
        with drgn_errors(f"guest kernel {guest.release} has no {type_name} {members}"):
            base = drgn.Object(guest.prog, guest.prog.type(kind) if isinstance(kind, str)
                               else kind, address=0)
            fields = []
            for index, path in enumerate(members):
                member = _member(base, path)
                if member.bit_field_size_ is not None:
                    raise IntrospectionError(f"{type_name}.{path} is a bit field")
                offset = member.address_
                assert offset is not None, "a member of an object in memory has an address"
                fields.append((offset, _format(member.type_), index))
        fields.sort()
        layout, position = ["<"], 0
        for offset, code, _ in fields:
            if offset < position:
                raise IntrospectionError(f"{type_name} members {members} overlap")
            layout.append(f"{offset - position}x{code}")
            position = offset + struct.calcsize(f"<{code}")
        self.struct = struct.Struct("".join(layout))
        self.size = position
        order = [0] * len(fields)
        for sorted_index, (_, _, index) in enumerate(fields):
            order[index] = sorted_index
        self._reorder = (operator.itemgetter(*order) if len(order) > 1
                         else operator.itemgetter(slice(None)))

    def read(self, address: int) -> tuple[Any, ...]:
        """The members at ``address``, in the order they were asked for."""
        values: tuple[Any, ...] = self._reorder(
            self.struct.unpack_from(self.guest.ram.buffer, self.guest.offset(address, self.size)))
        return values
