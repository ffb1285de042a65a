"""Finding the guest kernel's vmcoreinfo in its RAM file.

The kernel keeps a page of ``KEY=value`` lines (``OSRELEASE=``, ``KERNELOFFSET=``,
``SYMBOL(...)=``, ...) that crash tools use to make sense of a memory image. It is
the first thing a monitor needs, and it proves the RAM file is the guest's.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

from transmigrate.errors import IntrospectionError

__all__ = ["VmcoreInfo", "find_vmcoreinfo"]

PAGE = 4096
_MARKER = b"OSRELEASE="


@dataclass(frozen=True)
class VmcoreInfo:
    """The parsed vmcoreinfo page and where it lies in guest-physical memory."""

    physical_address: int
    fields: dict[str, str]
    raw: bytes

    @property
    def osrelease(self) -> str:
        return self.fields["OSRELEASE"]

    @property
    def kernel_offset(self) -> int:
        """The KASLR slide of the kernel text."""
        return int(self.fields.get("KERNELOFFSET", "0"), 16)

    def symbol(self, name: str) -> int:
        return int(self.fields[f"SYMBOL({name})"], 16)


def _parse(page: bytes) -> dict[str, str]:
    text = page.split(b"\0", 1)[0].decode("ascii", errors="replace")
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


def find_vmcoreinfo(ram_file: Path) -> VmcoreInfo:
    """Scan the RAM file for the page-aligned vmcoreinfo data."""
    try:
        with open(ram_file, "rb") as handle, \
                mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as memory:
            offset = memory.find(_MARKER)
            while offset != -1:
                if offset % PAGE == 0:
                    page = memory[offset:offset + PAGE]
                    fields = _parse(page)
                    if "PAGESIZE" in fields:
                        return VmcoreInfo(offset, fields, page.split(b"\0", 1)[0])
                offset = memory.find(_MARKER, offset + 1)
    except (OSError, ValueError) as exc:
        raise IntrospectionError(f"cannot read guest RAM {ram_file}: {exc}") from exc
    raise IntrospectionError(f"no vmcoreinfo in {ram_file}: is a Linux guest running?")
