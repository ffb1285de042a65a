"""The private view of Debian's archive comes from the host's own sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from transmigrate.vm import archive


def test_host_sources_name_a_debian_archive() -> None:
    entries = archive.host_debian_sources()
    assert entries
    assert all("main" in e.components for e in entries)
    assert all(s.startswith("bookworm") for e in entries for s in e.suites)


def test_one_line_and_deb822_formats_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib\nSigned-By: /k.gpg\n\n"
        "Types: deb\nURIs: http://other.invalid/x\nSuites: nodistro\nComponents: main\n")
    one_line = tmp_path / "sources.list"
    one_line.write_text("deb [signed-by=/k.gpg] http://mirror.invalid/debian bookworm main\n"
                        "# deb http://commented.invalid/debian bookworm main\n")
    monkeypatch.setattr(archive, "_SOURCES_DIR", tmp_path / "d")
    monkeypatch.setattr(archive, "_SOURCES_LIST", one_line)
    monkeypatch.setattr(archive, "_host_codename", lambda: "bookworm")
    entries = archive.host_debian_sources()
    assert [e.uri for e in entries] == ["http://mirror.invalid/debian"] * 2
    assert entries[0].suites == ("bookworm",)
    assert entries[1].suites == ("bookworm", "bookworm-updates")
    assert all(e.signed_by == "/k.gpg" for e in entries)
