"""The guest image: one Debian root filesystem, shared read-only by every VM.

Built with mmdebstrap from the host's Debian sources, then packed into an ext4
disk image. Each VM boots from a qcow2 overlay on top of it, so VMs never see
each other's writes. The image is cached under a hash of everything that goes
into it (packages, the operator's files, our guest files), so a change to any
of them builds a new one and an unchanged request reuses the old. A new build
removes the builds it supersedes (same packages and files directory, older
content) that no running VM still has open.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from transmigrate.errors import ImageError
from transmigrate.process import run
from transmigrate.progress import Progress, silent
from transmigrate.vm.archive import host_debian_sources
from transmigrate.vm.initramfs import GUEST_INIT

__all__ = ["BASE_PACKAGES", "GuestImage", "ImageSpec"]

SUITE = "bookworm"
BASE_PACKAGES = (
    "criu", "python3", "python3-protobuf", "iproute2", "iptables", "nftables", "procps",
    "redis-server", "redis-tools", "qemu-guest-agent", "tini", "kmod", "psmisc", "mount",
    "hostname", "iputils-ping",
)
IMAGE_FORMAT = 1  # bump when the way we assemble the image changes


@dataclass(frozen=True)
class ImageSpec:
    """Everything that decides the image's content."""

    extra_packages: tuple[str, ...] = ()
    files_dir: Path | None = None
    free_space_mib: int = 2048

    def all_packages(self) -> list[str]:
        return sorted(set(BASE_PACKAGES) | set(self.extra_packages))

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"format": IMAGE_FORMAT, "suite": SUITE,
                             "packages": self.all_packages(),
                             "free": self.free_space_mib,
                             "sources": [s.deb822() for s in host_debian_sources()]}).encode())
        for path in _guest_files():
            h.update(path.name.encode() + path.read_bytes())
        if self.files_dir is not None:
            if not self.files_dir.is_dir():
                raise ImageError(f"files directory {self.files_dir} does not exist")
            for path in sorted(self.files_dir.rglob("*")):
                relative = path.relative_to(self.files_dir).as_posix()
                h.update(relative.encode() + oct(path.lstat().st_mode).encode())
                if path.is_file() and not path.is_symlink():
                    h.update(path.read_bytes())
        return h.hexdigest()[:16]


def _open_paths() -> set[str]:
    """Every file some process on this host has open."""
    paths = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            paths.add(os.readlink(fd))
    return paths


def _guest_files() -> list[Path]:
    root = resources.files("transmigrate.guest") / "files"
    return sorted(Path(str(p)) for p in root.iterdir() if p.is_file())


class GuestImage:
    """The cached image for one :class:`ImageSpec`; ``ensure()`` builds it if missing."""

    def __init__(self, spec: ImageSpec, root: Path) -> None:
        self.spec = spec
        self.directory = root / spec.digest()

    @property
    def path(self) -> Path:
        return self.directory / "rootfs.img"

    def exists(self) -> bool:
        return (self.directory / "image.json").exists()

    def ensure(self, progress: Progress = silent) -> GuestImage:
        if not self.exists():
            self.build(progress)
        return self

    def build(self, progress: Progress = silent) -> None:
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.directory.parent, prefix=".build-") as tmp:
            work = Path(tmp)
            tree = work / "rootfs"
            sources = work / "debian.sources"
            sources.write_text("\n".join(s.deb822() for s in host_debian_sources()))
            packages = self.spec.all_packages()
            progress(f"mmdebstrap {SUITE} with {len(packages)} packages")
            try:
                run(["mmdebstrap", "--variant=apt", "--quiet",
                     f"--include={','.join(packages)}", SUITE, tree, sources], timeout=1800)
            except Exception as exc:
                raise ImageError(f"guest image build failed: {exc}") from exc
            progress("installing guest files")
            init = tree / GUEST_INIT.lstrip("/")
            init.parent.mkdir(parents=True, exist_ok=True)
            for path in _guest_files():
                shutil.copy(path, init.parent / path.name)
            for path in _guest_files():
                (init.parent / path.name).chmod(0o755)
            (tree / "lib" / "modules").mkdir(parents=True, exist_ok=True)
            (tree / "etc" / "hostname").write_text("guest\n")
            (tree / "etc" / "fstab").write_text("")
            if self.spec.files_dir is not None:
                shutil.copytree(self.spec.files_dir, tree, symlinks=True, dirs_exist_ok=True)
            progress("packing ext4 image")
            used = int(run(["du", "-s", "--block-size=1M", tree]).split()[0])
            staging = work / "image"
            staging.mkdir()
            run(["mkfs.ext4", "-q", "-F", "-L", "tm-root", "-d", tree, staging / "rootfs.img",
                 f"{used + self.spec.free_space_mib}M"], timeout=600)
            (staging / "rootfs.img").chmod(0o444)
            (staging / "image.json").write_text(json.dumps(
                {"packages": packages, "files": str(self.spec.files_dir or ""),
                 "used_mib": used}))
            if self.directory.exists():
                shutil.rmtree(self.directory)
            staging.rename(self.directory)
        for stale in self.superseded():
            progress(f"removing superseded image {stale.name}")
            shutil.rmtree(stale, ignore_errors=True)

    def superseded(self) -> list[Path]:
        """Older builds of the same request: the same packages and files directory, but
        other content (our guest files or the operator's files changed since). No new VM
        boots them, and each holds hundreds of MiB. A build some process (a running
        VM's QEMU) still has open is kept."""
        wanted = self._request(self.directory)
        if wanted is None:
            return []
        in_use = _open_paths()
        return [other for other in sorted(self.directory.parent.iterdir())
                if other != self.directory and not other.name.startswith(".")
                and self._request(other) == wanted
                and str(other / "rootfs.img") not in in_use]

    @staticmethod
    def _request(directory: Path) -> tuple[object, object] | None:
        try:
            built = json.loads((directory / "image.json").read_text())
        except (OSError, ValueError):
            return None
        return built.get("packages"), built.get("files")
