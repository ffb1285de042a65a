"""The guest image: the operator's own packages and files go in, a change rebuilds it, and
the rebuild removes what it superseded."""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path

from transmigrate.config import ACTIVE_KERNEL
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.vm.image import GuestImage, ImageSpec


def test_operator_packages_and_files_are_in_the_image(prepared: Host, tmp_path: Path) -> None:
    files = tmp_path / "guest-files"
    (files / "etc" / "myservice").mkdir(parents=True)
    token = secrets.token_hex(4)  # content of its own, so that this run builds and prunes
    (files / "etc" / "myservice" / "config").write_text(f"answer = 42 {token}\n")
    spec = ImageSpec(extra_packages=("jq",), files_dir=files)
    image = prepared.image(spec)
    assert image.directory != prepared.image(ImageSpec()).directory
    lifecycle.up(prepared, "t-image", ACTIVE_KERNEL, image_spec=spec, memory_mib=384)
    try:
        assert lifecycle.exec_in(prepared, "t-image", ["jq", "-n", "1+1"]).text.strip() == "2"
        config = lifecycle.exec_in(prepared, "t-image", ["cat", "/etc/myservice/config"])
        assert config.text == f"answer = 42 {token}\n"
    finally:
        lifecycle.down(prepared, "t-image")
    (files / "etc" / "myservice" / "config").write_text(f"answer = 43 {token}\n")
    assert prepared.image(spec).directory != image.directory, "a changed file rebuilds"
    shutil.rmtree(image.directory)  # which build a rebuild removes: the test below


def test_only_unused_older_builds_of_the_same_request_are_superseded(tmp_path: Path) -> None:
    image = GuestImage(ImageSpec(), tmp_path)

    def built(name: str, packages: list[str]) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        (directory / "rootfs.img").write_bytes(b"ext4")
        (directory / "image.json").write_text(json.dumps({"packages": packages, "files": ""}))
        return directory

    ours = ImageSpec().all_packages()
    built(image.directory.name, ours)
    older = built("older", ours)
    open_by_a_vm = built("running", ours)
    built("other", [*ours, "jq"])
    (tmp_path / ".build-partial").mkdir()
    with (open_by_a_vm / "rootfs.img").open("rb"):
        assert image.superseded() == [older]
