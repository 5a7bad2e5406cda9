"""A VM started in the lab boots for real and answers SSH with its configured (inventory) MAC."""

from __future__ import annotations

import re
import time
import urllib.parse
from pathlib import Path

import pytest

from image_factory.baseimage import ensure_base_image
from image_factory.inventory import SshEndpoint
from image_factory.lab.pytest_plugin import LabHandle
from image_factory.pve import ApiError, PveClient
from image_factory.settings import Settings
from image_factory.sshlink import connect

pytestmark = [pytest.mark.lab, pytest.mark.slow]

HOST = "pve-tenant"
BOOT_TIMEOUT = 600


def serial_host_key(log: Path) -> str | None:
    """The guest's ed25519 host key as cloud-init prints it on the serial console."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    block = re.search(r"-----BEGIN SSH HOST KEY KEYS-----(.*?)-----END SSH HOST KEY KEYS-----", text, re.S)
    if not block:
        return None
    found = re.search(r"(ssh-ed25519 [A-Za-z0-9+/=]+)", block.group(1))
    return found.group(1) if found else None


def test_started_vm_boots_and_answers_ssh_with_its_inventory_mac(fresh_lab: LabHandle) -> None:
    if fresh_lab.config.real_boot == "none":
        pytest.skip("lab started with --lab-real-boot=none")
    base = ensure_base_image(Settings.from_mapping({}))
    hv = fresh_lab.hv(HOST)
    vm = fresh_lab.site.vms["iot-api01"]
    c = PveClient(hv)
    with connect(hv.name, hv.ssh) as link, link.sftp() as sftp:
        sftp.put(str(base), f"{hv.storage.import_dir}/debian-12-base.qcow2")
    node = f"/nodes/{c.node}/qemu"
    # a template as publish makes it, then a linked clone as deploy makes it
    c.run_task("POST", node, vmid=9050, name="tpl-debian-lab", memory=512, cores=1, scsihw="virtio-scsi-pci",
               scsi0="local:0,import-from=local:import/debian-12-base.qcow2", ide2="local:cloudinit",
               boot="order=scsi0", serial0="socket", vga="serial0", agent="enabled=1",
               net0="virtio,bridge=vmbr0", timeout=120)
    c.run_task("POST", f"{node}/9050/template", timeout=60)
    c.run_task("POST", f"{node}/9050/clone", newid=vm.vmid, name=vm.name, timeout=120)
    keys = "\n".join(vm.cloudinit.ssh_keys)
    c.put(f"{node}/{vm.vmid}/config", net0=f"virtio={vm.nics[0].mac},bridge=vmbr0", ciuser=vm.cloudinit.user,
          sshkeys=urllib.parse.quote(keys, safe=""), ipconfig0="ip=dhcp", ciupgrade=0)
    c.run_task("POST", f"{node}/{vm.vmid}/status/start", timeout=60)
    qemu = fresh_lab.qemu(HOST, vm.vmid)
    assert qemu is not None and qemu["macs"] == [vm.nics[0].mac]

    deadline = time.monotonic() + BOOT_TIMEOUT
    interfaces = None
    while time.monotonic() < deadline:
        try:
            interfaces = c.get(f"{node}/{vm.vmid}/agent/network-get-interfaces")["result"]
            break
        except ApiError as exc:
            assert "guest agent is not running" in exc.pve_message
            time.sleep(3)
    assert interfaces is not None, f"guest agent never answered; see {fresh_lab.serial_log(HOST, vm.vmid)}"
    nic = next(i for i in interfaces if i.get("hardware-address") == vm.nics[0].mac)  # the guest's own view
    addresses = [a["ip-address"] for a in nic["ip-addresses"] if a["ip-address-type"] == "ipv4"]
    lab_address, port = fresh_lab.vm_ssh_address(vm.vmid)
    assert addresses[0] == lab_address and len(addresses) >= 2, "lab address first, then the guest's own"

    host_key = None
    while host_key is None and time.monotonic() < deadline:
        host_key = serial_host_key(fresh_lab.serial_log(HOST, vm.vmid))
        time.sleep(1)
    assert host_key is not None
    endpoint = SshEndpoint(host=addresses[0], port=port, user=vm.cloudinit.user, host_key=host_key,
                           key_file=fresh_lab.paths.client_key)
    with connect(vm.name, endpoint, timeout=30) as guest:
        assert guest.run(["hostname"]).stdout.strip() == vm.name
        macs = guest.run("cat /sys/class/net/*/address").stdout.split()
        assert vm.nics[0].mac in macs

    c.run_task("POST", f"{node}/{vm.vmid}/status/stop", timeout=60)
    assert fresh_lab.qemu(HOST, vm.vmid) is None
    assert not Path(f"/proc/{qemu['pid']}").exists() or "qemu" not in Path(f"/proc/{qemu['pid']}/cmdline").read_text(
        errors="replace")
