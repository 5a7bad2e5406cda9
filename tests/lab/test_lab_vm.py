"""A VM started in the lab boots for real and answers SSH with its configured (inventory) MAC."""

from __future__ import annotations

import os
import re
import time
import urllib.parse
from pathlib import Path

import pytest

from image_factory.lab.baseimage import ensure_base_image
from image_factory.lab.pytest_plugin import LabHandle
from image_factory.pve.client import ApiError, PveClient
from image_factory.pve.sshlink import connect
from image_factory.settings import Settings
from image_factory.site.inventory import SshEndpoint, Vm

pytestmark = [pytest.mark.lab, pytest.mark.slow]

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


def boot_from_template(lab: LabHandle, host: str, vm_name: str, *, full: bool) -> tuple[PveClient, Vm]:
    """Publish-like template from the base image, then a deploy-like clone of the inventory VM, started."""
    if lab.config.real_boot == "none":
        pytest.skip("lab started with --lab-real-boot=none")
    base = ensure_base_image(Settings.from_mapping({}))
    hv = lab.hv(host)
    vm = lab.site.vms[vm_name]
    c = PveClient(hv)
    with connect(hv.name, hv.ssh) as link, link.sftp() as sftp:
        sftp.put(str(base), f"{hv.storage.import_dir}/debian-13-base.qcow2")
    node = f"/nodes/{c.node}/qemu"
    tpl = hv.template_vmids.first
    c.run_task("POST", node, vmid=tpl, name="tpl-debian-lab", memory=512, cores=1, scsihw="virtio-scsi-pci",
               scsi0="local:0,import-from=local:import/debian-13-base.qcow2", ide2="local:cloudinit",
               boot="order=scsi0", serial0="socket", vga="serial0", agent="enabled=1",
               net0="virtio,bridge=vmbr0", timeout=120)
    c.run_task("POST", f"{node}/{tpl}/template", timeout=60)
    c.run_task("POST", f"{node}/{tpl}/clone", newid=vm.vmid, name=vm.name, full=int(full), timeout=300)
    ci = vm.cloudinit
    params: dict[str, object] = {"cores": vm.cores, "ciuser": ci.user, "ciupgrade": 0,
                                 "sshkeys": urllib.parse.quote("\n".join(ci.ssh_keys), safe="")}
    for i, nic in enumerate(vm.nics):
        params[f"net{i}"] = f"virtio={nic.mac},bridge={nic.bridge or hv.bridge}" + (f",tag={nic.vlan}" if nic.vlan
                                                                                      else "")
    params["ipconfig0"] = "ip=dhcp" if ci.ipconfig == "dhcp" else (
        f"ip={ci.ipconfig.ip}" + (f",gw={ci.ipconfig.gw}" if ci.ipconfig.gw else ""))
    if ci.nameserver:
        params["nameserver"] = ci.nameserver
    if ci.searchdomain:
        params["searchdomain"] = ci.searchdomain
    c.put(f"{node}/{vm.vmid}/config", **params)
    c.run_task("POST", f"{node}/{vm.vmid}/status/start", timeout=60)
    qemu = lab.qemu(host, vm.vmid)
    assert qemu is not None and qemu["macs"] == vm.macs
    # The VM's cores, as PVE gives them (capped at this machine's CPUs: TCG runs a thread per vCPU).
    argv = Path(f"/proc/{qemu['pid']}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"-smp") + 1] == str(min(vm.cores, os.cpu_count() or 1)).encode()
    return c, vm


def wait_for_agent(lab: LabHandle, c: PveClient, host: str, vm: Vm) -> list[dict[str, object]]:
    path = f"/nodes/{c.node}/qemu/{vm.vmid}/agent/network-get-interfaces"
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            result: list[dict[str, object]] = c.get(path)["result"]
            return result
        except ApiError as exc:
            assert "guest agent is not running" in exc.pve_message
            time.sleep(3)
    raise AssertionError(f"guest agent never answered; see {lab.serial_log(host, vm.vmid)}")


def ssh_to_guest(lab: LabHandle, host: str, vm: Vm, address: str) -> SshEndpoint:
    deadline = time.monotonic() + BOOT_TIMEOUT
    host_key = None
    while host_key is None and time.monotonic() < deadline:
        host_key = serial_host_key(lab.serial_log(host, vm.vmid))
        time.sleep(1)
    assert host_key is not None
    return SshEndpoint(host=address, port=22, user=vm.cloudinit.user, host_key=host_key,
                       key_file=lab.paths.client_key)


def test_started_vm_boots_and_answers_ssh_with_its_inventory_mac(fresh_lab: LabHandle) -> None:
    """iot-api01 (tenant): linked clone, DHCP."""
    c, vm = boot_from_template(fresh_lab, "pve-tenant", "iot-api01", full=False)
    interfaces = wait_for_agent(fresh_lab, c, "pve-tenant", vm)
    nic = next(i for i in interfaces if i.get("hardware-address") == vm.nics[0].mac)  # the guest's own view
    addresses = [str(a["ip-address"]) for a in nic["ip-addresses"] if a["ip-address-type"] == "ipv4"]  # type: ignore[attr-defined,index]
    lab_address, _ = fresh_lab.vm_ssh_address(vm.vmid)
    assert addresses[0] == lab_address and "10.0.2.15" in addresses, "lab address first, then the guest's own"
    endpoint = ssh_to_guest(fresh_lab, "pve-tenant", vm, addresses[0])
    # pve-tenant runs PVE 9: exec needs VM.GuestAgent.Unrestricted, which the factory's role does not hold
    with pytest.raises(ApiError) as refused:
        c.post(f"/nodes/{c.node}/qemu/{vm.vmid}/agent/exec", command=["cat", "/etc/ssh/ssh_host_ed25519_key.pub"])
    assert refused.value.status == 403 and "VM.GuestAgent.Unrestricted" in refused.value.pve_message
    # file-read (VM.GuestAgent.FileRead) is relayed to the real agent: the same host key the console printed
    answer = c.get(f"/nodes/{c.node}/qemu/{vm.vmid}/agent/file-read", file="/etc/ssh/ssh_host_ed25519_key.pub")
    assert " ".join(str(answer["content"]).split()[:2]) == endpoint.host_key
    with connect(vm.name, endpoint, timeout=30) as guest:
        assert guest.run(["hostname"]).stdout.strip() == vm.name
        assert vm.nics[0].mac in guest.run("cat /sys/class/net/*/address").stdout.split()
    qemu = fresh_lab.qemu("pve-tenant", vm.vmid)
    assert qemu is not None
    c.run_task("POST", f"/nodes/{c.node}/qemu/{vm.vmid}/status/stop", timeout=60)
    assert fresh_lab.qemu("pve-tenant", vm.vmid) is None
    cmdline = Path(f"/proc/{qemu['pid']}/cmdline")
    assert not cmdline.exists() or b"qemu" not in cmdline.read_bytes()


def test_static_ip_and_second_nic_as_jump01_has_them(fresh_lab: LabHandle) -> None:
    """jump01 (mgmt): full clone, static ipconfig0, nameserver, searchdomain, a second NIC on vmbr1."""
    c, vm = boot_from_template(fresh_lab, "pve-mgmt", "jump01", full=True)
    assert vm.cloudinit.ipconfig != "dhcp"
    interfaces = wait_for_agent(fresh_lab, c, "pve-mgmt", vm)
    by_mac = {str(i.get("hardware-address")): i for i in interfaces}
    assert set(vm.macs) <= set(by_mac), "the guest sees both inventory MACs"
    first = [str(a["ip-address"]) for a in by_mac[vm.macs[0]]["ip-addresses"]]  # type: ignore[attr-defined]
    static_ip = vm.cloudinit.ipconfig.ip.split("/")[0]  # type: ignore[union-attr]
    assert static_ip in first
    with connect(vm.name, ssh_to_guest(fresh_lab, "pve-mgmt", vm, first[0]), timeout=30) as guest:
        assert guest.run(["hostname", "-f"]).stdout.strip() == f"{vm.name}.{vm.cloudinit.searchdomain}"
        assert static_ip in guest.run(["ip", "-4", "-o", "addr"]).stdout
    # shutdown presses the ACPI power button: the guest powers off and its qemu ends
    qemu = fresh_lab.qemu("pve-mgmt", vm.vmid)
    assert qemu is not None
    c.run_task("POST", f"/nodes/{c.node}/qemu/{vm.vmid}/status/shutdown", timeout=300)
    assert c.get(f"/nodes/{c.node}/qemu/{vm.vmid}/status/current")["status"] == "stopped"
    cmdline = Path(f"/proc/{qemu['pid']}/cmdline")
    assert not cmdline.exists() or b"qemu" not in cmdline.read_bytes()
