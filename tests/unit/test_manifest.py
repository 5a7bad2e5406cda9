"""The manifest (image/manifest.py): its artifact hash check and how a build assembles it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from image_factory.image.manifest import (
    Artifact,
    ImageTestResult,
    Made,
    ManifestError,
    assemble,
    load,
    record_test_result,
    save,
    sha256_file,
)
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import Image, load_site

pytestmark = pytest.mark.unit


def test_an_unchanged_artifact_is_not_hashed_again_and_any_change_is_seen(tmp_path: Path, monkeypatch) -> None:
    from image_factory.image import manifest as mf

    art = tmp_path / "x.qcow2"
    art.write_bytes(b"data")
    sha = sha256_file(art)
    old = time.time_ns() - 10**10  # settled: changed long enough ago for a stamp
    os.utime(art, ns=(old, old))
    monkeypatch.setattr(mf, "STAMP_SETTLE_NS", 0)
    assert mf.has_sha256(art, sha) and (tmp_path / ".x.qcow2.sha256-stamp").is_file()
    hashed: list[Path] = []
    real = mf.sha256_file
    monkeypatch.setattr(mf, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert mf.has_sha256(art, sha) and hashed == []  # remembered
    assert not mf.has_sha256(art, "0" * 64) and hashed == [art]  # another digest is checked, not trusted
    art.write_bytes(b"datb")  # same size; new content, so a new ctime
    os.utime(art, ns=(old, old))  # even with the old mtime put back
    assert not mf.has_sha256(art, sha) and len(hashed) == 2


def _catalogue() -> dict[str, Image]:
    return load_site(REPO_ROOT / "ansible/inventory", REPO_ROOT / "packer/images.yml").images


def _made(**fields: object) -> Made:
    base: dict[str, object] = {
        "fingerprint": "f1", "inputs": {"catalogue": "c"}, "recipe": "r1", "tools": {"packer": "1.6.6"},
        "git": {"commit": "abc", "dirty": False}, "started_at": "2026-12-01T00:00:00Z",
        "finished_at": "2026-12-01T00:10:00Z", "accelerator": "tcg", "ansible_strategy": "linear",
        "source": {"url": "u", "checksum": "c"}, "secure_boot_enrolled": [],
    }
    return Made(**{**base, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["debian-lab", "fedora-44"])
def test_a_builds_manifest_is_the_catalogue_entry_the_artifact_and_how_it_was_made(tmp_path: Path, name: str) -> None:
    image = _catalogue()[name]
    artifact = Artifact(path=f"{name}.qcow2", format="qcow2", virtual_size=2**31, disk_size=5, sha256="ab" * 32)
    enrolled = [{"variable": "db", "subject": "CN=x", "sha256": "00", "not_after": "2030"}]
    m = assemble(image, artifact, _made(secure_boot_enrolled=enrolled))
    assert (m.image, m.family, m.release, m.mode) == (name, image.family, image.release, image.mode)
    assert m.build_id == "ab" * 6 and m.artifact == artifact
    assert m.platform == image.platform  # firmware, Secure Boot and its keys, TPM, machine: as the catalogue says
    assert (m.fingerprint, m.recipe, m.accelerator, m.ansible_strategy) == ("f1", "r1", "tcg", "linear")
    assert m.secure_boot_enrolled == enrolled and m.source == {"url": "u", "checksum": "c"}
    assert m.image_test is None and not m.skip_tests and not m.tested_ok()
    save(tmp_path, m)
    assert load(tmp_path) == m  # what the build writes is what test and publish read back


def test_a_result_of_an_artifact_rebuilt_during_its_test_is_not_recorded(tmp_path: Path) -> None:
    image = _catalogue()["debian-lab"]
    old = Artifact(path="debian-lab.qcow2", format="qcow2", virtual_size=2**31, disk_size=5, sha256="ab" * 32)
    save(tmp_path, assemble(image, old, _made()))
    passed = ImageTestResult(status="passed", passed=3, artifact_sha256=old.sha256)
    assert record_test_result(tmp_path, passed).tested_ok()
    rebuilt = assemble(image, dataclasses.replace(old, sha256="cd" * 32), _made())
    save(tmp_path, rebuilt)  # a build replaced the artifact while the test booted the old one
    with pytest.raises(ManifestError, match="rebuilt while the image test ran"):
        record_test_result(tmp_path, passed)
    assert load(tmp_path) == rebuilt  # the new build's manifest is kept as it was, untested
