"""Module dependency order for the initramfs, on a kernel's real modules.dep layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from transmigrate.errors import TransmigrateError
from transmigrate.vm.initramfs import module_load_order


def _tree(tmp_path: Path) -> Path:
    (tmp_path / "modules.dep").write_text(
        "kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz "
        "kernel/drivers/virtio/virtio.ko.xz\n"
        "kernel/drivers/virtio/virtio_ring.ko.xz: kernel/drivers/virtio/virtio.ko.xz\n"
        "kernel/drivers/virtio/virtio.ko.xz:\n"
        "kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio.ko.xz\n")
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio_mmio.ko\n")
    return tmp_path


def test_dependencies_load_first_and_once(tmp_path: Path) -> None:
    order = module_load_order(_tree(tmp_path), ["virtio_pci", "virtio_blk"])
    assert order == ["kernel/drivers/virtio/virtio.ko.xz",
                     "kernel/drivers/virtio/virtio_pci.ko.xz",
                     "kernel/drivers/virtio/virtio_ring.ko.xz",
                     "kernel/drivers/block/virtio_blk.ko.xz"]


def test_builtin_modules_are_skipped(tmp_path: Path) -> None:
    assert module_load_order(_tree(tmp_path), ["virtio_mmio"]) == []


def test_missing_module_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TransmigrateError, match="virtio_gpu"):
        module_load_order(_tree(tmp_path), ["virtio_gpu"])
