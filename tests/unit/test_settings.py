"""Settings: defaults, overrides, and where shared downloads go."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_factory.lab import baseimage
from image_factory.settings import Settings

pytestmark = pytest.mark.unit


def test_relative_paths_are_under_the_repo_and_flags_win(tmp_path: Path) -> None:
    s = Settings.from_mapping({"builds_dir": "out", "accelerator": "tcg", "ansible_strategy": None}, root=tmp_path)
    assert s.builds_dir == tmp_path / "out" and s.lab_dir == tmp_path / ".lab"
    assert s.accelerator == "tcg" and s.ansible_strategy == "auto"


def test_cache_dir_follows_xdg_and_is_shared_by_clones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    one = Settings.from_mapping({}, root=tmp_path / "clone-1")
    two = Settings.from_mapping({}, root=tmp_path / "clone-2")
    assert one.cache_dir == two.cache_dir == tmp_path / "xdg/deevnet-image-factory"
    # The base image itself stays per clone; only the downloads are shared.
    assert baseimage.base_paths(one).debs == baseimage.base_paths(two).debs == one.cache_dir / "debs"
    assert baseimage.base_paths(one).image != baseimage.base_paths(two).image
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert Settings.from_mapping({}).cache_dir == Path("~/.cache/deevnet-image-factory").expanduser()
    assert Settings.from_mapping({"cache_dir": str(tmp_path / "c")}).cache_dir == tmp_path / "c"


def test_from_environment_reads_what_invoke_reads(tmp_path: Path) -> None:
    s = Settings.from_environment({"INVOKE_FACTORY_SITE_DIR": str(tmp_path), "INVOKE_FACTORY_IMAGES": "cat.yml",
                                   "INVOKE_FACTORY_ACCELERATOR": "tcg", "UNRELATED": "x"})
    assert s.root == tmp_path and s.images == tmp_path / "cat.yml" and s.accelerator == "tcg"
    assert Settings.from_environment({}) == Settings.from_mapping({})
