"""Unit tests for image_factory.baseimage: mirror discovery, checksum file, cache decisions."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from image_factory import baseimage as bi
from image_factory.manifest import sha256_file
from image_factory.settings import Settings

pytestmark = pytest.mark.unit


def test_find_mirror_deb822_skips_security_and_other_suites(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: https://nodesource.example/node\nSuites: nodistro\nComponents: main\n"
    )
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert bi.find_mirror(tmp_path) == "http://mirror.example/debian"


def test_find_mirror_one_line_format(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://other.example/debian bookworm contrib\n"
        "deb [signed-by=/k.gpg] http://ftp.example/debian bookworm main non-free\n"
    )
    assert bi.find_mirror(tmp_path) == "http://ftp.example/debian"


def test_find_mirror_none_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(bi.BaseImageError, match="FACTORY_DEBIAN_MIRROR"):
        bi.find_mirror(tmp_path)


def test_read_sha256_file(tmp_path: Path) -> None:
    f = tmp_path / "x.sha256"
    f.write_text(f"{'a' * 64}  {bi.IMAGE_NAME}\n")
    assert bi.read_sha256_file(f) == "a" * 64
    f.write_text(f"{'a' * 64}  other.qcow2\n")
    assert bi.read_sha256_file(f) is None
    assert bi.read_sha256_file(tmp_path / "missing") is None


def _fake_cached(settings: Settings, content: bytes = b"qcow2 bytes") -> bi.BasePaths:
    p = bi.base_paths(settings)
    p.dir.mkdir(parents=True)
    p.image.write_bytes(content)
    p.sha256.write_text(f"{sha256_file(p.image)}  {bi.IMAGE_NAME}\n")
    p.recipe.write_text(json.dumps({"recipe_hash": bi.recipe_hash()}))
    return p


def test_cache_states(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_mapping({"builds_dir": str(tmp_path)})
    assert bi.cache_state(settings) == "missing"
    p = _fake_cached(settings)
    assert bi.cache_state(settings) == "ok"
    p.image.write_bytes(b"qcow2 bytez")  # same size, different content
    assert bi.cache_state(settings) == "sha256 mismatch (corrupted)"
    p.image.write_bytes(b"qcow2 bytes")
    monkeypatch.setitem(bi.FILES, "etc/hostname", "changed\n")
    assert bi.cache_state(settings) == "recipe changed"
    monkeypatch.undo()
    p.recipe.unlink()
    assert bi.cache_state(settings) == "recipe stamp missing"


def test_ensure_base_image_cache_hit_builds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_mapping({"builds_dir": str(tmp_path)})
    p = _fake_cached(settings)

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("debootstrap must not run on a cache hit")

    monkeypatch.setattr(bi, "_debootstrap", boom)
    monkeypatch.setattr(bi, "_check_tools", boom)
    assert bi.ensure_base_image(settings) == p.image
    with pytest.raises(AssertionError, match="must not run"):
        bi.ensure_base_image(settings, force=True)


def test_recipe_hash_covers_packages_and_init(monkeypatch: pytest.MonkeyPatch) -> None:
    h = bi.recipe_hash()
    monkeypatch.setattr(bi, "PACKAGES", (*bi.PACKAGES, "vim"))
    assert bi.recipe_hash() != h
    monkeypatch.undo()
    monkeypatch.setattr(bi, "INIT_SCRIPT", bi.INIT_SCRIPT + "# x\n")
    assert bi.recipe_hash() != h


def test_configure_removes_identity_and_locks_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for d in ("etc/ssh", "var/lib/dbus", "var/log/apt", "var/lib/cloud/instances/old", "root"):
        (root / d).mkdir(parents=True)
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("secret")
    (root / "etc/ssh/sshd_config").write_text("x")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/dbus/machine-id").write_text("x")
    (root / "var/log/apt/history.log").write_text("build noise")
    (root / "root/.bash_history").write_text("ls")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    bi._configure(root, "http://mirror.example/debian")
    assert sorted(x.name for x in (root / "etc/ssh").iterdir()) == ["sshd_config", "sshd_config.d"]
    assert (root / "etc/machine-id").read_text() == ""
    assert not (root / "var/lib/dbus/machine-id").exists()
    assert (root / "var/log/apt/history.log").read_bytes() == b""
    assert not (root / "root/.bash_history").exists()
    assert list((root / "var/lib/cloud").iterdir()) == []
    assert (root / "etc/shadow").read_text().startswith("root:!*:")
    assert "http://mirror.example/debian bookworm main" in (root / "etc/apt/sources.list").read_text()
    assert (root / "factory-init").stat().st_mode & 0o111
    assert "datasource_list: [ NoCloud, None ]" in (root / "etc/cloud/cloud.cfg.d/90-factory.cfg").read_text()


def test_finalize_fs_removes_init_script_and_proves_clean(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "factory-init").write_text("#!/bin/sh\n")
    (root / "etc/hostname").write_text("debian\n")
    part = tmp_path / "part.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(part), "8M"], check=True)
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as fh:
        fh.truncate(10 * 1024 * 1024)
    bi._copy_sparse(part, raw, bi.PART_START_MIB * 1024 * 1024)
    bi._finalize_fs(raw)
    spec = f"{raw}?offset={bi.PART_START_MIB * 1024 * 1024}"
    listing = subprocess.run(["debugfs", "-R", "ls /", spec], capture_output=True, text=True).stdout
    assert "factory-init" not in listing and "etc" in listing
    # A second run finds no script: an error, not a silent success.
    with pytest.raises(bi.BaseImageError, match="factory-init"):
        bi._finalize_fs(raw)
