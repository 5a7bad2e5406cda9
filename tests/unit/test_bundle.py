"""The factory inside an image (image/bundle.py): its wheel, its lock, the guest's wheelhouse.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from image_factory.image import buildevents, bundle, render
from image_factory.settings import REPO_ROOT, Settings
from image_factory.site.inventory import load_site

pytestmark = pytest.mark.unit


def test_factory_bundle_is_the_wheel_and_the_lock_built_outside_the_checkout(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The factory's own wheel (debian-lab-builder, factory: true) is built from a copy of its sources: the
    checkout gets no build/ or egg-info, and the bundle holds exactly the wheel and the hashed lock."""
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds")}, root=REPO_ROOT)
    image = load_site(settings.inventory, settings.images).images["debian-lab-builder"]
    before = sorted(p.name for p in REPO_ROOT.iterdir())
    bundle_dir, work = tmp_path / "secret" / render.FACTORY_BUNDLE_DIR, tmp_path / "work"
    work.mkdir()
    fetched: list[tuple[str, Path]] = []  # the lock's files come from PyPI: the e2e build fetches them for real
    monkeypatch.setattr(bundle, "guest_wheelhouse", lambda s, i, dest: fetched.append((i.name, dest)))
    bundle.factory_bundle(settings, image, bundle_dir, work)
    assert fetched == [("debian-lab-builder", bundle_dir / "wheelhouse.tar")]
    names = sorted(p.name for p in bundle_dir.iterdir())
    assert len(names) == 2 and names[0].startswith("deevnet_image_factory-") and names[0].endswith("-py3-none-any.whl")
    assert names[1] == "requirements.txt"
    assert (bundle_dir / "requirements.txt").read_bytes() == (REPO_ROOT / render.FACTORY_LOCK).read_bytes()
    assert "--hash=sha256:" in (bundle_dir / "requirements.txt").read_text()
    assert stat.S_IMODE(bundle_dir.stat().st_mode) == 0o700
    assert sorted(p.name for p in REPO_ROOT.iterdir()) == before
    assert list(work.iterdir()) == []


def test_guest_wheelhouse_needs_the_images_python(tmp_path: Path) -> None:
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds")}, root=REPO_ROOT)
    image = load_site(settings.inventory, settings.images).images["debian-lab-builder"]
    with pytest.raises(buildevents.BuildError, match="release 99's"):
        bundle.guest_wheelhouse(settings, image.model_copy(update={"release": 99}), tmp_path / "w.tar")


@pytest.mark.parametrize(("python", "wanted", "left_out"), [((3, 13), "ansible-core==2.21.5", "ansible-core==2.19.14"),
                                                            ((3, 11), "ansible-core==2.19.14", "ansible-core==2.21.5")])
def test_guest_lock_keeps_the_entries_for_the_guests_python(tmp_path: Path, python: tuple[int, int], wanted: str,
                                                           left_out: str) -> None:
    """pip download reads the lock's markers for this machine's Python: the guest's entries are chosen first."""
    out = bundle.guest_lock(REPO_ROOT / render.FACTORY_LOCK, python, tmp_path / "guest.txt").read_text()
    assert f"\n{wanted} \\\n    --hash=sha256:" in out and left_out not in out and ";" not in out
    assert 0 < out.count("==") < (REPO_ROOT / render.FACTORY_LOCK).read_text().count("==")
