"""tools.unpack_cloud_init: a distribution's cloud-init package unpacked into a venv, never installed. The package
is a real .deb made with dpkg-deb; apt-get is a stub that "downloads" it (no network, no package state touched)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from image_factory import tools

pytestmark = pytest.mark.unit

MAIN = "import sys\n\ndef main():\n    print('cloud-init 99.1', sys.argv[1:])\n    return 0\n"


def fake_deb(where: Path) -> Path:
    """A cloud-init_99.1_all.deb holding a cloudinit package whose cmd.main prints its arguments."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    root = where / "pkg"
    lib = root / "usr/lib/python3/dist-packages/cloudinit"
    (lib / "cmd").mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "cmd/__init__.py").write_text("")
    (lib / "cmd/main.py").write_text(MAIN)
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text("Package: cloud-init\nVersion: 99.1\nArchitecture: all\n"
                                         "Maintainer: t <t@example.org>\nDescription: test\n")
    deb = where / "cloud-init_99.1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True,
                   capture_output=True, timeout=60)
    return deb


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A venv (its python is this one) and a PATH whose apt-get serves ``$DEB`` (or fails when it is unset)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").symlink_to(sys.executable)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "apt-get").write_text('#!/bin/sh\n[ -n "$DEB" ] || { echo "E: Unable to locate package" >&2; exit 100; }'
                                   '\ncp "$DEB" .\n')
    (stubs / "apt-get").chmod(0o755)
    dpkg = shutil.which("dpkg-deb")
    monkeypatch.setenv("PATH", f"{stubs}:{Path(dpkg).parent if dpkg else '/usr/bin'}")
    monkeypatch.delenv("DEB", raising=False)
    return venv, tmp_path


def test_the_package_is_unpacked_into_the_venv_with_a_launcher_the_finder_uses(machine: tuple[Path, Path],
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    venv, tmp = machine
    monkeypatch.setenv("DEB", str(fake_deb(tmp)))
    assert "unpacked from cloud-init_99.1_all.deb" in tools.unpack_cloud_init("apt", venv)
    launcher = venv / "bin/cloud-init"
    done = subprocess.run([str(launcher), "schema", "--config-file", "x"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": ""})
    assert done.stdout == "cloud-init 99.1 ['schema', '--config-file', 'x']\n", done.stderr
    assert not list(venv.glob("tmp*")), "the work directory is gone"
    assert "already unpacked" in tools.unpack_cloud_init("apt", venv), "a second run downloads nothing"
    monkeypatch.setattr(tools, "venv_bin", lambda: venv / "bin")
    assert tools.find("cloud-init") == str(launcher)


def test_a_failed_download_names_it_and_leaves_nothing(machine: tuple[Path, Path]) -> None:
    venv, _ = machine
    with pytest.raises(tools.UnpackError, match="apt-get download cloud-init failed: E: Unable to locate package"):
        tools.unpack_cloud_init("apt", venv)
    assert sorted(p.name for p in venv.iterdir()) == [".cloud-init.lock", "bin"]
    assert os.listdir(venv / "bin") == ["python"]
    assert tools.main(["unpack-cloud-init"]) == 2
