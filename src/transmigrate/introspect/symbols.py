"""Naming a kernel address: vmlinux's symbols from its debug info, modules' from the
guest's own kallsyms."""

from __future__ import annotations

import contextlib

from transmigrate.errors import IntrospectionError
from transmigrate.introspect.kernel import Guest

__all__ = ["symbolize"]


def symbolize(guest: Guest, address: int) -> str:
    """The function at ``address``, or the address marked unknown: never an error, since
    it only labels evidence."""
    with contextlib.suppress(LookupError):
        return str(guest.prog.symbol(address).name)
    with contextlib.suppress(IntrospectionError):
        in_module = guest.module_symbol(address)
        if in_module:
            return in_module
    return f"{address:016x} (unknown)"
