"""The kernel catalog against Debian's real archive."""

from __future__ import annotations

import pytest

from transmigrate.config import ACTIVE_KERNEL, STANDBY_KERNEL
from transmigrate.errors import KernelNotFound
from transmigrate.orchestrate.host import Host
from transmigrate.vm.kernels import release_key


def test_release_order_is_numeric() -> None:
    releases = ["6.12.117+deb12-cloud-amd64", "6.1.0-57-cloud-amd64", "6.1.0-100-cloud-amd64",
                "6.1.0-9-cloud-amd64"]
    assert sorted(releases, key=release_key) == [
        "6.1.0-9-cloud-amd64", "6.1.0-57-cloud-amd64", "6.1.0-100-cloud-amd64",
        "6.12.117+deb12-cloud-amd64"]


def test_archive_offers_both_families(host: Host) -> None:
    releases = [e.release for e in host.catalog.available()]
    assert any(r.startswith("6.1.0-") and r.endswith("-cloud-amd64") for r in releases)
    assert any(r.startswith("6.12.") and r.endswith("+deb12-cloud-amd64") for r in releases)


def test_short_names_resolve(host: Host) -> None:
    assert host.catalog.resolve(ACTIVE_KERNEL) == f"{ACTIVE_KERNEL}-cloud-amd64"
    assert host.catalog.resolve(STANDBY_KERNEL) == f"{STANDBY_KERNEL}+deb12-cloud-amd64"


def test_unknown_kernel_names_nearest(host: Host) -> None:
    with pytest.raises(KernelNotFound) as caught:
        host.catalog.resolve("6.1.0-999")
    message = str(caught.value)
    assert "\n" not in message
    assert "6.1.0-999" in message and "nearest: 6.1.0-" in message


def test_fetched_kernel_has_what_a_vm_boots_from(prepared: Host) -> None:
    kernel = prepared.catalog.fetch(ACTIVE_KERNEL)  # cached: no download
    for path in (kernel.vmlinuz, kernel.initramfs, kernel.modules_image, kernel.config):
        assert path.stat().st_size > 0, path
    assert "CONFIG_CHECKPOINT_RESTORE=y" in kernel.config.read_text()
    assert next(e for e in prepared.catalog.available() if e.release == kernel.release).cached
