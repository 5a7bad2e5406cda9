"""deploy without any server: property strings, encodings, comparison, selection and placement."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote_plus

import pytest

from image_factory import deploy as dep
from image_factory.errors import ValidationFailed
from image_factory.lab import factories
from image_factory.ownership import MANAGED_MARKER, Marker
from image_factory.pve import codec as pvecodec
from image_factory.pve.livemacs import MacUse
from image_factory.pve.templates import TemplateInfo
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import Hypervisor, Site, Vm, load_site

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def site() -> Site:
    return load_site(REPO_ROOT / "ansible/inventory", REPO_ROOT / "packer/images.yml")


def tpl(vmid: int = 9000, name: str = "tpl-fedora-44-b1") -> TemplateInfo:
    return factories.template(vmid, name)


# ------------------------------------------------------------------------ property strings


def test_parse_props_bare_first_value_and_pairs() -> None:
    assert pvecodec.parse_props("local-lvm:vm-1-disk-0,size=10G,discard=on", "file") == {
        "file": "local-lvm:vm-1-disk-0", "size": "10G", "discard": "on"}
    assert pvecodec.parse_props("ip=10.0.0.5/24,gw=10.0.0.1") == {"ip": "10.0.0.5/24", "gw": "10.0.0.1"}
    assert pvecodec.parse_props("") == {}


@pytest.mark.parametrize("raw", [
    "virtio=BC:24:11:AA:BB:CC,bridge=vmbr0,firewall=1",
    "firewall=1,virtio=bc:24:11:aa:bb:cc,bridge=vmbr0",
    "model=virtio,macaddr=bc:24:11:AA:BB:CC,bridge=vmbr0,firewall=1",
])
def test_netspec_parses_any_spelling_to_the_same_value(raw: str) -> None:
    spec = pvecodec.NetSpec.parse(raw)
    assert spec.model == "virtio" and spec.mac == "bc:24:11:aa:bb:cc"
    assert spec.opts == {"bridge": "vmbr0", "firewall": "1"}
    assert spec.format() == "virtio=BC:24:11:AA:BB:CC,bridge=vmbr0,firewall=1"


def test_netspec_format_model_first_then_sorted_keys() -> None:
    spec = pvecodec.NetSpec("e1000", "02:de:10:03:01:01", (("tag", "99"), ("bridge", "vmbr1"), ("firewall", "1")))
    assert spec.format() == "e1000=02:DE:10:03:01:01,bridge=vmbr1,firewall=1,tag=99"
    assert spec.format(mac_upper=False) == "e1000=02:de:10:03:01:01,bridge=vmbr1,firewall=1,tag=99"
    assert pvecodec.NetSpec.parse(spec.format()) == spec


def test_netspec_refuses_a_value_without_model() -> None:
    with pytest.raises(ValueError, match="no model"):
        pvecodec.NetSpec.parse("bridge=vmbr0,firewall=1")


def test_nic_net_from_inventory(site: Site) -> None:
    jump = site.vms["jump01"]
    hv = site.hypervisor_for(jump)
    assert dep.nic_net(jump, hv, 0).format() == "virtio=02:DE:10:03:01:00,bridge=vmbr0,firewall=1"
    assert dep.nic_net(jump, hv, 1).format() == "virtio=02:DE:10:03:01:01,bridge=vmbr1,firewall=1,tag=99"


@pytest.mark.parametrize(("text", "size"), [("10G", 10 * 1024**3), ("2252M", 2252 * 1024**2), ("512K", 512 * 1024),
                                            ("1T", 1024**4), ("4096", 4096), ("1.5G", int(1.5 * 1024**3))])
def test_parse_size(text: str, size: int) -> None:
    assert pvecodec.parse_size(text) == size


def test_parse_size_refuses_garbage() -> None:
    with pytest.raises(ValueError):
        pvecodec.parse_size("ten gigs")


# ------------------------------------------------------------------------ cloud-init


def test_sshkeys_percent_encoded_with_spaces_as_20() -> None:
    keys = ["ssh-ed25519 AAAA+b/c= me@host", "ssh-rsa BBBB x"]
    enc = dep.encode_sshkeys(keys)
    assert enc == "ssh-ed25519%20AAAA%2Bb%2Fc%3D%20me%40host%0Assh-rsa%20BBBB%20x"
    assert "+" not in enc and enc != quote_plus("\n".join(keys))
    assert dep.decode_sshkeys(enc) == keys


def test_ipconfig_and_desired_config(site: Site) -> None:
    jump, metrics = site.vms["jump01"], site.vms["metrics01"]
    assert dep.ipconfig_value(jump) == "ip=192.168.10.30/24,gw=192.168.10.1"
    assert dep.ipconfig_value(metrics) == "ip=dhcp"
    cfg = dep.desired_config(jump, site.hypervisor_for(jump), tpl(), "run1")
    assert cfg["net1"] == "virtio=02:DE:10:03:01:01,bridge=vmbr1,firewall=1,tag=99"
    assert cfg["ciupgrade"] == "0" and cfg["nameserver"] == "192.168.10.1" and cfg["searchdomain"] == "deevnet.lan"
    assert cfg["tags"] == "access;image-factory;jump;mgmt;oob"
    assert cfg["cores"] == "1" and cfg["memory"] == "1024"
    assert "sshkeys" in cfg and " " not in cfg["sshkeys"]
    assert Marker.parse(cfg["description"], jump.vmid) == Marker(True, "jump01", "tpl-fedora-44-b1", 9000, False,
                                                                 "run1", True)
    assert "nameserver" not in dep.desired_config(metrics, site.hypervisor_for(metrics), tpl(), "run1")


# ------------------------------------------------------------------------ markers, disks, agent


def test_marker_parse_legacy_blocks_are_managed_but_never_incomplete() -> None:
    assert not Marker.parse("hand-made VM", 100).managed
    assert not Marker.parse(None, 100).managed
    legacy = "my notes\n\n" + MANAGED_MARKER + "\nfactory-vm: a\nfactory-template: tpl-x-1 (vmid 9001)\n" \
        "factory-state: incomplete"
    assert Marker.parse(legacy, 100) == Marker(True, "a", "tpl-x-1", 9001, False)


def test_boot_disk_follows_boot_order_and_skips_cdroms() -> None:
    cfg = {"boot": "order=virtio0;net0", "ide2": "local:vm-1-cloudinit,media=cdrom", "scsi0": "local:a,size=5G",
           "virtio0": "local:b,size=7G"}
    assert dep.boot_disk(cfg) == ("virtio0", 7 * 1024**3)
    assert dep.boot_disk({"ide2": "local:vm-1-cloudinit,media=cdrom", "scsi0": "local:a,size=2252M"}) == (
        "scsi0", 2252 * 1024**2)
    assert dep.boot_disk({"ide2": "none,media=cdrom"}) is None


def test_guest_address_matches_mac_case_insensitively() -> None:
    ifaces: list[dict[str, Any]] = [
        {"name": "lo", "hardware-address": "00:00:00:00:00:00",
         "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4"}]},
        {"name": "eth0", "hardware-address": "02:DE:10:01:01:00", "ip-addresses": [
            {"ip-address": "fe80::1", "ip-address-type": "ipv6"},
            {"ip-address": "169.254.3.3", "ip-address-type": "ipv4"},
            {"ip-address": "10.1.2.3", "ip-address-type": "ipv4"}]},
    ]
    assert dep.guest_address(ifaces, "02:de:10:01:01:00") == "10.1.2.3"
    assert dep.guest_address(ifaces, "02:de:10:01:01:01") is None
    assert dep.guest_address(ifaces[:1], "00:00:00:00:00:01") is None


# ------------------------------------------------------------------------ compare


def _live_config(vm: Vm, hv: Hypervisor) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(dep.desired_config(vm, hv, tpl(), "run1"))
    cfg["scsi0"] = f"local-lvm:vm-{vm.vmid}-disk-0,size={vm.disk_gb}G"
    cfg["memory"] = str(vm.memory)
    cfg["cores"] = vm.cores
    return cfg


def test_compare_in_sync_even_with_pve_spelling(site: Site) -> None:
    vm = site.vms["jump01"]
    hv = site.hypervisor_for(vm)
    cfg = _live_config(vm, hv)
    cfg["net0"] = "virtio=02:de:10:03:01:00,firewall=1,bridge=vmbr0"  # lowercase, other key order
    assert dep.compare(vm, hv, tpl(), cfg) == []


def test_tags_stored_verbatim_or_normalised_are_in_sync(site: Site) -> None:
    """qemu-server 8.3 (PVE 8.4) keeps create's tags as sent, 9.1.17+ lowercases and sorts; an operator may
    type capitals."""
    vm = site.vms["jump01"]
    hv = site.hypervisor_for(vm)
    cfg = _live_config(vm, hv)
    for stored in (";".join(reversed(vm.all_tags)), ",".join(t.upper() for t in vm.all_tags),
                   " ".join(vm.all_tags + [vm.all_tags[0]])):
        cfg["tags"] = stored
        assert dep.compare(vm, hv, tpl(), cfg) == [], stored


def test_compare_reports_each_field(site: Site) -> None:
    vm = site.vms["jump01"]
    hv = site.hypervisor_for(vm)
    cfg = _live_config(vm, hv)
    cfg["net0"] = "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1"
    cfg["net1"] = "virtio=02:DE:10:03:01:01,bridge=vmbr1,firewall=1"
    cfg["net2"] = "virtio=BC:24:11:00:00:02,bridge=vmbr0"
    cfg["cores"] = 4
    cfg["tags"] = "mgmt;jump"
    cfg["sshkeys"] = dep.encode_sshkeys(["ssh-ed25519 AAAA other"])
    cfg["scsi0"] = "local-lvm:vm-1301-disk-0,size=30G"
    diffs = {d.field: d for d in dep.compare(vm, hv, tpl(9001, "tpl-fedora-44-b2"), cfg)}
    assert set(diffs) == {"net0.mac", "net1.tag", "net2", "cores", "tags", "sshkeys", "scsi0.size", "template"}
    assert diffs["net0.mac"].current == "bc:24:11:00:00:01" and diffs["net0.mac"].safe
    assert not diffs["scsi0.size"].safe and not diffs["template"].safe
    assert diffs["cores"].safe and diffs["tags"].safe and diffs["sshkeys"].safe
    assert not diffs["net1.tag"].safe, "a NIC on another VLAN is on another network: never moved silently"
    cfg["scsi0"] = "local-lvm:vm-1301-disk-0,size=10G"
    grow = {d.field: d for d in dep.compare(vm, hv, tpl(), cfg)}["scsi0.size"]
    assert grow.safe and grow.desired == "20G"


SB_LINE = "uefi,machine=q35,secure_boot=yes,keys=microsoft-2011+2023,tpm=v2.0"
# A clone of a UEFI + Secure Boot + vTPM template as PVE 9.2 shows it (the drives keep the template's options).
SB_CLONE = {"bios": "ovmf", "machine": "q35",
            "efidisk0": "local-lvm:vm-1100-disk-1,efitype=4m,ms-cert=2023k,pre-enrolled-keys=1,size=528K",
            "tpmstate0": "local-lvm:vm-1100-disk-2,size=4M,version=v2.0"}


@pytest.mark.parametrize(("change", "field"), [
    ({}, None),
    ({"machine": "pc-q35-9.2+pve1"}, None),  # a pinned q35 version is still q35
    ({"bios": None}, "bios"),
    ({"machine": None}, "machine"),
    ({"efidisk0": "local-lvm:vm-1100-disk-1,efitype=4m,pre-enrolled-keys=0,size=528K"}, "efidisk0"),
    ({"efidisk0": None}, "efidisk0"),
    ({"tpmstate0": None}, "tpmstate0"),
    ({"tpmstate0": "local-lvm:vm-1100-disk-2,size=4M"}, "tpmstate0"),  # v1.2, PVE's default
])
def test_a_clone_keeps_its_templates_firmware_or_shows_unsafe_drift(site: Site, change: dict[str, Any],
                                                                    field: str | None) -> None:
    vm = site.vms["jump01"]
    hv = site.hypervisor_for(vm)
    template = factories.template(firmware=SB_LINE)
    cfg = {**_live_config(vm, hv), **SB_CLONE, **change}
    cfg["description"] = dep.describe(vm, template, "run1")
    cfg = {k: v for k, v in cfg.items() if v is not None}
    diffs = dep.compare(vm, hv, template, cfg)
    assert [(d.field, d.safe) for d in diffs] == ([(field, False)] if field else [])
    bios_template = factories.template(firmware="bios,machine=pc,tpm=no")
    bios_cfg = {**_live_config(vm, hv), "description": dep.describe(vm, bios_template, "run1")}
    assert dep.compare(vm, hv, bios_template, bios_cfg) == []
    assert dep.compare(vm, hv, factories.template(), {**_live_config(vm, hv), **SB_CLONE}) == []  # not recorded


def test_compare_ciupgrade_default_is_one(site: Site) -> None:
    vm = site.vms["metrics01"]
    hv = site.hypervisor_for(vm)
    cfg = _live_config(vm, hv)
    del cfg["ciupgrade"]
    assert [d.field for d in dep.compare(vm, hv, tpl(), cfg)] == ["ciupgrade"]


# ------------------------------------------------------------------------ selection, placement


def test_select_vms(site: Site) -> None:
    assert [v.name for v in dep.select_vms(site, plane="tenant")] == ["iot-api01", "sandbox01"]
    assert [v.name for v in dep.select_vms(site, ["jump01", "metrics01", "jump01"])] == ["jump01", "metrics01"]
    assert len(dep.select_vms(site)) == len(site.vms)
    with pytest.raises(ValidationFailed, match="nope: no such VM"):
        dep.select_vms(site, ["nope"])
    with pytest.raises(ValidationFailed, match="jump01: vm.plane: is not a tenant VM"):
        dep.select_vms(site, ["jump01"], plane="tenant")
    with pytest.raises(ValidationFailed, match="unknown plane"):
        dep.select_vms(site, plane="dmz")


def test_placement_reasserted_per_vm(site: Site) -> None:
    bad = site.vms["metrics01"].model_copy(update={"hypervisor": "pve-tenant"})
    other = site.vms["iot-api01"].model_copy(update={"hypervisor": "pve-mgmt"})
    broken = Site(site.inventory_path, site.images_path, site.hypervisors,
                  {**site.vms, "metrics01": bad, "iot-api01": other}, site.images, site.vm_sources)
    dep.check_placement(site, site.vms.values())
    with pytest.raises(ValidationFailed) as exc:
        dep.check_placement(broken, broken.vms.values())
    text = str(exc.value)
    assert "metrics01: vm.hypervisor: refused: mgmt VMs may only run on the mgmt hypervisor" in text
    assert "iot-api01: vm.hypervisor: refused: tenant VMs may only run on the tenant hypervisor" in text
    assert "jump01" not in text


# ------------------------------------------------------------------------ readiness over SSH


def test_ssh_answers_reads_the_banner_only(greeter: Any) -> None:
    assert dep.ssh_answers("127.0.0.1", greeter(b"SSH-2.0-OpenSSH_9.2\r\n"))
    assert not dep.ssh_answers("127.0.0.1", greeter(b"HTTP/1.1 400 Bad Request\r\n"))
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = unused.getsockname()[1]
    assert not dep.ssh_answers("127.0.0.1", closed, timeout=1)


def test_known_address_and_agent_configured(site: Site) -> None:
    assert dep.known_address(site.vms["jump01"]) == "192.168.10.30"
    assert dep.known_address(site.vms["metrics01"]) is None
    assert dep.agent_configured({"agent": "enabled=1,fstrim_cloned_disks=1"})
    assert dep.agent_configured({"agent": "1"})
    assert not dep.agent_configured({"agent": "0"}) and not dep.agent_configured({})


# ------------------------------------------------------------------------ decide: the pure plan


def _observed(vm: Vm, hv: Hypervisor, *, status: str = "running", incomplete: bool = False, marker: bool = True,
              template: TemplateInfo | None = None, lock: str | None = None, **changes: Any) -> dep.Observed:
    cfg: dict[str, Any] = dict(dep.desired_config(vm, hv, template or tpl(), "r1"))
    cfg["scsi0"] = f"local-lvm:vm-{vm.vmid}-disk-0,size={vm.disk_gb}G"
    cfg["agent"] = "enabled=1"
    if incomplete:
        cfg["description"] = dep.describe(vm, template or tpl(), "r0", incomplete=True)
    if not marker:
        cfg["description"] = "made by hand"
    cfg.update(changes)
    entry = {"vmid": vm.vmid, "status": status, "name": vm.name, **({"lock": lock} if lock else {})}
    return dep.Observed(entry, cfg, [])


DECIDE_CASES = {
    # name: (observed factory, templates, macs extra, kwargs, expected action, reason fragment)
    "create": (lambda vm, hv: None, [tpl()], {}, {}, "create", ""),
    "in-sync": (lambda vm, hv: _observed(vm, hv), [tpl()], {}, {}, "in-sync", ""),
    "safe drift": (lambda vm, hv: _observed(vm, hv, memory="512"), [tpl()], {}, {}, "drift", ""),
    "stopped is safe drift": (lambda vm, hv: _observed(vm, hv, status="stopped"), [tpl()], {}, {}, "drift", ""),
    "vlan drift is unsafe": (lambda vm, hv: _observed(vm, hv, net1="virtio=02:DE:10:03:01:01,bridge=vmbr1,tag=98"),
                             [tpl()], {}, {}, "drift", "net1.tag: '98' -> '99' (unsafe)"),
    "unsafe drift reported": (lambda vm, hv: _observed(vm, hv), [tpl(9001, "tpl-new")], {}, {}, "drift",
                              "re-create only with --recreate"),
    "unsafe drift, running mgmt, --recreate only": (lambda vm, hv: _observed(vm, hv), [tpl(9001, "tpl-new")], {},
                                                    {"recreate": True}, "drift", "--i-know-this-is-mgmt"),
    "unsafe drift, both flags": (lambda vm, hv: _observed(vm, hv), [tpl(9001, "tpl-new")], {},
                                 {"recreate": True, "allow_mgmt": True}, "recreate", "--recreate given"),
    "foreign VM": (lambda vm, hv: _observed(vm, hv, marker=False), [tpl()], {}, {"recreate": True}, "blocked",
                   "not made by this tool"),
    "incomplete, stopped": (lambda vm, hv: _observed(vm, hv, status="stopped", incomplete=True), [tpl()], {}, {},
                            "recreate", "left incomplete by run r0"),
    "incomplete, running": (lambda vm, hv: _observed(vm, hv, incomplete=True), [tpl()], {}, {}, "blocked",
                            "reported, not destroyed"),
    "locked": (lambda vm, hv: _observed(vm, hv, lock="clone"), [tpl()], {}, {}, "blocked", "locked (clone)"),
    "missing template": (lambda vm, hv: None, [], {}, {}, "blocked", "no tested template"),
    "MAC on another host": (lambda vm, hv: None, [tpl()], {"02:de:10:03:01:00": [MacUse("pve-tenant", 2999, "x",
                                                                                          "net0")]},
                            {}, "blocked", "already used by pve-tenant VMID 2999 (x) net0"),
}


@pytest.mark.parametrize("case", DECIDE_CASES)
def test_decide(site: Site, case: str) -> None:
    make, templates, macs, kwargs, action, fragment = DECIDE_CASES[case]
    vm = site.vms["jump01"]
    hv = site.hypervisor_for(vm)
    observed = make(vm, hv)
    state = dep.HostState({vm.image: templates}, {vm.vmid: observed} if observed else {}, {})
    assert vm.macs[0] == "02:de:10:03:01:00"
    plan = dep.decide(vm, hv, state, macs, **kwargs)
    assert plan.action == action, plan.to_dict()
    assert fragment in plan.reason, plan.reason


def test_decide_without_every_hosts_macs_writes_nothing(site: Site) -> None:
    vm = site.vms["jump01"]
    state = dep.HostState({vm.image: [tpl()]}, {}, {})
    plan = dep.decide(vm, site.hypervisor_for(vm), state, None)
    assert plan.action == "blocked" and "MACs are unique" in plan.reason
