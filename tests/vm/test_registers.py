"""QEMU's `info registers` read into a vCPU's state (a recording from QEMU 7.2 under
TCG, `-cpu max`: a CPU in the kernel, with a user task's FPU state loaded)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from transmigrate.errors import MachineError
from transmigrate.vm.registers import parse_info_registers

RECORDED = (Path(__file__).parent / "data" / "info-registers.txt").read_text()


def test_every_register_is_read_by_its_pt_regs_name() -> None:
    state = parse_info_registers(0, RECORDED)
    assert not state.user_mode, "CPL=0"
    assert set(state.general) == {"ax", "bx", "cx", "dx", "si", "di", "bp", "sp", "ip",
                                  "flags", *(f"r{n}" for n in range(8, 16))}
    assert state.general["ip"] == 0xFFFFFFFF9EFC29B0
    assert state.general["flags"] == 0x246
    assert state.fs_base == 0x7F0A66D04240, "FS keeps the user task's base in the kernel"
    assert state.selectors == {"es": 0, "cs": 0x10, "ss": 0x18, "ds": 0, "fs": 0, "gs": 0}
    assert (state.fcw, state.fsw, state.ftw, state.mxcsr) == (0x37F, 0, 0, 0x1FA5)


def test_vector_registers_are_little_endian_bytes() -> None:
    """QEMU prints the most significant word first; XSAVE stores the least first."""
    state = parse_info_registers(0, RECORDED)
    assert len(state.xmm) == 16 and all(len(x) == 16 for x in state.xmm)
    assert state.ymm_high is not None and len(state.ymm_high) == 16
    assert struct.unpack("<d", state.xmm[0][:8])[0] == 10.0  # YMM00's low word, 0x4024...
    assert state.ymm_high[0] == bytes(16)
    assert not state.avx512
    assert all(len(register) == 10 for register in state.fpr)


def test_a_truncated_dump_is_refused() -> None:
    with pytest.raises(MachineError, match="did not show all of CPU 3's registers"):
        parse_info_registers(3, RECORDED.split("FCW=")[0])
