"""CRIU's stats images, decoded as CRIU's own crit decodes them; connections' timestamps
handed over in milliseconds."""

from __future__ import annotations

import base64
import io
import subprocess
from pathlib import Path

import pytest

from transmigrate.errors import TransmigrateError
from transmigrate.migrate.criu import (
    RESTORE_ROOT,
    DumpStats,
    Images,
    parse_stats,
    with_millisecond_timestamps,
)

DATA = Path(__file__).parent / "data"


def test_real_stats_dump_matches_crit() -> None:
    # stats-dump of a real pre-dump of redis in a 6.12 guest; crit show printed these.
    stats = parse_stats((DATA / "stats-dump.img").read_bytes())
    assert stats == DumpStats(freezing_time=6992, frozen_time=47193, memdump_time=9214,
                              memwrite_time=32917, pages_scanned=15838, pages_skipped_parent=0,
                              pages_written=2581, pages_lazy=0)


def test_truncated_stats_are_an_error() -> None:
    with pytest.raises(TransmigrateError, match="truncated"):
        parse_stats((DATA / "stats-dump.img").read_bytes()[:20])


def test_parent_links_are_relative() -> None:
    images = Images("/m")
    assert images.parent_args(1) == []
    assert images.parent_args(3) == ["--prev-images-dir", "../2"]
    dump = images.dump(3, 42, "198.19.0.11")
    assert dump[dump.index("-D") + 1] == "/m/3"
    assert "--tcp-established" in dump and "--action-script" in dump


def test_each_tree_talks_on_its_own_ports() -> None:
    images = Images("/m/1", page_server_port=27101, lazy_pages_port=27201)
    server = images.page_server(2, "198.19.0.11")
    assert server[server.index("--port") + 1] == "27101"
    lazy = images.lazy_dump(1, 42, "198.19.0.10")
    assert lazy[lazy.index("--port") + 1] == "27201"
    assert "--lazy-pages" in lazy and "--leave-stopped" in lazy and "--page-server" not in lazy
    daemon = images.lazy_pages(1, "198.19.0.10")
    assert daemon[:2] == ["criu", "lazy-pages"] and daemon[daemon.index("--port") + 1] == "27201"
    assert "--lazy-pages" in images.restore(1, "/run/p", lazy=True)


def test_a_tree_in_its_own_mount_namespace_keeps_the_vms_mounts_external() -> None:
    alone = Images("/m")
    assert not [a for a in alone.dump(1, 42, "198.19.0.11") if a.startswith("--external")]
    assert "--root" not in alone.restore(1, "/run/p")
    images = Images("/m", shared_mounts=("/proc", "/data", "/etc/nginx"))
    externals = ["--external=mnt[/proc]:/proc", "--external=mnt[/data]:/data",
                 "--external=mnt[/etc/nginx]:/etc/nginx"]
    for argv in (images.pre_dump(1, 42, "198.19.0.11"), images.dump(2, 42, "198.19.0.11"),
                 images.lazy_dump(1, 42, "198.19.0.10")):
        assert [a for a in argv if a.startswith("--external")] == externals
    restore = images.restore(2, "/run/p")
    assert restore[restore.index("--root") + 1] == RESTORE_ROOT
    assert [a for a in restore if a.startswith("--external")] == externals


def _tcp_stream_image(timestamp: int) -> bytes:
    import pycriu.images  # type: ignore[import-untyped]

    out = io.BytesIO()
    pycriu.images.dump({"magic": "TCP_STREAM", "entries": [{
        "inq_len": 3, "inq_seq": 7, "outq_len": 5, "outq_seq": 9, "opt_mask": 7,
        "snd_wscale": 7, "mss_clamp": 1460, "rcv_wscale": 7, "timestamp": timestamp,
        "extra": {"inq": base64.encodebytes(b"abc").decode(),
                  "outq": base64.encodebytes(b"hello").decode()}}]}, out)
    return out.getvalue()


def _archive(tmp_path: Path, timestamp: int) -> bytes:
    """Packed as HandOver packs it: GNU tar, images and carried files in two streams."""
    images = tmp_path / "var/lib/transmigrate/migration/0/1"
    images.mkdir(parents=True)
    (images / "tcp-stream-2a.img").write_bytes(_tcp_stream_image(timestamp))
    (images / "core-1.img").write_bytes(b"not a stream")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/carried").write_text("carried\n")
    return subprocess.run(
        ["sh", "-c", "tar -c var/lib/transmigrate/migration/0/1 && tar -c etc/carried"],
        cwd=tmp_path, check=True, capture_output=True).stdout


def test_handed_over_connections_get_millisecond_timestamps(tmp_path: Path) -> None:
    import pycriu.images

    rewritten = with_millisecond_timestamps(_archive(tmp_path / "source", 4_000_001))
    target = tmp_path / "target"
    target.mkdir()
    subprocess.run(["tar", "-x", "--ignore-zeros"], cwd=target, input=rewritten, check=True)
    directory = target / "var/lib/transmigrate/migration/0/1"
    with (directory / "tcp-stream-2a.img").open("rb") as image:
        entry = pycriu.images.load(image)["entries"][0]
    assert entry["timestamp"] == 4_000_002
    assert (entry["inq_len"], entry["outq_len"], entry["mss_clamp"]) == (3, 5, 1460)
    assert base64.b64decode(entry["extra"]["outq"]) == b"hello"
    assert (directory / "core-1.img").read_bytes() == b"not a stream"
    assert (target / "etc/carried").read_text() == "carried\n"


def test_an_archive_with_even_timestamps_is_handed_over_as_it_is(tmp_path: Path) -> None:
    archive = _archive(tmp_path, 4_000_002)
    assert with_millisecond_timestamps(archive) is archive
