"""Building the fault injectors on the host: the kernel module per kernel, and the fork bomb.

The module is built against Debian's ``linux-headers`` for the exact kernel
release (fetched with ``KernelCatalog.fetch(spec, headers=True)``), with the
compiler the headers name, and cached in ``<kernel dir>/faults/``; it is rebuilt
when its source changes. The fork bomb is one static binary for every kernel,
cached in ``<cache>/faults/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from transmigrate.errors import CommandError, FaultError
from transmigrate.process import run
from transmigrate.progress import Progress, silent
from transmigrate.vm.kernels import Kernel

__all__ = ["FORKBOMB_NAME", "MODULE_NAME", "SOURCE_DIR", "build_forkbomb", "build_module"]

SOURCE_DIR = Path(__file__).resolve().parents[3] / "faults"
"""The C sources at the repository's root."""

MODULE_NAME = "transmigrate_faults"
FORKBOMB_NAME = "tm-forkbomb"
_MODULE_SOURCES = ("transmigrate_faults.c", "Kbuild")
_FORKBOMB_SOURCE = "tm_forkbomb.c"


def _source_hash(names: tuple[str, ...], extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for name in names:
        path = SOURCE_DIR / name
        try:
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
        except OSError as exc:
            raise FaultError(f"fault source {path} is missing: {exc.strerror}") from exc
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One builder at a time per output directory (tests may build in parallel)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _headers_tree(kernel: Kernel, progress: Progress) -> Path:
    """The unpacked headers' build directory, ``usr/src/linux-headers-<release>``."""
    debs = sorted(kernel.headers_dir.glob("*.deb")) if kernel.headers_dir.is_dir() else []
    if not (kernel.headers_dir / "complete").exists() or not debs:
        raise FaultError(f"no headers for {kernel.release}; run: "
                         f"transmigrate fetch {kernel.release} --headers")
    root = kernel.directory / "faults" / "headers"
    build = root / "usr" / "src" / f"linux-headers-{kernel.release}"
    if (root / "complete").exists():
        return build
    progress(f"unpacking the headers of {kernel.release}")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for deb in debs:
        run(["dpkg-deb", "-x", deb, root])
    makefile = build / "Makefile"
    if not makefile.exists():
        raise FaultError(f"the headers of {kernel.release} hold no {makefile.relative_to(root)}")
    # Debian's per-flavour Makefile includes the common tree by absolute path.
    text = re.sub(r"^include /usr/src/", f"include {root}/usr/src/", makefile.read_text(),
                  flags=re.MULTILINE)
    makefile.write_text(text)
    (root / "complete").touch()
    return build


def _compiler(build: Path, kernel: Kernel) -> str:
    """The compiler the headers build with; checked against the one the kernel was built by."""
    variables = (build / ".kernelvariables").read_text() if (
        build / ".kernelvariables").exists() else ""
    cc = re.search(r"^CC\s*=.*?(\S+)\s*$", variables, re.MULTILINE)
    cross = re.search(r"^override CROSS_COMPILE\s*=\s*([^\s$]+)\s*$", variables, re.MULTILINE)
    name = cc.group(1).replace("$(CROSS_COMPILE)", "") if cc else "gcc"
    if cross:
        name = cross.group(1) + name
    path = shutil.which(name)
    if path is None:
        package = re.sub(r"^.*?(gcc-\d+)$", r"\1", name)
        raise FaultError(f"{kernel.release} is built with {name}, which is not installed; "
                         f"run: apt-get install {package}")
    config = kernel.config.read_text() if kernel.config.exists() else ""
    wanted = re.search(r'^CONFIG_CC_VERSION_TEXT="(.*)"$', config, re.MULTILINE)
    have = run([path, "--version"]).splitlines()[0]
    if wanted:
        version = re.search(r"\)\s*(\S+)$", wanted.group(1))
        if version and not have.endswith(version.group(1)):
            raise FaultError(f"{kernel.release} was built by {wanted.group(1)!r} but {name} is "
                             f"{have!r}; install the matching gcc")
    return name


def build_module(kernel: Kernel, progress: Progress = silent) -> Path:
    """The fault module for ``kernel``, built on first use; its path on the host.

    Needs the kernel's headers in the cache (``KernelCatalog.fetch(..., headers=True)``).
    """
    out_dir = kernel.directory / "faults"
    ko = out_dir / f"{MODULE_NAME}.ko"
    stamp = out_dir / f"{MODULE_NAME}.source"
    want = _source_hash(_MODULE_SOURCES, kernel.release)
    with _locked(out_dir):
        if ko.exists() and stamp.exists() and stamp.read_text() == want:
            return ko
        build = _headers_tree(kernel, progress)
        compiler = _compiler(build, kernel)
        progress(f"building {MODULE_NAME}.ko for {kernel.release} with {compiler}")
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
            work = Path(tmp)
            for name in _MODULE_SOURCES:
                shutil.copy(SOURCE_DIR / name, work / name)
            try:
                run(["make", "-C", build, f"M={work}", "modules"], timeout=600)
            except CommandError as exc:
                tail = "\n".join(exc.output.strip().splitlines()[-15:])
                raise FaultError(f"building {MODULE_NAME}.ko for {kernel.release} failed:\n"
                                 f"{tail}") from exc
            vermagic = run(["modinfo", "-F", "vermagic", work / f"{MODULE_NAME}.ko"]).split()
            if not vermagic or vermagic[0] != kernel.release:
                raise FaultError(f"{MODULE_NAME}.ko was built for {vermagic[:1]}, "
                                 f"not {kernel.release}")
            (work / f"{MODULE_NAME}.ko").replace(ko)
        stamp.write_text(want)
    return ko


def build_forkbomb(cache: Path, progress: Progress = silent) -> Path:
    """The static fork-and-memory bomb (one binary for every guest); its path on the host."""
    out_dir = cache / "faults"
    binary = out_dir / FORKBOMB_NAME
    stamp = out_dir / f"{FORKBOMB_NAME}.source"
    want = _source_hash((_FORKBOMB_SOURCE,))
    with _locked(out_dir):
        if binary.exists() and stamp.exists() and stamp.read_text() == want:
            return binary
        progress(f"building {FORKBOMB_NAME}")
        partial = out_dir / f".{FORKBOMB_NAME}.partial"
        try:
            run(["gcc", "-static", "-O2", "-Wall", "-o", partial, SOURCE_DIR / _FORKBOMB_SOURCE],
                timeout=300)
        except CommandError as exc:
            raise FaultError(f"building {FORKBOMB_NAME} failed: {exc.output.strip()[-500:]}"
                             ) from exc
        partial.replace(binary)
        stamp.write_text(want)
    return binary
