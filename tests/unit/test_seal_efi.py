"""The seal's EFI step (ansible/roles/seal, Debian): its own shell, run against a scratch fstab and ESP, with
mountpoint and findmnt standing in for the guest's. The booted fixture is checked by
tests/image/test_common.py (tests/e2e/test_build_e2e.py's UEFI build)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit

STEP = "Keep the EFI boot path by UUID (Debian, UEFI)"
ESP_UUID, ROOT_UUID = "ABCD-1234", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
STUB = f"search.fs_uuid {ROOT_UUID} root\nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n"
FSTAB = "# /etc/fstab\nUUID={root} / ext4 defaults 0 1\n{esp} /boot/efi vfat umask=0077 0 2\n"


def run_step(tmp_path: Path, *, mounted: bool = True) -> subprocess.CompletedProcess[str]:
    tasks = yaml.safe_load((REPO_ROOT / "ansible/roles/seal/tasks/main.yml").read_text())
    task = next(t for t in tasks if t.get("name") == STEP)
    assert task["when"] == "factory_family == 'debian'"
    script = (task["ansible.builtin.shell"].replace("/etc/fstab", f"{tmp_path}/etc/fstab")
              .replace("/boot/efi/EFI", f"{tmp_path}/esp/EFI"))
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "mountpoint").write_text(f"#!/bin/sh\nexit {0 if mounted else 1}\n")
    (fake / "findmnt").write_text(f'#!/bin/sh\ncase "$3" in /boot/efi) echo {ESP_UUID} ;; /) echo {ROOT_UUID} ;; '
                                  "*) exit 1 ;; esac\n")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True,
                          env={"PATH": f"{fake}:/usr/bin:/bin"})


def scratch(tmp_path: Path, esp_spec: str, stub: str | None) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/fstab").write_text(FSTAB.format(root=ROOT_UUID, esp=esp_spec))
    if stub is not None:
        (tmp_path / "esp/EFI/debian").mkdir(parents=True)
        (tmp_path / "esp/EFI/debian/grub.cfg").write_text(stub)


@pytest.mark.parametrize(("esp_spec", "stub"), [
    ("/dev/vda15", STUB.replace(ROOT_UUID, "3b2c6a1e-5d0f-4f6e-9a51-0f1ac70e2d12")),
    ("PARTUUID=eece43c4-ae0f-4547-a42b-155ef6e4887e", None),
])
def test_a_clone_finds_the_esp_and_the_root_by_their_uuids(tmp_path: Path, esp_spec: str, stub: str | None) -> None:
    scratch(tmp_path, esp_spec, stub)
    proc = run_step(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "a change is reported (changed_when reads stdout)"
    assert (tmp_path / "etc/fstab").read_text().splitlines()[2].split()[:2] == [f"UUID={ESP_UUID}", "/boot/efi"]
    assert (tmp_path / "etc/fstab").read_text().splitlines()[:2] == FSTAB.splitlines()[:1] + [
        f"UUID={ROOT_UUID} / ext4 defaults 0 1"]
    assert (tmp_path / "esp/EFI/debian/grub.cfg").read_text() == STUB


def test_a_sealed_esp_is_left_as_it_is(tmp_path: Path) -> None:
    scratch(tmp_path, f"UUID={ESP_UUID}", STUB)
    before = (tmp_path / "etc/fstab").read_text()
    proc = run_step(tmp_path)
    assert proc.returncode == 0 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert (tmp_path / "etc/fstab").read_text() == before
    assert (tmp_path / "esp/EFI/debian/grub.cfg").read_text() == STUB


def test_a_bios_template_is_not_touched(tmp_path: Path) -> None:
    scratch(tmp_path, "/dev/vda15", None)
    proc = run_step(tmp_path, mounted=False)
    assert proc.returncode == 0 and proc.stdout == ""
    assert "/dev/vda15 /boot/efi" in (tmp_path / "etc/fstab").read_text()
    assert not (tmp_path / "esp").exists()


def test_a_mounted_esp_fstab_does_not_name_stops_the_seal(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/fstab").write_text(f"UUID={ROOT_UUID} / ext4 defaults 0 1\n")
    proc = run_step(tmp_path)
    assert proc.returncode == 1 and "does not mount it" in proc.stderr
