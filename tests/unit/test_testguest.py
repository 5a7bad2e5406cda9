"""The image test's guest (image/testguest.py): the host keys it announces, its NoCloud seed and key, and
QEMU starting it with each firmware."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import paramiko
import pytest
import yaml

from image_factory.image import testguest
from image_factory.settings import Settings

pytestmark = pytest.mark.unit

SERIAL = """\
[   12.3] cloud-init[401]: Cloud-init v. 22.4.2 running 'modules:config'
\r-----BEGIN SSH HOST KEY KEYS-----\r
ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBOLD= root@old\r
-----END SSH HOST KEY KEYS-----\r
[   20.1] random: crng init done
-----BEGIN SSH HOST KEY KEYS-----
ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBNEW= root@t1\r
[   21.0] virtio_net virtio1 ens3: renamed
ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEEYFX41GD5/IIyO1861tMwy4wq9taoDMuqhS9CXhxhT root@t1
-----END SSH HOST KEY KEYS-----
"""


def test_parse_host_keys_takes_last_block_and_ignores_noise() -> None:
    keys = testguest.parse_host_keys(SERIAL)
    assert keys == [
        ("ecdsa-sha2-nistp256", "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBNEW="),
        ("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIEEYFX41GD5/IIyO1861tMwy4wq9taoDMuqhS9CXhxhT"),
    ]


def test_parse_host_keys_incomplete_block_is_nothing() -> None:
    assert testguest.parse_host_keys("-----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 AAAA root@x\n") == []
    assert testguest.parse_host_keys("") == []


def test_known_hosts_lines_bracket_non_default_port() -> None:
    keys = [("ssh-ed25519", "AAAAC3")]
    assert testguest.known_hosts_lines(keys, "127.0.0.1", 2222) == "[127.0.0.1]:2222 ssh-ed25519 AAAAC3\n"
    assert testguest.known_hosts_lines(keys, "127.0.0.1", 22) == "127.0.0.1 ssh-ed25519 AAAAC3\n"


def test_seed_files_carry_key_user_hostname_and_mac() -> None:
    files = testguest.seed_files("test-x", "iid-1", "ssh-ed25519 AAAAkey test", "02:DE:E7:00:00:5E")
    meta = yaml.safe_load(files["meta-data"])
    assert meta == {"instance-id": "iid-1", "local-hostname": "test-x"}
    assert files["user-data"].startswith("#cloud-config\n")
    user = yaml.safe_load(files["user-data"])
    assert user["users"][0] == "default"
    test_user = user["users"][1]
    assert test_user["name"] == testguest.TEST_USER and test_user["lock_passwd"] is True
    assert test_user["ssh_authorized_keys"] == ["ssh-ed25519 AAAAkey test"]
    assert "ssh_pwauth" not in user  # the image's own sshd setting is what the suite checks
    net = yaml.safe_load(files["network-config"])
    assert net["version"] == 2
    assert net["ethernets"]["nic0"] == {"match": {"macaddress": "02:de:e7:00:00:5e"}, "dhcp4": True}


def test_test_mac_is_locally_administered_unicast() -> None:
    first = int(testguest.TEST_MAC.split(":")[0], 16)
    assert first & 0b10 and not first & 0b01


def test_seed_iso_is_labelled_cidata(tmp_path: Path) -> None:
    iso = testguest.make_seed_iso(tmp_path, {"meta-data": "instance-id: x\n", "user-data": "#cloud-config\n"})
    data = iso.read_bytes()
    # ISO 9660 primary volume descriptor at sector 16; the volume identifier at byte 40.
    assert data[0x8001:0x8006] == b"CD001"
    assert data[0x8028:0x8028 + 32].decode().strip() == "cidata"


def test_make_ssh_key_private_file_is_0600(tmp_path: Path) -> None:
    path, pub = testguest.make_ssh_key(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    key = paramiko.Ed25519Key.from_private_key_file(str(path))
    assert pub.split()[1] == key.get_base64()


@pytest.mark.parametrize("kind", ["bios", "uefi"])
def test_the_test_vm_starts_with_each_firmware_and_answers_qmp(tmp_path: Path, kind: str) -> None:
    """QEMU accepts the machine and firmware arguments (OVMF pflash on q35 for uefi), and the QMP socket
    the image suites hot-add the pristine artifact through is there. No boot is waited for."""
    import json
    import shutil

    if shutil.which("qemu-system-x86_64") is None or (kind == "uefi" and not Path("/usr/share/OVMF").is_dir()):
        pytest.skip("needs qemu-system-x86 (and ovmf for uefi): ./dev setup installs them")
    disk = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds"), "accelerator": "tcg"})
    guest = testguest.boot_guest(settings, disk, "qcow2", workdir_parent=tmp_path, hostname="fw", firmware_kind=kind)
    try:
        assert guest.alive() and guest.qmp_socket is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(guest.qmp_socket))
            reader = s.makefile("rb")
            assert "QMP" in json.loads(reader.readline())
            s.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"query-block"}\n')
            assert json.loads(reader.readline()) == {"return": {}}
            files = [str((b.get("inserted") or {}).get("file", "")) for b in json.loads(reader.readline())["return"]]
        flash = [f for f in files if "OVMF" in f or f.endswith("efivars.fd")]
        if kind == "uefi":
            assert len(flash) == 2 and any(f == str(guest.workdir / "efivars.fd") for f in flash), files
        else:
            assert flash == [], files
    finally:
        guest.stop()
