"""Adding an image family is one module (tests/unit/families_stub/alpine_family.py) plus catalogue entries."""

from __future__ import annotations

import importlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from image_factory import families
from image_factory.image import contents, render, strategy
from image_factory.settings import REPO_ROOT, Settings
from image_factory.site.inventory import Image, load_site

pytestmark = pytest.mark.unit


@pytest.fixture
def alpine() -> Iterator[families.Family]:
    sys.path.insert(0, str(Path(__file__).parent / "families_stub"))
    try:
        module = importlib.import_module("alpine_family")
        yield module.ALPINE
    finally:
        families.FAMILIES.pop("alpine", None)
        sys.modules.pop("alpine_family", None)
        sys.path.remove(str(Path(__file__).parent / "families_stub"))


def test_a_stub_family_needs_one_module_and_a_catalogue_entry(alpine: families.Family, tmp_path: Path) -> None:
    for d in ("packer", "kickstart", "ansible"):
        shutil.copytree(REPO_ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    base = tmp_path / "builds/base"
    base.mkdir(parents=True)
    (base / "alpine.qcow2").write_bytes(b"qcow2")
    catalogue = tmp_path / "packer/images.yml"
    data = yaml.safe_load(catalogue.read_text())
    data["images"]["alpine-lab"] = {"family": "alpine", "release": 21, "mode": "cloud",
                                    "source": {"url": "builds/base/alpine.qcow2", "checksum": "none"}}
    catalogue.write_text(yaml.safe_dump(data))
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds")}, root=tmp_path)
    image = load_site(REPO_ROOT / "ansible/inventory", catalogue).images["alpine-lab"]
    # the catalogue, the render and the build's choices all come from the family
    assert [r.name for r in image.upstream_repositories] == ["http://dl.example/alpine v3.21"]
    result = render.render_image(settings, image, packer_version=(1, 6, 6))
    try:
        assert result.kickstart is None and "alpine-lab.qcow2" in result.hcl.read_text()
    finally:
        result.cleanup()
    assert strategy.resolve_ansible_strategy("auto", "tcg", "alpine").name == "linear"
    listed = contents.read_contents(lambda cmd: "installed\tmusl\t1.2.5-r8\tx86_64\n" if "apk" in cmd else "x\n",
                                    "alpine")
    assert [p.name for p in listed.packages] == ["musl"]
    assert contents.purl(listed, listed.packages[0]).startswith("pkg:apk/")


def test_iso_mode_needs_the_familys_installer_and_unknown_families_are_named(alpine: families.Family) -> None:
    entry = {"name": "alpine-iso", "family": "alpine", "release": 21, "mode": "iso",
             "source": {"url": "https://dl.example/alpine.iso", "checksum": "sha256:" + "a" * 64}, "eol": "2027-01-01"}
    with pytest.raises(ValidationError, match="mode: iso needs an installer, and the alpine family has none"):
        Image.model_validate(entry)
    with pytest.raises(ValidationError, match=r"unknown image family 'gentoo' \(known: alpine, debian, fedora\)"):
        Image.model_validate({**entry, "family": "gentoo", "mode": "cloud"})
