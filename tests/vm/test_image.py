"""The guest image: the operator's own packages and files go in, and a change rebuilds it."""

from __future__ import annotations

from pathlib import Path

from transmigrate.config import ACTIVE_KERNEL
from transmigrate.orchestrate import lifecycle
from transmigrate.orchestrate.host import Host
from transmigrate.vm.image import ImageSpec


def test_operator_packages_and_files_are_in_the_image(prepared: Host, tmp_path: Path) -> None:
    files = tmp_path / "guest-files"
    (files / "etc" / "myservice").mkdir(parents=True)
    (files / "etc" / "myservice" / "config").write_text("answer = 42\n")
    spec = ImageSpec(extra_packages=("jq",), files_dir=files)
    image = prepared.image(spec)
    assert image.directory != prepared.image(ImageSpec()).directory
    lifecycle.up(prepared, "t-image", ACTIVE_KERNEL, image_spec=spec, memory_mib=384)
    try:
        assert lifecycle.exec_in(prepared, "t-image", ["jq", "-n", "1+1"]).text.strip() == "2"
        config = lifecycle.exec_in(prepared, "t-image", ["cat", "/etc/myservice/config"])
        assert config.text == "answer = 42\n"
    finally:
        lifecycle.down(prepared, "t-image")
    (files / "etc" / "myservice" / "config").write_text("answer = 43\n")
    assert prepared.image(spec).directory != image.directory, "a changed file rebuilds"
