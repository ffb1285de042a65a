"""A minimal initramfs per kernel: busybox, the modules to reach the disks, and /init.

Debian's cloud kernels build virtio_blk as a module, so something must load it
before the root filesystem can be mounted. This initramfs does only that, finds
the root and modules disks by their virtio serial numbers, and hands over to the
guest image's own init. Everything else the guest needs comes from the modules
disk, so the image itself stays independent of the kernel.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from transmigrate.errors import TransmigrateError

__all__ = [
    "BOOT_MODULES",
    "GUEST_INIT",
    "MODULES_SERIAL",
    "ROOT_SERIAL",
    "build_initramfs",
    "module_load_order",
]

BOOT_MODULES = ("virtio_pci", "virtio_blk")
ROOT_SERIAL = "tm-root"
MODULES_SERIAL = "tm-modules"
GUEST_INIT = "/usr/lib/transmigrate/init"
BUSYBOX = Path("/bin/busybox")

_INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod "/modules/$m" || echo "initramfs: insmod $m failed"; done
root=; mods=
for i in $(seq 1 500); do
    for d in /sys/block/vd*; do
        [ -e "$d/serial" ] || continue
        case "$(cat "$d/serial")" in
            {ROOT_SERIAL}) root=/dev/${{d##*/}} ;;
            {MODULES_SERIAL}) mods=/dev/${{d##*/}} ;;
        esac
    done
    [ -n "$root" ] && [ -n "$mods" ] && break
    sleep 0.02
done
if [ -z "$root" ] || [ -z "$mods" ]; then
    echo "initramfs: disks not found (root=$root modules=$mods)"; poweroff -f
fi
mkdir -p /newroot
fail() {{ echo "initramfs: $*"; poweroff -f; }}
mount -t ext4 -o rw "$root" /newroot || fail "cannot mount $root"
mount -t ext4 -o ro "$mods" /newroot/lib/modules || fail "cannot mount $mods"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /usr/bin/tini -- {GUEST_INIT}
"""


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base.replace("-", "_")


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[str]:
    """Paths (relative to ``modules_dir``) of ``wanted`` modules and their dependencies,
    dependencies first. Modules built into the kernel are skipped."""
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        name = _module_name(target)
        paths[name] = target
        deps[name] = [_module_name(d) for d in rest.split()]
    builtin = {_module_name(line) for line in
               (modules_dir / "modules.builtin").read_text().splitlines()}
    order: list[str] = []

    def visit(name: str) -> None:
        if name in builtin or paths.get(name) in order:
            return
        if name not in paths:
            raise TransmigrateError(f"kernel module {name} is neither built in nor shipped")
        for dep in deps[name]:
            visit(dep)
        order.append(paths[name])

    for name in wanted:
        visit(name)
    return order


class _Cpio:
    """Writer of the 'newc' cpio format that the kernel unpacks into its rootfs."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               ) -> None:
        encoded = name.encode() + b"\0"
        header = (
            "070701" + "".join(f"{v:08x}" for v in (
                self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(encoded), 0))
        ).encode()
        self.ino += 1
        self.out.write(header + encoded)
        self.out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise TransmigrateError(f"zstd-compressed module {path.name} is not supported")
    return data


def build_initramfs(modules_dir: Path, out: Path) -> None:
    """Write a gzip-compressed initramfs for the kernel whose modules are in ``modules_dir``."""
    if not BUSYBOX.exists():
        raise TransmigrateError(f"{BUSYBOX} is missing: install Debian's busybox-static")
    archive = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "newroot", "modules"):
        archive.directory(directory)
    archive.char_device("dev/console", 5, 1)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    archive.file("init", _INIT.encode(), 0o755)
    order = module_load_order(modules_dir, BOOT_MODULES)
    names = []
    for relative in order:
        name = _module_name(relative) + ".ko"
        archive.file(f"modules/{name}", _read_module(modules_dir / relative))
        names.append(name)
    archive.file("modules.order", ("\n".join(names) + "\n").encode())
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(archive.finish(), compresslevel=6))
    tmp.replace(out)
