"""Per-VM options (issue #34): CPU type, extra data disks, IPv6 and cloud-init vendor data, from the site model
through deploy's desired config, drift and plan to the Tofu export."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from image_factory import deploy as dep
from image_factory import tools
from image_factory.deploy.desired import disk_update_value
from image_factory.errors import ValidationFailed
from image_factory.handoffs import dhcp, tofu
from image_factory.lab import factories
from image_factory.lab.pve import formats
from image_factory.lab.spec import RELEASES, version_tuple
from image_factory.pve.templates import TemplateInfo
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import Site, Vm, load_site

from .example_site import flat_example

pytestmark = pytest.mark.unit

VENDOR = "#cloud-config\npackages: [htop]\nruncmd:\n  - [touch, /run/vendor-data-ran]\n"
OPTIONS: dict[str, Any] = {
    "cpu": "x86-64-v2-AES",
    "disks": [{"slot": "scsi1", "size_gb": 8, "discard": True, "iothread": True, "ssd": True},
              {"slot": "virtio1", "size_gb": 2, "storage": "local"}],
}
IP6 = {"ip": "2001:db8:10::30/64", "gw": "2001:db8:10::1"}


def write_site(tmp_path: Path, vm_changes: dict[str, Any], ci_changes: dict[str, Any] | None = None, *,
               snippets: bool = True, vendor: str | None = VENDOR) -> tuple[Path, Path]:
    """The example site with jump01 (mgmt) changed, written as <tmp>/site/inventory/hosts.yml; vendor data in
    <tmp>/site/cloud-init/vendor.yaml (beside the inventory directory)."""
    doc = flat_example()
    hosts = doc["all"]["children"]["hypervisors"]["hosts"]
    if snippets:
        for host in hosts.values():
            host["pve"]["storage"].update(snippets="local", snippets_dir="/var/lib/vz/snippets")
    vm = doc["all"]["children"]["mgmt"]["hosts"]["jump01"]["vm"]
    vm.update(copy.deepcopy(vm_changes))
    vm.setdefault("cloudinit", {}).update(copy.deepcopy(ci_changes or {}))
    root = tmp_path / "site"
    (root / "inventory").mkdir(parents=True, exist_ok=True)
    (root / "inventory" / "hosts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    if vendor is not None:
        (root / "cloud-init").mkdir(exist_ok=True)
        (root / "cloud-init" / "vendor.yaml").write_text(vendor)
    return root / "inventory", REPO_ROOT / "packer/images.yml"


def load(tmp_path: Path, vm_changes: dict[str, Any], ci_changes: dict[str, Any] | None = None, **kw: Any) -> Site:
    return load_site(*write_site(tmp_path, vm_changes, ci_changes, **kw))


def problems(tmp_path: Path, vm_changes: dict[str, Any], ci_changes: dict[str, Any] | None = None,
             **kw: Any) -> list[str]:
    with pytest.raises(ValidationFailed) as err:
        load(tmp_path, vm_changes, ci_changes, **kw)
    return [str(p) for p in err.value.problems]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return load(tmp_path, OPTIONS, {"ip6": IP6, "vendor_data": "cloud-init/vendor.yaml"})


def jump(site: Site) -> Vm:
    return site.vms["jump01"]


# ------------------------------------------------------------------------------------ site model


def test_options_load(site: Site) -> None:
    vm = jump(site)
    assert vm.cpu == "x86-64-v2-AES"
    assert [(d.slot, d.bus, d.size_gb) for d in vm.disks] == [("scsi1", "scsi", 8), ("virtio1", "virtio", 2)]
    assert vm.cloudinit.ip6 is not None and not isinstance(vm.cloudinit.ip6, str)
    vendor = vm.cloudinit.vendor
    assert vendor is not None and vendor.text == VENDOR and vendor.snippet_name.startswith("factory-vendor-")


@pytest.mark.parametrize(("vm_changes", "ci_changes", "key", "fragment"), [
    ({"cpu": "Host"}, {}, "vm.cpu", "'Host' is not a CPU type qemu-server knows"),
    ({"cpu": "x86-64-v2-aes"}, {}, "vm.cpu", "close: "),
    ({"disks": [{"slot": "scsi0", "size_gb": 4}]}, {}, "vm.disks.0.slot", "scsi0 is the template's boot disk"),
    ({"disks": [{"slot": "scsi30", "size_gb": 4}]}, {}, "vm.disks.0.slot", "holds the cloud-init drive of a UEFI"),
    ({"disks": [{"slot": "scsi31", "size_gb": 4}]}, {}, "vm.disks.0.slot", "is not a drive key"),
    ({"disks": [{"slot": "ide1", "size_gb": 4}]}, {}, "vm.disks.0.slot", "is not a drive key"),
    ({"disks": [{"slot": "virtio1", "size_gb": 4, "ssd": True}]}, {}, "vm.disks.0", "ssd is not an option of a virtio"),
    ({"disks": [{"slot": "sata1", "size_gb": 4, "iothread": True}]}, {}, "vm.disks.0", "iothread is not an option"),
    ({"disks": [{"slot": "scsi1", "size_gb": 4}, {"slot": "scsi1", "size_gb": 5}]}, {}, "vm.disks",
     "slot(s) scsi1 used by more than one disk"),
    ({"disks": [{"slot": "scsi1", "size_gb": 0}]}, {}, "vm.disks.0.size_gb", "greater than or equal to 1"),
    ({"disks": [{"slot": "scsi1", "size_gb": 4, "storage": "local,x=1"}]}, {}, "vm.disks.0.storage",
     "is not a PVE storage id"),
    ({}, {"ip6": {"ip": "10.0.0.5/24"}}, "vm.cloudinit.ip6", "is not an IPv6 address in CIDR form"),
    ({}, {"ip6": {"ip": "2001:db8::5"}}, "vm.cloudinit.ip6", "needs a prefix length"),
    ({}, {"ip6": {"ip": "2001:db8::5/64", "gw": "10.0.0.1"}}, "vm.cloudinit.ip6", "is not an IPv6 address"),
    ({}, {"ip6": "slaac"}, "vm.cloudinit.ip6", "auto"),
    ({}, {"ipconfig": {"ip": "2001:db8::5/64"}}, "vm.cloudinit.ipconfig", "put an IPv6 address in cloudinit.ip6"),
    ({}, {"vendor_data": "cloud-init/missing.yaml"}, "vm.cloudinit.vendor_data", "cannot read"),
    ({}, {"vendor_data": "../outside.yaml"}, "vm.cloudinit.vendor_data", "must be a relative path"),
    ({}, {"vendor_data": "/etc/passwd"}, "vm.cloudinit.vendor_data", "must be a relative path"),
])
def test_bad_options_are_named(tmp_path: Path, vm_changes: dict[str, Any], ci_changes: dict[str, Any], key: str,
                               fragment: str) -> None:
    found = problems(tmp_path, vm_changes, ci_changes)
    hits = [p for p in found if "jump01" in p and f" {key}" in p]
    assert hits, found
    assert any(fragment in p for p in hits), hits


@pytest.mark.parametrize(("text", "fragment"), [
    ("packages: [htop]\n", "must start with a '#cloud-config' line"),
    ("#cloud-config\n- a list\n", "is not a YAML mapping"),
    ("#cloud-config\npackages: [htop\n", "is not YAML"),
])
def test_vendor_data_that_is_no_cloud_config_is_refused(tmp_path: Path, text: str, fragment: str) -> None:
    found = problems(tmp_path, {}, {"vendor_data": "cloud-init/vendor.yaml"}, vendor=text)
    assert any("jump01" in p and "vm.cloudinit.vendor_data" in p and fragment in p for p in found), found


def test_vendor_data_needs_a_snippets_storage(tmp_path: Path) -> None:
    found = problems(tmp_path, {}, {"vendor_data": "cloud-init/vendor.yaml"}, snippets=False)
    assert any("jump01" in p and "vm.cloudinit.vendor_data" in p and "pve-mgmt has no snippets storage" in p
               for p in found), found


# ------------------------------------------------------------------------------------ desired config


def tpl() -> TemplateInfo:
    return factories.template(9000, "tpl-fedora-44-b1")


def test_desired_config_carries_the_options(site: Site) -> None:
    vm = jump(site)
    cfg = dep.desired_config(vm, site.hypervisor_for(vm), tpl(), "r1")
    assert cfg["cpu"] == "x86-64-v2-AES"
    assert cfg["scsi1"] == "local-lvm:8,discard=on,iothread=1,ssd=1"
    assert cfg["virtio1"] == "local:2"
    assert cfg["ipconfig0"] == "ip=192.168.10.30/24,gw=192.168.10.1,ip6=2001:db8:10::30/64,gw6=2001:db8:10::1"
    assert cfg["cicustom"] == f"vendor=local:snippets/{vm.cloudinit.vendor.snippet_name}"  # type: ignore[union-attr]


@pytest.mark.parametrize("release", list(RELEASES))
def test_every_property_string_deploy_writes_parses_on_every_release(site: Site, release: str) -> None:
    """The one config update of every VM (NICs with VLAN tags, data disks with their flags, ipconfig with IPv6,
    cicustom, cpu) and a data disk's update, parsed with each release's own formats as the lab's node does
    (lab.pve.formats): none carries a sub-key an 8.4 (or 9.1) node lacks."""
    versions = version_tuple(RELEASES[release].qemu_server), version_tuple(RELEASES[release].common)
    walked: set[str] = set()
    for vm in site.vms.values():
        cfg = dep.desired_config(vm, site.hypervisor_for(vm), tpl(), "r1")
        cfg.update({d.slot: disk_update_value(d, "local-lvm:vm-1-disk-1,size=8G") for d in vm.disks})
        assert formats.check_property_strings(cfg, *versions) == {}, vm.name
        walked |= {formats.format_of(key) or "" for key in cfg} - {""}
    assert walked >= {"net", "ipconfig", "scsi", "virtio", "cpu", "cicustom"}


@pytest.mark.parametrize(("ip6", "value"), [("auto", "ip6=auto"), ("dhcp", "ip6=dhcp"), (None, "")])
def test_ipconfig_ip6_modes(tmp_path: Path, ip6: str | None, value: str) -> None:
    vm = jump(load(tmp_path, {}, {"ip6": ip6}))
    assert dep.ipconfig_value(vm) == "ip=192.168.10.30/24,gw=192.168.10.1" + (f",{value}" if value else "")


# ------------------------------------------------------------------------------------ drift: decide


def observed_config(site: Site, **changes: Any) -> dict[str, Any]:
    """jump01 as PVE shows it once deploy made it: the allocated volumes, sizes as PVE writes them."""
    vm = jump(site)
    cfg: dict[str, Any] = dict(dep.desired_config(vm, site.hypervisor_for(vm), tpl(), "r1"))
    cfg["scsi0"] = f"local-lvm:vm-{vm.vmid}-disk-0,size={vm.disk_gb}G"
    cfg["scsi1"] = f"local-lvm:vm-{vm.vmid}-disk-1,discard=on,iothread=1,size=8G,ssd=1"
    cfg["virtio1"] = f"local:{vm.vmid}/vm-{vm.vmid}-disk-2.qcow2,size=2G"
    cfg["ide2"] = f"local-lvm:vm-{vm.vmid}-cloudinit,media=cdrom"
    cfg["agent"] = "enabled=1"
    cfg.update(changes)
    return {k: v for k, v in cfg.items() if v is not None}


DRIFT_CASES: dict[str, tuple[dict[str, Any], str, list[tuple[str, bool]]]] = {
    # name: (config changes, action, [(field, safe)])
    "in sync": ({}, "in-sync", []),
    "cpu changed": ({"cpu": "host"}, "drift", [("cpu", True)]),
    "cpu with flags, same type": ({"cpu": "x86-64-v2-AES,flags=+aes"}, "in-sync", []),
    "cpu unset": ({"cpu": None}, "drift", [("cpu", True)]),
    "data disk missing": ({"scsi1": None}, "drift", [("scsi1", True)]),
    "data disk smaller": ({"scsi1": "local-lvm:vm-1001-disk-1,discard=on,iothread=1,size=4G,ssd=1"}, "drift",
                          [("scsi1.size", True)]),
    "data disk larger": ({"scsi1": "local-lvm:vm-1001-disk-1,discard=on,iothread=1,size=16G,ssd=1"}, "drift",
                         [("scsi1.size", False)]),
    "data disk option off": ({"scsi1": "local-lvm:vm-1001-disk-1,iothread=1,size=8G,ssd=1"}, "drift",
                             [("scsi1.discard", True)]),
    "data disk on other storage": ({"virtio1": "local-lvm:vm-1001-disk-2,size=2G"}, "drift",
                                   [("virtio1.storage", False)]),
    "disk not in the inventory": ({"sata2": "local-lvm:vm-1001-disk-3,size=1G"}, "drift", [("sata2", False)]),
    "slot holds the cloud-init drive": ({"scsi1": "local-lvm:vm-1001-cloudinit,media=cdrom"}, "drift",
                                        [("scsi1", False)]),
    "ip6 changed": ({"ipconfig0": "ip=192.168.10.30/24,gw=192.168.10.1,ip6=auto"}, "drift", [("ipconfig0", True)]),
    "snippet changed": ({"cicustom": "vendor=local:snippets/factory-vendor-0000000000000000.yaml"}, "drift",
                        [("cicustom", True)]),
    "cicustom unset": ({"cicustom": None}, "drift", [("cicustom", True)]),
}


@pytest.mark.parametrize("case", DRIFT_CASES)
def test_decide_drift_of_the_options(site: Site, case: str) -> None:
    changes, action, fields = DRIFT_CASES[case]
    vm = jump(site)
    hv = site.hypervisor_for(vm)
    entry = {"vmid": vm.vmid, "status": "running", "name": vm.name}
    state = dep.HostState({vm.image: [tpl()]}, {vm.vmid: dep.Observed(entry, observed_config(site, **changes))}, {})
    plan = dep.decide(vm, hv, state, {})
    assert plan.action == action, plan.to_dict()
    assert [(d.field, d.safe) for d in plan.diffs] == fields, [str(d) for d in plan.diffs]
    if any(not safe for _, safe in fields):
        assert plan.blocked and "unsafe drift is reported, not corrected" in plan.reason


def test_a_vm_without_options_ignores_the_templates_cpu_and_disks(tmp_path: Path) -> None:
    """No cpu in the inventory: the template's stays (no drift); the template's own drives are not data disks."""
    site = load(tmp_path, {}, vendor=None)
    vm = jump(site)
    hv = site.hypervisor_for(vm)
    cfg = dict(dep.desired_config(vm, hv, tpl(), "r1"), cpu="host", scsi0=f"local-lvm:vm-{vm.vmid}-disk-0,size=20G",
               ide2=f"local-lvm:vm-{vm.vmid}-cloudinit,media=cdrom", efidisk0="local-lvm:vm-1001-disk-1,size=4M")
    state = dep.HostState({vm.image: [tpl()]}, {vm.vmid: dep.Observed({"vmid": vm.vmid, "status": "running"}, cfg)},
                          {})
    assert dep.decide(vm, hv, state, {}).action == "in-sync"


def test_disk_update_keeps_the_volume_and_its_size() -> None:
    site_vm = Vm.model_validate({"name": "x", "plane": "tenant", "vmid": 2001, "image": "i", "role": "r",
                                 "nics": [{"mac": "02:de:21:01:01:00"}],
                                 "disks": [{"slot": "scsi1", "size_gb": 8, "discard": True}]})
    value = disk_update_value(site_vm.disks[0], "local-lvm:vm-2001-disk-1,iothread=1,size=8G,backup=0")
    assert value == "local-lvm:vm-2001-disk-1,backup=0,discard=on,size=8G"


# ------------------------------------------------------------------------------------ the Tofu export


def tenant_site(tmp_path: Path) -> Site:
    """docs/examples/two-tenants.yml with acme-web01 given every option."""
    doc = yaml.safe_load(TWO_TENANTS.read_text())
    for host in doc["all"]["children"]["hypervisors"]["hosts"].values():
        host["pve"]["storage"]["snippets"] = "local"
    vm = doc["all"]["children"]["tenant"]["hosts"]["acme-web01"]["vm"]
    vm.update(copy.deepcopy(OPTIONS))
    vm["cloudinit"].update(ip6="auto", vendor_data="vendor.yaml")
    (tmp_path / "two-tenants.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (tmp_path / "vendor.yaml").write_text(VENDOR)
    return load_site(tmp_path / "two-tenants.yml", REPO_ROOT / "packer/images.yml")


TWO_TENANTS = REPO_ROOT / "docs" / "examples" / "two-tenants.yml"


@pytest.mark.parametrize("existing", [(), ("acme-web01",)])
def test_the_tofu_export_carries_the_options_and_passes_the_provider_schema(tmp_path: Path,
                                                                           existing: tuple[str, ...]) -> None:
    from . import test_tofu

    site = tenant_site(tmp_path)
    plan = test_tofu._plan(site, existing)
    config = tofu.tenant_config(site, plan, "acme", test_tofu._bases(site, plan))
    jsonschema.validate(config, test_tofu.SCHEMA)
    vm = config["resource"][tofu.RESOURCE]["acme-web01"]
    assert vm["cpu"]["type"] == "x86-64-v2-AES"
    assert vm["disk"][1:] == [
        {"interface": "scsi1", "datastore_id": "local-lvm", "size": 8, "discard": "on", "iothread": True, "ssd": True},
        {"interface": "virtio1", "datastore_id": "local", "size": 2, "discard": "ignore", "iothread": False,
         "ssd": False}]
    assert vm["initialization"]["ip_config"] == [{"ipv4": {"address": "dhcp"}, "ipv6": {"address": "auto"}}]
    vendor = site.vms["acme-web01"].cloudinit.vendor
    assert vendor is not None
    assert vm["initialization"]["vendor_data_file_id"] == f"local:snippets/{vendor.snippet_name}"
    # the provider's names, checked: a misspelt one is refused by the schema
    broken = copy.deepcopy(config)
    broken["resource"][tofu.RESOURCE]["acme-web01"]["initialization"]["vendor_data_file"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, test_tofu.SCHEMA)


# ------------------------------------------------------------------------------------ the template's CPU type


def test_the_catalogue_cpu_reaches_the_template_and_the_tofu_export_but_not_the_build_identity(tmp_path: Path) -> None:
    from image_factory.lab.pve import LabPve

    site = load(tmp_path, {}, vendor=None)
    vm = jump(site)
    image = site.image(vm.image)
    with_cpu = image.model_copy(update={"cpu": "x86-64-v3"})
    assert image.model_dump(mode="json") == with_cpu.model_dump(mode="json"), "a publish parameter, not a build input"
    hv = site.hypervisor_for(vm)
    params = factories.template_config(hv, with_cpu)
    assert params["cpu"] == "x86-64-v3" and "cpu" not in factories.template_config(hv, image)
    LabPve.check_vm_formats(params)  # the create parameters pass the cpu format as the lab's PVE checks it
    assert tofu.hardware(params, vm)["cpu"]["type"] == "x86-64-v3", "a Tofu clone gets the template's type"
    assert tofu.hardware(params, vm.model_copy(update={"cpu": "host"}))["cpu"]["type"] == "host"


def test_a_bad_catalogue_cpu_is_named(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO_ROOT / "packer/images.yml").read_text())
    name = next(iter(doc["images"]))
    doc["images"][name]["cpu"] = "skylake"
    (tmp_path / "images.yml").write_text(yaml.safe_dump(doc))
    inv, _ = write_site(tmp_path, {}, vendor=None)
    with pytest.raises(ValidationFailed) as err:
        load_site(inv, tmp_path / "images.yml")
    assert any(name in str(p) and "cpu" in str(p) and "'skylake' is not a CPU type" in str(p)
               for p in err.value.problems), [str(p) for p in err.value.problems]


# ------------------------------------------------------------------------------------ IPv6 in the DHCP exports


def ipv6_site(tmp_path: Path) -> Site:
    """jump01 with a static IPv6 address (its reservation), metrics01 on DHCPv6 with nics[0].address6."""
    doc = flat_example()
    mgmt = doc["all"]["children"]["mgmt"]["hosts"]
    mgmt["jump01"]["vm"]["cloudinit"]["ip6"] = IP6
    mgmt["metrics01"]["vm"]["cloudinit"]["ip6"] = "dhcp"
    mgmt["metrics01"]["vm"]["nics"][0]["address6"] = "2001:db8:10::41"
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_site(tmp_path / "hosts.yml", REPO_ROOT / "packer/images.yml")


@pytest.mark.parametrize(("fmt", "validator"), [
    ("kea6", lambda path: ["kea-dhcp6", "-t", str(path)]),
    ("dnsmasq", lambda path: ["dnsmasq", "--test", f"--conf-file={path}"]),
])
def test_ipv6_reservations_pass_their_daemons_check(tmp_path: Path, fmt: str, validator: Any) -> None:
    import json
    import subprocess

    text = dhcp.export(ipv6_site(tmp_path), fmt)
    out = tmp_path / f"export.{fmt}"
    out.write_text(text)
    proc = subprocess.run(validator(out), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if fmt == "kea6":
        found = {r["hostname"]: (r["hw-address"], r["ip-addresses"]) for r in json.loads(text)["Dhcp6"]["reservations"]}
        assert found == {"jump01": ("02:de:10:03:01:00", ["2001:db8:10::30"]),
                         "metrics01": ("02:de:10:01:01:00", ["2001:db8:10::41"])}
        broken = json.loads(text)
        broken["Dhcp6"]["reservations"][0]["ip-addresses"] = ["10.0.0.1"]  # the validator is a real check
        out.write_text(json.dumps(broken))
        assert subprocess.run(validator(out), capture_output=True, text=True, timeout=60).returncode != 0
    else:
        assert "dhcp-host=02:de:10:03:01:00,192.168.10.30,[2001:db8:10::30],jump01\n" in text
        assert "dhcp-host=02:de:10:01:01:00,[2001:db8:10::41],metrics01\n" in text


def test_exports_without_an_ipv6_place_say_so_and_hosts_carry_aaaa_lines(tmp_path: Path) -> None:
    site = ipv6_site(tmp_path)
    assert "does not carry the inventory's IPv6 addresses" in dhcp.export(site, "opnsense-isc")
    dnsmasq = dhcp.export(site, "opnsense")  # the Dnsmasq model's ip list holds both families
    assert "does not carry" not in dnsmasq and "mode static is enough" in dnsmasq
    assert "<ip>192.168.10.30,2001:db8:10::30</ip>" in dnsmasq and "<ip>2001:db8:10::41</ip>" in dnsmasq
    assert "2001:db8:10::30\tjump01." in dhcp.export(site, "hosts")
    plain = load_site(REPO_ROOT / "ansible/inventory", REPO_ROOT / "packer/images.yml")
    assert "IPv6" not in dhcp.export(plain, "opnsense"), "unchanged for a site without IPv6"


def test_a_nic_address6_that_disagrees_with_the_static_ip6_is_named(tmp_path: Path) -> None:
    found = problems(tmp_path, {"nics": [{"mac": "02:de:10:03:01:00", "address6": "2001:db8:10::99"},
                                         {"mac": "02:de:10:03:01:01", "bridge": "vmbr1", "vlan": 99}]},
                     {"ip6": IP6}, vendor=None)
    assert any("jump01" in p and "nics[0].address6 2001:db8:10::99 disagrees with cloudinit.ip6.ip" in p
               for p in found), found


def test_vendor_data_cloud_init_refuses_is_refused_with_its_reason(tmp_path: Path) -> None:
    # ./dev setup unpacks the distribution's cloud-init into the venv (tools.unpack_cloud_init): the check is real
    assert tools.find("cloud-init"), tools.missing_message("cloud-init")
    bad = "#cloud-config\npackages: 5\n"
    found = problems(tmp_path, {}, {"vendor_data": "cloud-init/vendor.yaml"}, vendor=bad)
    assert any("vm.cloudinit.vendor_data" in p and "cloud-init schema refuses it" in p
               and "packages: 5 is not of type 'array'" in p for p in found), found
    assert load(tmp_path, {}, {"vendor_data": "cloud-init/vendor.yaml"}).vms["jump01"].cloudinit.vendor


# ------------------------------------------------------------------------------------ the lab's cloud-init drive


@pytest.mark.parametrize(("ip6", "subnet"), [
    ("ip6=2001:db8::5/64,gw6=2001:db8::1", {"type": "static6", "address": "2001:db8::5/64", "gateway": "2001:db8::1"}),
    ("ip6=auto", {"type": "ipv6_slaac"}), ("ip6=dhcp", {"type": "dhcp6"})])
def test_the_lab_seed_carries_ip6_and_vendor_data_as_qemu_servers_nocloud_does(ip6: str, subnet: dict[str, str]
                                                                               ) -> None:
    from image_factory.lab.vmrunner import seed_files

    cfg = {"net0": "virtio=02:DE:10:03:01:00,bridge=vmbr0", "ipconfig0": f"ip=192.168.10.30/24,{ip6}"}
    files = seed_files("jump01", cfg, VENDOR)
    [phys] = [c for c in yaml.safe_load(files["network-config"])["config"] if c["type"] == "physical"]
    assert phys["subnets"] == [{"type": "static", "address": "192.168.10.30", "netmask": "255.255.255.0"}, subnet]
    assert files["vendor-data"] == VENDOR
    assert seed_files("jump01", cfg, "#cloud-config\n{}\n")["meta-data"] == files["meta-data"], \
        "qemu-server's instance-id hashes user-data and network-config, not vendor-data"
