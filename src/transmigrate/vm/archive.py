"""A private, read-only view of Debian's archive, located from the host's apt sources.

The host's sources name where Debian's archive is; we never name it ourselves.
We keep our own apt lists in the cache so that looking up kernels neither needs
nor changes the host's apt state, and ignores the host's third-party sources.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from transmigrate.errors import TransmigrateError
from transmigrate.process import run

__all__ = ["DebianArchive", "SourceEntry", "host_debian_sources"]

_SOURCES_DIR = Path("/etc/apt/sources.list.d")
_SOURCES_LIST = Path("/etc/apt/sources.list")
_OS_RELEASE = Path("/etc/os-release")
_LISTS_MAX_AGE = 24 * 3600.0


@dataclass(frozen=True)
class SourceEntry:
    """One Debian archive location: a URI and the suites and components we use from it."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None

    def deb822(self) -> str:
        lines = [
            "Types: deb",
            f"URIs: {self.uri}",
            f"Suites: {' '.join(self.suites)}",
            f"Components: {' '.join(self.components)}",
        ]
        if self.signed_by:
            lines.append(f"Signed-By: {self.signed_by}")
        return "\n".join(lines) + "\n"


def _host_codename() -> str:
    for line in _OS_RELEASE.read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise TransmigrateError("cannot tell the host's Debian release from /etc/os-release")


def _parse_deb822(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in block.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key:
                fields[key] += " " + raw.strip()
                continue
            key, _, value = raw.partition(":")
            key = key.strip()
            fields[key] = value.strip()
        if fields:
            stanzas.append(fields)
    return stanzas


def _parse_one_line(text: str) -> list[dict[str, str]]:
    stanzas = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        options = ""
        match = re.match(r"deb\s+\[([^\]]*)\]\s+(.*)", line)
        if match:
            options, line = match.group(1), "deb " + match.group(2)
        words = line.split()
        if len(words) < 4:
            continue
        fields = {"Types": "deb", "URIs": words[1], "Suites": words[2],
                  "Components": " ".join(words[3:])}
        signed = re.search(r"signed-by=(\S+)", options)
        if signed:
            fields["Signed-By"] = signed.group(1)
        stanzas.append(fields)
    return stanzas


def host_debian_sources() -> list[SourceEntry]:
    """The host's enabled sources for its own Debian release (main component)."""
    codename = _host_codename()
    stanzas: list[dict[str, str]] = []
    if _SOURCES_LIST.exists():
        stanzas += _parse_one_line(_SOURCES_LIST.read_text())
    for path in sorted(_SOURCES_DIR.glob("*")):
        if path.suffix == ".sources":
            stanzas += _parse_deb822(path.read_text())
        elif path.suffix == ".list":
            stanzas += _parse_one_line(path.read_text())
    entries = []
    for fields in stanzas:
        if "deb" not in fields.get("Types", "").split():
            continue
        if fields.get("Enabled", "yes").lower() == "no":
            continue
        suites = tuple(s for s in fields.get("Suites", "").split()
                       if s == codename or s.startswith(codename + "-"))
        if not suites or "main" not in fields.get("Components", "").split():
            continue
        for uri in fields.get("URIs", "").split():
            entries.append(SourceEntry(uri, suites, ("main",), fields.get("Signed-By")))
    if not entries:
        raise TransmigrateError(
            f"the host's apt sources name no Debian {codename} archive with 'main'")
    return entries


class DebianArchive:
    """apt-get and apt-cache over our own lists of the host's Debian sources."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sources_file = root / "sources" / "debian.sources"

    def _options(self) -> list[str]:
        return [
            "-o", f"Dir::Etc::SourceList={self.root / 'none.list'}",
            "-o", f"Dir::Etc::SourceParts={self.sources_file.parent}",
            "-o", f"Dir::State={self.root / 'state'}",
            "-o", f"Dir::State::status={self.root / 'status'}",
            "-o", f"Dir::Cache={self.root / 'cache'}",
            "-o", "Dir::Etc::Preferences=/dev/null",
            "-o", "Dir::Etc::PreferencesParts=/dev/null",
            "-o", "APT::Sandbox::User=root",
            "-o", "Debug::NoLocking=1",
        ]

    def _prepare(self) -> None:
        (self.root / "state" / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        self.sources_file.parent.mkdir(parents=True, exist_ok=True)
        self.sources_file.write_text("\n".join(e.deb822() for e in host_debian_sources()))
        (self.root / "status").touch()
        (self.root / "none.list").touch()

    def lists_age(self) -> float | None:
        """Seconds since our package lists were fetched, or None if never."""
        stamp = self.root / "updated"
        return time.time() - stamp.stat().st_mtime if stamp.exists() else None

    def update(self, *, force: bool = False) -> None:
        """Fetch the archive's package lists unless ours are fresh."""
        age = self.lists_age()
        if not force and age is not None and age < _LISTS_MAX_AGE:
            return
        self._prepare()
        run(["apt-get", *self._options(), "update", "-q"], timeout=600)
        (self.root / "updated").touch()

    def package_names(self, pattern: str) -> list[str]:
        """Names of packages matching the regular expression ``pattern``."""
        self.update()
        out = run(["apt-cache", *self._options(), "search", "--names-only", pattern])
        return sorted({line.split(" - ", 1)[0] for line in out.splitlines() if line})

    def versions(self, packages: list[str]) -> dict[str, str]:
        """The candidate version of each package, in one apt-cache call."""
        if not packages:
            return {}
        self.update()
        out = run(["apt-cache", *self._options(), "show", "--no-all-versions", *packages])
        found: dict[str, str] = {}
        name = None
        for line in out.splitlines():
            if line.startswith("Package:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("Version:") and name:
                found[name] = line.split(":", 1)[1].strip()
        return found

    def depends(self, package: str) -> list[str]:
        """Direct dependencies of ``package`` (first alternative of each)."""
        self.update()
        out = run(["apt-cache", *self._options(), "show", "--no-all-versions", package])
        for line in out.splitlines():
            if line.startswith("Depends:"):
                return [d.split("|")[0].split("(")[0].strip()
                        for d in line.split(":", 1)[1].split(",")]
        return []

    def download(self, package: str, dest: Path) -> Path:
        """Download ``package``'s .deb into ``dest``; return its path."""
        self.update()
        dest.mkdir(parents=True, exist_ok=True)
        before = set(dest.glob("*.deb"))
        run(["apt-get", *self._options(), "download", "-q", package], cwd=dest, timeout=1800)
        new = sorted(set(dest.glob(f"{package}_*.deb")) - before)
        found = new or sorted(dest.glob(f"{package}_*.deb"))
        if not found:
            raise TransmigrateError(f"apt-get download {package} left no .deb")
        return found[-1]
