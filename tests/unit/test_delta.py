"""A delta publish's two sides with the real qemu-img, no host: image/delta.py makes the delta and keeps the base;
upload_delta_host.sh, run here by sh against a temp import directory as sshd would run it, rebuilds the image."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from image_factory.image import delta as delta_mod
from image_factory.image import manifest as mf
from image_factory.image.builddir import BuildDir
from image_factory.lab import factories
from image_factory.pve.upload_delta import HOST_SCRIPT, delta_name, leftover_names
from image_factory.settings import REPO_ROOT

pytestmark = [pytest.mark.unit, pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")]

SCRIPT = REPO_ROOT / "src/image_factory/pve" / HOST_SCRIPT
MIB = 1024 * 1024
CLUSTER = 64 * 1024


def build(bd: BuildDir, raw: bytes, build_id: str) -> mf.Manifest:
    art = factories.qcow2_of(raw, bd.path / "disk.qcow2")
    m = factories.manifest_of(art, "debian-lab", build_id=build_id)
    m.artifact.path = art.name
    bd.save(m)
    return m


@pytest.fixture
def v1_v2(tmp_path: Path) -> tuple[BuildDir, bytes, bytes]:
    bd = BuildDir(tmp_path / "builds" / "debian-lab")
    bd.path.mkdir(parents=True)
    v1 = random.Random(1).randbytes(16 * MIB)
    return bd, v1, factories.clusters_changed(v1, 0.05, 2)


def rebuild(import_dir: Path, base: str, final: str, guest: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(SCRIPT), str(import_dir), base, delta_name(final), final, guest],
                          capture_output=True, text=True, check=False)


def test_the_delta_holds_only_the_changed_clusters_and_the_host_rebuilds_the_guest_view(
        v1_v2: tuple[BuildDir, bytes, bytes], tmp_path: Path) -> None:
    bd, v1, v2 = v1_v2
    m1 = build(bd, v1, "b1")
    assert delta_mod.make_delta(bd, m1, bd.artifact(m1)) is None  # nothing published yet
    base = delta_mod.keep_published(bd, m1, bd.artifact(m1))
    m2 = build(bd, v2, "b2")
    d = delta_mod.make_delta(bd, m2, bd.artifact(m2))
    assert d is not None and d.base == base
    # 5% of the clusters changed: the delta holds about them (plus qcow2's tables), not the 16 MiB image
    assert 0.04 * len(v2) < d.size < 0.10 * len(v2), d.size
    assert d.guest_sha256 == hashlib.sha256(v2).hexdigest() == bd.require().guest_sha256  # recorded in the manifest
    assert delta_mod.make_delta(bd, m2, bd.artifact(m2)) == d  # a re-run reuses it
    host = tmp_path / "import"
    host.mkdir()
    shutil.copy(bd.path / "published" / base.file, host / "base.qcow2")
    shutil.copy(d.path, host / delta_name("new.qcow2"))
    done = rebuild(host, "base.qcow2", "new.qcow2", d.guest_sha256)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["OK", str((host / "new.qcow2").stat().st_size)]
    assert sorted(p.name for p in host.iterdir()) == ["base.qcow2", "new.qcow2"]  # the delta and temps removed
    info = subprocess.run(["qemu-img", "info", str(host / "new.qcow2")], capture_output=True, text=True).stdout
    assert "backing file" not in info  # independent of the base
    assert delta_mod.guest_sha256(host / "new.qcow2", "qcow2") == d.guest_sha256
    assert mf.sha256_file(host / "base.qcow2") == base.sha256  # the base never written


def test_the_delta_is_compressed(v1_v2: tuple[BuildDir, bytes, bytes], tmp_path: Path) -> None:
    """Changed clusters that compress (text, zeros: most of a package update) cost less than their size."""
    bd, v1, _ = v1_v2
    m1 = build(bd, v1, "b1")
    delta_mod.keep_published(bd, m1, bd.artifact(m1))
    data = bytearray(v1)
    data[4 * MIB:5 * MIB] = b"factory-canary 1.1\n" * (MIB // 19) + bytes(MIB % 19)  # 1 MiB of one line
    m2 = build(bd, bytes(data), "b2")
    d = delta_mod.make_delta(bd, m2, bd.artifact(m2))
    assert d is not None and d.size < MIB // 2, d.size  # uncompressed: 1 MiB and the tables
    host = tmp_path / "import"
    host.mkdir()
    shutil.copy(bd.published / delta_mod.published_base(bd).file, host / "base.qcow2")  # type: ignore[union-attr]
    shutil.copy(d.path, host / delta_name("new.qcow2"))
    assert rebuild(host, "base.qcow2", "new.qcow2", d.guest_sha256).returncode == 0
    assert delta_mod.guest_sha256(host / "new.qcow2", "qcow2") == hashlib.sha256(data).hexdigest()


def test_a_corrupted_or_missing_base_fails_and_leaves_nothing(v1_v2: tuple[BuildDir, bytes, bytes],
                                                              tmp_path: Path) -> None:
    bd, v1, v2 = v1_v2
    m1 = build(bd, v1, "b1")
    base = delta_mod.keep_published(bd, m1, bd.artifact(m1))
    m2 = build(bd, v2, "b2")
    d = delta_mod.make_delta(bd, m2, bd.artifact(m2))
    assert d is not None
    host = tmp_path / "import"
    host.mkdir()
    corrupt = host / "base.qcow2"
    factories.qcow2_of(factories.clusters_changed(v1, 0.01, 3), corrupt)  # another image of the same size
    shutil.copy(d.path, host / delta_name("new.qcow2"))
    bad = rebuild(host, "base.qcow2", "new.qcow2", d.guest_sha256)
    assert bad.returncode == 6 and bad.stdout.startswith("BAD "), (bad.stdout, bad.stderr)
    assert sorted(p.name for p in host.iterdir()) == ["base.qcow2"]
    shutil.copy(d.path, host / delta_name("new.qcow2"))
    missing = rebuild(host, "gone.qcow2", "new.qcow2", d.guest_sha256)
    assert missing.returncode == 3 and "gone.qcow2" in missing.stderr
    assert sorted(p.name for p in host.iterdir()) == ["base.qcow2"]
    assert not set(leftover_names("new.qcow2")) & {p.name for p in host.iterdir()}
    del base


def test_a_changed_base_file_or_another_size_makes_no_delta(v1_v2: tuple[BuildDir, bytes, bytes]) -> None:
    bd, v1, v2 = v1_v2
    m1 = build(bd, v1, "b1")
    base = delta_mod.keep_published(bd, m1, bd.artifact(m1))
    kept = bd.path / "published" / base.file
    os.chmod(kept, 0o644)
    with kept.open("r+b") as fh:  # changed after it was kept: never used as a base
        fh.seek(MIB)
        fh.write(b"x" * 4096)
    m2 = build(bd, v2, "b2")
    assert delta_mod.published_base(bd) is None
    assert delta_mod.make_delta(bd, m2, bd.artifact(m2)) is None
    with pytest.raises(delta_mod.DeltaError, match="no longer has the published build's sha256"):
        delta_mod.keep_published(bd, m1, bd.artifact(m1))  # b2 has replaced b1's artifact since
    m1 = build(bd, v1, "b1")
    delta_mod.keep_published(bd, m1, bd.artifact(m1))  # kept again: a fresh copy
    names = sorted(p.name for p in bd.published.iterdir() if not p.name.endswith("-stamp"))
    assert names == [".lock", "base-b1.qcow2", "base.json"]  # no temporary copy left by the refused one
    m3 = build(bd, v2 + bytes(MIB), "b3")  # a bigger disk
    with pytest.raises(delta_mod.DeltaError, match=r"base \(build b1\) is a qcow2 of 16777216 bytes, this build a "
                                                   r"qcow2 of 17825792: a delta needs two qcow2 disks of one size"):
        delta_mod.make_delta(bd, m3, bd.artifact(m3))
    m1 = build(bd, v1, "b1")
    assert delta_mod.make_delta(bd, m1, bd.artifact(m1)) is None  # the base itself


def test_an_old_manifest_without_the_guest_digest_still_reads(tmp_path: Path) -> None:
    art = factories.qcow2_of(bytes(MIB), tmp_path / "disk.qcow2")
    data = factories.manifest_of(art, "debian-lab", build_id="b0").to_dict()
    del data["guest_sha256"]
    assert mf.Manifest.from_dict(data).guest_sha256 == ""
