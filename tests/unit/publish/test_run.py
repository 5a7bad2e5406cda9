"""publish.run: the local inputs are checked before any host is contacted (no processes)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest

from image_factory.image import manifest as mf
from image_factory.publish.model import PublishError
from image_factory.publish.run import load_artifact, publish_image
from image_factory.settings import Settings

from ._support import manifest

pytestmark = pytest.mark.unit


def _write_build(builds: Path, m: mf.Manifest, data: bytes) -> Path:
    d = builds / m.image
    d.mkdir(parents=True)
    (d / m.artifact.path).write_bytes(data)
    mf.save(d, m)
    return d


def test_load_artifact_refuses_untested_tampered_and_missing(tmp_path: Path, site: Any) -> None:
    data = b"qcow2-ish bytes"
    sha = hashlib.sha256(data).hexdigest()
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "b")})
    with pytest.raises(mf.ManifestError, match="build the image first"):
        load_artifact(settings, site, "debian-lab", force_untested=False)
    _write_build(settings.builds_dir, manifest(sha=sha, tested=False), data)
    with pytest.raises(PublishError, match="no passing image test"):
        load_artifact(settings, site, "debian-lab", force_untested=False)
    art = load_artifact(settings, site, "debian-lab", force_untested=True)
    assert art.forced and not art.tested and art.size == len(data)

    settings2 = Settings.from_mapping({"builds_dir": str(tmp_path / "c")})
    # a test result for another sha256 does not count
    other = manifest(sha=sha)
    assert other.image_test is not None
    other.image_test.artifact_sha256 = "0" * 64
    _write_build(settings2.builds_dir, other, data)
    with pytest.raises(PublishError, match="no passing image test"):
        load_artifact(settings2, site, "debian-lab", force_untested=False)

    settings3 = Settings.from_mapping({"builds_dir": str(tmp_path / "d")})
    d = _write_build(settings3.builds_dir, manifest(sha=sha), data)
    assert load_artifact(settings3, site, "debian-lab", force_untested=False).tested
    (d / "debian-lab.qcow2").write_bytes(b"changed")
    with pytest.raises(PublishError, match="does not match the manifest"):
        load_artifact(settings3, site, "debian-lab", force_untested=False)


def test_publish_image_validates_before_contacting_hosts(tmp_path: Path, site: Any) -> None:
    settings = Settings.from_mapping({"builds_dir": str(tmp_path)})
    with pytest.raises(PublishError, match="unknown transport"):
        publish_image(settings, site, "debian-lab", transport="ftp", progress=False)
    with pytest.raises(PublishError, match="--keep"):
        publish_image(settings, site, "debian-lab", keep=0, progress=False)
    with pytest.raises(Exception, match="no such hypervisor"):
        publish_image(settings, site, "debian-lab", hypervisors=["nope"], progress=False)
    with pytest.raises(Exception, match="no such image"):
        publish_image(settings, site, "nope", progress=False)




def test_a_microsoft_2023_build_is_published_only_with_its_own_verified_efi_vars_store(tmp_path: Path,
                                                                                        site: Any) -> None:
    """keys: microsoft-2023 imports the build's enrolled store: a manifest naming none, a missing store or one
    whose bytes changed is refused before any host; the artifact carries it with its import name otherwise."""
    data, store = b"qcow2-ish bytes", b"vars" * 1024
    fields = {"firmware": "uefi", "secure_boot": True, "secure_boot_keys": "microsoft-2023", "machine": "q35"}
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "b")})
    d = _write_build(settings.builds_dir, dataclasses.replace(manifest(sha=hashlib.sha256(data).hexdigest()), **fields),
                     data)
    with pytest.raises(PublishError, match="names none .* rebuild it"):
        load_artifact(settings, site, "debian-lab", force_untested=False)
    m = mf.require(d)
    m.efi_vars, m.efi_vars_sha256 = "efivars.raw", hashlib.sha256(store).hexdigest()
    mf.save(d, m)
    with pytest.raises(PublishError, match="efivars.raw, the EFI variable store the manifest names, does not exist"):
        load_artifact(settings, site, "debian-lab", force_untested=False)
    (d / "efivars.raw").write_bytes(store)
    art = load_artifact(settings, site, "debian-lab", force_untested=False)
    assert art.efi_vars == d / "efivars.raw" and art.efi_vars_file == art.import_file.removesuffix(".qcow2") + \
        ".efivars.raw"
    (d / "efivars.raw").write_bytes(store + b"!")
    with pytest.raises(PublishError, match="the store changed after the build"):
        load_artifact(settings, site, "debian-lab", force_untested=False)
    m.secure_boot_keys = "microsoft-2011+2023"  # PVE's own store: the build's is not needed, nor read
    mf.save(d, m)
    assert load_artifact(settings, site, "debian-lab", force_untested=False).efi_vars is None
