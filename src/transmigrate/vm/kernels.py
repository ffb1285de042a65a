"""The kernel catalog: Debian's cloud kernels in the archive, and the ones in our cache.

A kernel is named by its release, as ``uname -r`` prints it
(``6.1.0-57-cloud-amd64``, ``6.12.117+deb12-cloud-amd64``); short forms such as
``6.1.0-57`` or ``6.12.117`` are accepted wherever a kernel is asked for.
Fetching one unpacks its package into the cache as what a VM boots from: the
vmlinuz, a small initramfs, and a read-only disk image of its modules.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transmigrate.errors import KernelNotFound, TransmigrateError
from transmigrate.process import run
from transmigrate.progress import Progress, silent
from transmigrate.vm.archive import DebianArchive
from transmigrate.vm.initramfs import build_initramfs

__all__ = ["CatalogEntry", "Kernel", "KernelCatalog", "release_key"]

_IMAGE_PACKAGE = re.compile(r"^linux-image-(?P<release>\d+\.\d+\.\d+.*-cloud-amd64)-unsigned$")
_IMAGE_PATTERN = r"^linux-image-[0-9]+\.[0-9]+\.[0-9]+.*-cloud-amd64-unsigned$"


def release_key(release: str) -> tuple[int, ...]:
    """Sort key of a release: its numbers in order (6.1.0-57 < 6.1.0-100 < 6.12.1)."""
    return tuple(int(n) for n in re.findall(r"\d+", release.split("-cloud")[0].split("+")[0]))


def _matches(spec: str, release: str) -> bool:
    return release == spec or release.startswith((spec + "-", spec + "+"))


@dataclass(frozen=True)
class CatalogEntry:
    """A kernel the archive offers."""

    release: str
    package: str
    version: str
    cached: bool
    debug_cached: bool


@dataclass(frozen=True)
class Kernel:
    """A kernel unpacked in the cache, ready to boot."""

    release: str
    directory: Path

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initramfs(self) -> Path:
        return self.directory / "initramfs.img"

    @property
    def modules_image(self) -> Path:
        return self.directory / "modules.img"

    @property
    def config(self) -> Path:
        return self.directory / "config"

    @property
    def vmlinux_debug(self) -> Path:
        """The kernel with full DWARF, from the -dbg package, if fetched."""
        return self.directory / "vmlinux"

    @property
    def headers_dir(self) -> Path:
        """The .debs needed to build modules for this kernel, if fetched."""
        return self.directory / "headers"

    @property
    def version(self) -> str:
        meta = json.loads((self.directory / "kernel.json").read_text())
        return str(meta["version"])


class KernelCatalog:
    """Lists, resolves and fetches kernels; the cache is ``<root>/kernels/<release>``."""

    def __init__(self, archive: DebianArchive, root: Path) -> None:
        self.archive = archive
        self.root = root

    def cached(self) -> list[Kernel]:
        if not self.root.exists():
            return []
        found = [Kernel(d.name, d) for d in self.root.iterdir()
                 if (d / "kernel.json").exists()]
        return sorted(found, key=lambda k: release_key(k.release))

    def available(self) -> list[CatalogEntry]:
        packages = self.archive.package_names(_IMAGE_PATTERN)
        versions = self.archive.versions(packages)
        cached = {k.release: k for k in self.cached()}
        entries = []
        for package in packages:
            match = _IMAGE_PACKAGE.match(package)
            if not match:
                continue
            release = match.group("release")
            kernel = cached.get(release)
            entries.append(CatalogEntry(
                release=release,
                package=package,
                version=versions.get(package, "?"),
                cached=kernel is not None,
                debug_cached=kernel is not None and kernel.vmlinux_debug.exists(),
            ))
        return sorted(entries, key=lambda e: release_key(e.release))

    def resolve(self, spec: str) -> str:
        """The full release that ``spec`` names; cached kernels resolve offline."""
        for kernel in self.cached():
            if _matches(spec, kernel.release):
                return kernel.release
        releases = [e.release for e in self.available()]
        found = [r for r in releases if _matches(spec, r)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise KernelNotFound(f"kernel {spec!r} is ambiguous: {', '.join(found)}")
        nearest = ", ".join(_nearest(spec, releases))
        raise KernelNotFound(f"kernel {spec!r} is not in the archive; nearest: {nearest}")

    def fetch(self, spec: str, *, debug: bool = False, headers: bool = False,
              progress: Progress = silent) -> Kernel:
        """Bring a kernel (and on request its debug info and headers) into the cache."""
        release = self.resolve(spec)
        kernel = Kernel(release, self.root / release)
        if not (kernel.directory / "kernel.json").exists():
            self._fetch_image(kernel, progress)
        if debug and not kernel.vmlinux_debug.exists():
            self._fetch_debug(kernel, progress)
        if headers and not (kernel.headers_dir / "complete").exists():
            self._fetch_headers(kernel, progress)
        return kernel

    def _fetch_image(self, kernel: Kernel, progress: Progress) -> None:
        package = f"linux-image-{kernel.release}-unsigned"
        progress(f"downloading {package}")
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".fetch-") as tmp:
            work = Path(tmp)
            deb = self.archive.download(package, work)
            progress(f"unpacking {deb.name}")
            tree = work / "tree"
            run(["dpkg-deb", "-x", deb, tree])
            staging = work / "kernel"
            staging.mkdir()
            for name in ("vmlinuz", "config"):
                shutil.copy(tree / "boot" / f"{name}-{kernel.release}", staging / name)
            modules = tree / "lib" / "modules" / kernel.release
            run(["depmod", "-b", tree, kernel.release])
            progress("building initramfs")
            build_initramfs(modules, staging / "initramfs.img")
            progress("building modules disk")
            _ext4_image(tree / "lib" / "modules", staging / "modules.img", label="tm-modules")
            version = re.sub(r"^\d+:", "", self.archive.versions([package]).get(package, "?"))
            (staging / "kernel.json").write_text(json.dumps(
                {"release": kernel.release, "package": package, "version": version}))
            if kernel.directory.exists():
                shutil.rmtree(kernel.directory)
            staging.rename(kernel.directory)

    def _fetch_debug(self, kernel: Kernel, progress: Progress) -> None:
        package = f"linux-image-{kernel.release}-dbg"
        progress(f"downloading {package} (large)")
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".fetch-") as tmp:
            deb = self.archive.download(package, Path(tmp))
            progress("extracting vmlinux with DWARF")
            member = f"./usr/lib/debug/boot/vmlinux-{kernel.release}"
            with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                                  stdout=subprocess.PIPE) as tar_stream:
                run_input = tar_stream.stdout
                assert run_input is not None
                extract = subprocess.run(["tar", "-x", "-C", tmp, member], stdin=run_input,
                                         capture_output=True, check=False)
            if extract.returncode != 0:
                raise TransmigrateError(f"{package} holds no {member[1:]}")
            (Path(tmp) / member).rename(kernel.vmlinux_debug)

    def _fetch_headers(self, kernel: Kernel, progress: Progress) -> None:
        package = f"linux-headers-{kernel.release}"
        wanted = [package] + [d for d in self.archive.depends(package)
                              if d.startswith(("linux-headers-", "linux-kbuild-"))]
        kernel.headers_dir.mkdir(exist_ok=True)
        for name in wanted:
            progress(f"downloading {name}")
            self.archive.download(name, kernel.headers_dir)
        (kernel.headers_dir / "complete").touch()


def _nearest(spec: str, releases: list[str], count: int = 3) -> list[str]:
    if not releases:
        return ["(none: the archive lists no cloud kernels)"]
    target = release_key(spec) or (0,)

    def distance(release: str) -> tuple[int, ...]:
        key = release_key(release)
        same_prefix = sum(1 for a, b in zip(key, target, strict=False) if a == b)
        tail = abs(key[min(same_prefix, len(key) - 1)] - target[min(same_prefix, len(target) - 1)])
        return (-same_prefix, tail)

    return sorted(releases, key=distance)[:count]


def _ext4_image(source: Path, out: Path, *, label: str, spare_mib: int = 16) -> None:
    """An ext4 image holding ``source``'s tree, sized to fit with a little spare room."""
    used = int(run(["du", "-s", "--block-size=1M", source]).split()[0])
    size = used + used // 4 + spare_mib
    run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", source, "-E", "root_owner=0:0",
         "-O", "^has_journal", out, f"{size}M"])
