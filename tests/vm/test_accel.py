"""The accelerator: the probe believes only guest code that ran, and a KVM guest that
never runs is booted again under TCG instead of being waited for."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from transmigrate.config import ACTIVE_KERNEL
from transmigrate.errors import MachineError
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.vm import accel
from transmigrate.vm.accel import KVM, TCG, Accelerator, ProbeResult, detect_accelerator, probe


def _fake_qemu(tmp_path: Path, script: str) -> str:
    path = tmp_path / "qemu-system-x86_64"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


def test_probe_gives_up_on_a_qemu_that_stays_up_silent(tmp_path: Path) -> None:
    hangs = _fake_qemu(tmp_path, "sleep 30")  # a child of the shell: it is killed too
    start = time.monotonic()
    result = probe(TCG, hangs, timeout=0.5)
    assert not result.ran
    assert "no sign of guest code within 0.5 s" in result.detail
    assert time.monotonic() - start < 2


def test_probe_reports_a_qemu_that_aborts(tmp_path: Path) -> None:
    aborts = _fake_qemu(tmp_path, "echo 'qemu: error: failed to set MSR 0x10a' >&2; exit 1")
    result = probe(KVM, aborts)
    assert not result.ran
    assert result.detail.startswith("QEMU exited with status 1")
    assert "failed to set MSR" in result.detail


@pytest.mark.vm
def test_probe_code_runs_under_tcg() -> None:
    result = probe(TCG)
    assert result.ran, result.detail
    assert result.seconds < 2


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("TRANSMIGRATE_ACCEL", raising=False)
    return tmp_path


def _probe_answers(monkeypatch: pytest.MonkeyPatch, ran: bool) -> list[Accelerator]:
    probed: list[Accelerator] = []

    def fake(accel_: Accelerator, qemu: str = "") -> ProbeResult:
        probed.append(accel_)
        return ProbeResult(ran, "", 0.0)

    monkeypatch.setattr(accel, "probe", fake)
    return probed


def test_answer_is_probed_once_per_boot(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probed = _probe_answers(monkeypatch, ran=True)
    assert detect_accelerator(cache) == "kvm"
    assert detect_accelerator(cache) == "kvm"
    assert probed == [KVM]


def test_an_older_probe_is_not_trusted(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    (cache / "accel").write_text(f"{boot_id} kvm")  # version 1: QEMU merely stayed up
    probed = _probe_answers(monkeypatch, ran=False)
    assert detect_accelerator(cache) == "tcg"
    assert probed == [KVM]


def test_environment_forces_without_probing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probed = _probe_answers(monkeypatch, ran=False)
    monkeypatch.setenv("TRANSMIGRATE_ACCEL", "kvm")
    assert detect_accelerator(cache) == "kvm"
    assert probed == []


class _NeverRuns(Accelerator):
    """Called KVM, but its QEMU starts paused (``-S``): the guest never runs one
    instruction, as under a KVM that does not work."""

    def qemu_args(self) -> list[str]:
        return [*TCG.qemu_args(), "-S"]


@pytest.fixture
def silent_kvm(prepared: Host, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A short silence deadline; the host's answer for this boot restored after."""
    monkeypatch.setattr(lifecycle, "KVM_SILENCE_SECONDS", 2.0)
    monkeypatch.delenv("TRANSMIGRATE_ACCEL", raising=False)
    stamp = prepared.cache / "accel"
    saved = stamp.read_text() if stamp.exists() else None
    yield "t-silent"
    if saved is None:
        stamp.unlink(missing_ok=True)
    else:
        stamp.write_text(saved)
    prepared.volume("t-silent").unlink(missing_ok=True)


def test_silent_kvm_guest_boots_again_under_tcg(prepared: Host, silent_kvm: str) -> None:
    said: list[str] = []
    report = lifecycle.up(prepared, silent_kvm, ACTIVE_KERNEL, memory_mib=256,
                          accel=_NeverRuns("kvm"), progress=said.append)
    try:
        assert report.machine.record.accel == "tcg"
        assert lifecycle.exec_in(prepared, silent_kvm, ["true"]).exit_code == 0
        assert [line for line in said if "printed nothing under KVM" in line], said
        assert prepared.accelerator() == "tcg", "TCG is the answer for the rest of this boot"
        same_name = [m.record.id for m in prepared.machines.all() if m.name == silent_kvm]
        assert same_name == [report.machine.record.id], "the silent VM is gone"
    finally:
        lifecycle.down(prepared, silent_kvm)


def test_forced_kvm_that_never_runs_is_a_clear_error(prepared: Host, silent_kvm: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSMIGRATE_ACCEL", "kvm")
    start = time.monotonic()
    with pytest.raises(MachineError) as caught:
        lifecycle.up(prepared, silent_kvm, ACTIVE_KERNEL, memory_mib=256,
                     accel=_NeverRuns("kvm"))
    message = str(caught.value)
    assert "console: empty" in message and "TRANSMIGRATE_ACCEL=tcg" in message
    assert message.count("printed nothing") == 1
    assert time.monotonic() - start < 15
    assert not [m for m in prepared.machines.all() if m.name == silent_kvm]
