"""The NoCloud seed a lab VM boots with mirrors PVE's cloud-init drive; NICs come from netN."""

from __future__ import annotations

import urllib.parse

import pytest
import yaml

from image_factory.lab.vmrunner import nics_of, seed_files, vm_address

pytestmark = pytest.mark.unit

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKfXoTQ8mJ2n8jvU4vG0p6Y1sWq3bZr5nH7cLd9eFa2M ansible@deevnet"


def test_nics_in_device_order_with_their_macs() -> None:
    cfg = {"net1": "e1000=02:DE:10:03:01:01,bridge=vmbr1,tag=99", "net0": "virtio=02:DE:10:03:01:00,bridge=vmbr0",
           "name": "jump01"}
    assert nics_of(cfg) == [("net0", "02:DE:10:03:01:00"), ("net1", "02:DE:10:03:01:01")]


def test_seed_user_data_decodes_sshkeys_and_sets_hostname_user_and_upgrade() -> None:
    cfg = {"ciuser": "ansible", "sshkeys": urllib.parse.quote(KEY + "\n", safe=""), "ciupgrade": 0,
           "searchdomain": "deevnet.lan", "net0": "virtio=02:DE:10:01:01:00,bridge=vmbr0"}
    files = seed_files("metrics01", cfg)
    assert files["user-data"].startswith("#cloud-config\n")
    data = yaml.safe_load(files["user-data"])
    assert data["hostname"] == "metrics01"
    assert data["fqdn"] == "metrics01.deevnet.lan"
    assert data["user"] == "ansible"
    assert data["ssh_authorized_keys"] == [KEY]
    assert data["package_upgrade"] is False
    assert yaml.safe_load(files["meta-data"])["local-hostname"] == "metrics01"


def test_seed_network_config_matches_nics_by_lowercase_mac_with_static_and_dhcp() -> None:
    cfg = {"net0": "virtio=02:DE:10:03:01:00,bridge=vmbr0", "net1": "virtio=02:DE:10:03:01:01,bridge=vmbr1",
           "ipconfig0": "ip=192.168.10.30/24,gw=192.168.10.1", "nameserver": "192.168.10.1"}
    net = yaml.safe_load(seed_files("jump01", cfg)["network-config"])
    assert net["version"] == 1
    phys = [c for c in net["config"] if c["type"] == "physical"]
    assert [p["mac_address"] for p in phys] == ["02:de:10:03:01:00", "02:de:10:03:01:01"]
    assert phys[0]["subnets"] == [{"type": "static", "address": "192.168.10.30", "netmask": "255.255.255.0",
                                   "gateway": "192.168.10.1"}]
    assert phys[1]["subnets"] == [{"type": "dhcp4"}]
    assert {"type": "nameserver", "address": ["192.168.10.1"]} in net["config"]


def test_instance_id_changes_with_the_mac() -> None:
    a = seed_files("x", {"net0": "virtio=02:DE:10:01:01:00"})["meta-data"]
    b = seed_files("x", {"net0": "virtio=02:DE:10:01:01:02"})["meta-data"]
    assert a != b


def test_vm_addresses_are_distinct_loopback_per_slot_and_vmid() -> None:
    assert vm_address(0, 1101) == "127.100.4.77"
    assert vm_address(21, 1101) == "127.121.4.77"
    assert len({vm_address(0, v) for v in (1101, 1102, 1201, 1301, 2101, 2201)}) == 6


def test_ovmf_on_q35_with_a_4m_store_boots_the_secure_boot_code_as_qemu_server_picks_it(tmp_path) -> None:
    """OVMF.pm get_ovmf_files: the secboot code needs SMM (q35) and a 4m store; i440fx gets the plain code."""
    from image_factory.lab.vmrunner import firmware_args

    vars_file = tmp_path / "vm-1-disk-1.raw"
    vars_file.write_bytes(b"\0" * 540672)
    disks = {"efidisk0": ("local-lvm:vm-1-disk-1", {"efitype": "4m", "pre-enrolled-keys": "1"}, vars_file)}
    argv, swtpm = firmware_args({"bios": "ovmf", "machine": "q35"}, disks, 1, tmp_path, tmp_path, "n")
    assert swtpm is None
    assert argv[:2] == ["-machine", "q35,smm=on"] and "driver=cfi.pflash01,property=secure,value=on" in argv
    assert "if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.secboot.fd" in argv
    assert f"if=pflash,unit=1,format=raw,file={vars_file}" in argv
    plain, _ = firmware_args({"bios": "ovmf"}, disks, 1, tmp_path, tmp_path, "n")
    assert "-machine" not in plain
    assert "if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd" in plain
    assert firmware_args({}, {}, 1, tmp_path, tmp_path, "n") == ([], None)  # SeaBIOS, i440fx: nothing to add
    typed_last, _ = firmware_args({"bios": "ovmf", "machine": "viommu=virtio,q35"}, disks, 1, tmp_path, tmp_path, "n")
    assert typed_last == argv  # PVE stores machine as written: its type may stand last


@pytest.mark.parametrize(("agent", "enabled"), [
    ("enabled=1", True), ("1", True), ("type=virtio,1", True), ("fstrim_cloned_disks=1,enabled=yes", True),
    ("enabled=0,fstrim_cloned_disks=1", False), ("0", False), (None, False),
])
def test_the_guest_agent_channel_follows_agents_enabled_wherever_it_stands(agent: str | None, enabled: bool) -> None:
    from image_factory.lab.vmrunner import agent_enabled

    assert agent_enabled({} if agent is None else {"agent": agent}) is enabled
