"""Tenants in the site model: each its own VLAN, subnet and MAC range (docs/examples/two-tenants.yml)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from image_factory import deploy, preflight
from image_factory.errors import ValidationFailed
from image_factory.handoffs import dhcp
from image_factory.lab import factories
from image_factory.settings import REPO_ROOT
from image_factory.site import mac
from image_factory.site.inventory import load_site

pytestmark = pytest.mark.unit

EXAMPLE = REPO_ROOT / "docs" / "examples" / "two-tenants.yml"
CATALOGUE = REPO_ROOT / "packer" / "images.yml"
DOC = yaml.safe_load(EXAMPLE.read_text())


def _tenant_group(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["all"]["children"]["tenant"]


def _vm(doc: dict[str, Any], name: str) -> dict[str, Any]:
    groups = doc["all"]["children"]
    group = groups["tenant"] if name in groups["tenant"]["hosts"] else groups["mgmt"]
    return group["hosts"][name]["vm"]


def _variant(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    doc = copy.deepcopy(DOC)
    change(doc)
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_tenant_vms_are_on_their_tenants_vlan_with_their_tenants_mac_range() -> None:
    site = load_site(EXAMPLE, CATALOGUE)
    assert set(site.tenants) == {"acme", "globex"}
    vlans = {vm.name: [n.vlan for n in vm.nics] for vm in site.vms.values()}
    assert vlans == {"metrics01": [None], "acme-web01": [110], "acme-db01": [110], "globex-web01": [120]}
    hv = site.hypervisors["pve-tenant"]
    net0 = deploy.desired_config(site.vms["acme-web01"], hv, factories.template(), "r1")["net0"]
    assert net0 == "virtio=02:DE:21:11:01:00,bridge=vmbr0,firewall=1,tag=110"
    assert mac.check(EXAMPLE, CATALOGUE) == 4
    # preflight asks the tenant bridge for exactly the tenants' VLANs
    assert {bridge: sorted(tags) for bridge, tags in preflight.vlan_users(site, hv).items()} == {"vmbr0": [110, 120]}
    missing = preflight.vlan_problems("vmbr0", {"bridge_vlan_aware": 1, "bridge_vids": "100-115"},
                                      preflight.vlan_users(site, hv)["vmbr0"])
    assert missing == ["bridge vmbr0 carries VLANs 100-115, not vlan 120 (globex-web01 nic0)"]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *keys, last = path.split(".")
        node = doc
        for key in keys:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return change


TENANTS = "all.children.tenant.vars.tenants"
BAD = {
    "overlapping subnets": (_set(f"{TENANTS}.globex.subnet", "10.110.0.0/23"), "tenants acme, globex", "subnet",
                            "10.110.0.0/24 and 10.110.0.0/23 overlap"),
    "reused VLAN": (_set(f"{TENANTS}.globex.vlan", 110), "tenants acme, globex", "vlan", "both use VLAN 110"),
    "reused id": (_set(f"{TENANTS}.globex.id", 1), "tenants acme, globex", "id", "both have id 1"),
    "gateway outside the subnet": (_set(f"{TENANTS}.acme.gateway", "10.111.0.1"), "tenant acme", "gateway",
                                   "10.111.0.1 is not a host address of the tenant's subnet 10.110.0.0/24"),
    "range holds the gateway": (_set(f"{TENANTS}.acme.dhcp_range", {"first": "10.110.0.1", "last": "10.110.0.9"}),
                                "tenant acme", "dhcp_range", "holds the gateway 10.110.0.1"),
    "host bits in the subnet": (_set(f"{TENANTS}.acme.subnet", "10.110.0.5/24"), "tenant acme", "subnet",
                                "is not an IPv4 network"),
    "address outside the subnet": (_set("all.children.tenant.hosts.acme-web01.vm.nics.0.address", "10.120.0.11"),
                                   "acme-web01", "vm.nics.0.address",
                                   "10.120.0.11 is outside tenant acme's subnet 10.110.0.0/24"),
    "another VLAN on a tenant NIC": (_set("all.children.tenant.hosts.acme-web01.vm.nics.0.vlan", 120), "acme-web01",
                                     "vm.nics.0.vlan", "120 is not tenant acme's VLAN 110"),
    "unknown tenant": (_set("all.children.tenant.hosts.acme-web01.vm.tenant", "initech"), "acme-web01",
                       "vm.tenant", "no tenant 'initech' (have: acme, globex)"),
    "mgmt VM in a tenant": (_set("all.children.mgmt.hosts.metrics01.vm.tenant", "acme"), "metrics01", "vm.tenant",
                            "only tenant-plane VMs belong to a tenant"),
    "VLAN out of range": (_set(f"{TENANTS}.acme.vlan", 4095), "tenant acme", "vlan", "less than or equal to 4094"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_tenant_is_named_with_where_and_why_before_anything_runs(tmp_path: Path, case: str) -> None:
    change, entry, key, message = BAD[case]
    with pytest.raises(ValidationFailed) as caught:
        load_site(_variant(tmp_path, change), CATALOGUE)
    found = [(p.entry, p.key, p.message) for p in caught.value.problems]
    assert any(e == entry and k == key and message in m for e, k, m in found), found


def test_a_tenant_vms_mac_carries_its_tenants_id(tmp_path: Path) -> None:
    inventory = _variant(tmp_path, _set("all.children.tenant.hosts.globex-web01.vm.nics.0.mac", "02:de:21:11:02:00"))
    problems = mac.check_inventory(inventory)
    assert [(p.entry, p.message) for p in problems] == [(
        "globex-web01", "MAC '02:de:21:11:02:00': byte 2 21 means tenant id 1, but the VM's is tenant id 2 (22)")]
    # mac.generate gives it the right range: its own tenant's, host index counted within that tenant
    changes = mac.plan(inventory, "globex-web01")
    assert [c.new for c in changes] == ["02:de:22:11:01:00"]


def test_the_namespace_codes_tenant_ids_in_byte_two() -> None:
    assert str(mac.NamespaceMac.for_vm("tenant", "app", 3, 1, tenant_id=15)) == "02:de:2f:11:03:01"
    parsed = mac.NamespaceMac.parse("02:de:2f:11:03:01")
    assert (parsed.plane, parsed.tenant_id, parsed.role) == ("tenant", 15, "app")
    assert mac.NamespaceMac.parse("02:de:20:11:01:00").tenant_id == 0  # a tenant VM of no tenant
    with pytest.raises(mac.MacError, match="not a plane code"):
        mac.NamespaceMac.parse("02:de:11:01:01:00")  # mgmt has no tenants
    with pytest.raises(mac.MacError, match="tenant id 16"):
        mac.NamespaceMac.for_vm("tenant", "app", 1, 0, tenant_id=16)
    assert mac.allocate_host(["02:de:21:11:01:00", "02:de:22:11:05:00"], "tenant", "app", tenant_id=1) == 2


@pytest.mark.parametrize(("fmt", "validator"), [
    ("kea", lambda path: ["kea-dhcp4", "-t", str(path)]),
    ("dnsmasq", lambda path: ["dnsmasq", "--test", f"--conf-file={path}"]),
])
def test_the_dhcp_exports_give_each_tenant_its_range_and_pass_their_consumers_check(
        tmp_path: Path, fmt: str, validator: Callable[[Path], list[str]]) -> None:
    """Checked by the real consumers (kea-dhcp4 -t, dnsmasq --test: ./dev installs both)."""
    import json
    import subprocess

    text = dhcp.export(load_site(EXAMPLE, CATALOGUE), fmt)
    out = tmp_path / f"export.{fmt}"
    out.write_text(text)
    proc = subprocess.run(validator(out), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if fmt == "kea":
        dhcp4 = json.loads(text)["Dhcp4"]
        subnets = {s["user-context"]["tenant"]: s for s in dhcp4["subnet4"]}
        assert subnets["acme"]["pools"] == [{"pool": "10.110.0.100 - 10.110.0.199"}]
        assert sorted(r["hostname"] for r in subnets["acme"]["reservations"]) == ["acme-db01", "acme-web01"]
        assert [r["hostname"] for r in dhcp4["reservations"]] == ["metrics01"]  # no tenant: global
    else:
        assert "dhcp-range=set:globex,10.120.0.100,10.120.0.199,255.255.255.0,12h\n" in text
        assert "dhcp-option=tag:acme,option:router,10.110.0.1\n" in text
        assert "dhcp-host=02:de:21:11:01:00,10.110.0.11,acme-web01\n" in text


def test_a_kea_export_that_breaks_its_rules_is_refused_by_kea(tmp_path: Path) -> None:
    """The validator is a real check: a reservation outside its tenant's subnet fails it."""
    import json
    import subprocess

    doc = json.loads(dhcp.export(load_site(EXAMPLE, CATALOGUE), "kea"))
    doc["Dhcp4"]["subnet4"][0]["reservations"][0]["ip-address"] = "10.99.0.1"
    out = tmp_path / "bad.json"
    out.write_text(json.dumps(doc))
    proc = subprocess.run(["kea-dhcp4", "-t", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "10.99.0.1" in proc.stdout + proc.stderr


@pytest.mark.parametrize("fmt", ["kea", "dnsmasq"])
def test_the_example_site_without_tenants_exports_what_its_consumers_accept(tmp_path: Path, fmt: str) -> None:
    import subprocess

    out = tmp_path / f"export.{fmt}"
    out.write_text(dhcp.export(load_site(REPO_ROOT / "ansible" / "inventory", CATALOGUE), fmt))
    argv = ["kea-dhcp4", "-t", str(out)] if fmt == "kea" else ["dnsmasq", "--test", f"--conf-file={out}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_opnsense_export_holds_each_tenants_range_as_the_model_and_the_api_have_it() -> None:
    import xml.etree.ElementTree as ET

    from image_factory.handoffs import opnsense
    from image_factory.lab.opnsense_fake import RANGE_FIELDS

    site = load_site(EXAMPLE, CATALOGUE)
    text = dhcp.export(site, "opnsense")
    ranges = ET.fromstring(text).findall("./dnsmasq/dhcp_ranges")  # noqa: S314 (our own output)
    assert [tuple(child.tag for child in r) for r in ranges] == [RANGE_FIELDS] * 2  # the model's field order
    by_domain = {r.findtext("domain"): r for r in ranges}
    acme = by_domain["acme.deevnet.lan"]
    api = opnsense.RangeEntry.from_tenant(site.tenants["acme"])
    assert (acme.findtext("start_addr"), acme.findtext("end_addr"), acme.findtext("subnet_mask"),
            acme.findtext("description")) == (api.start_addr, api.end_addr, api.subnet_mask, api.descr)
    assert "static IPv4 10.110.0.1/24" in text and "tag 120 on the trunk" in text  # the manual steps, per tenant


ACME_WEB = "all.children.tenant.hosts.acme-web01.vm"
ACME_DB = "all.children.tenant.hosts.acme-db01.vm"
METRICS = "all.children.mgmt.hosts.metrics01.vm"
PVE_MGMT = "all.children.hypervisors.hosts.pve-mgmt.pve"


def _static(vm: str, ip: str, gw: str | None = None) -> Callable[[dict[str, Any]], None]:
    """NIC 0's address from a static cloud-init ipconfig instead of the NIC's ``address``."""
    def change(doc: dict[str, Any]) -> None:
        _get(doc, f"{vm}.nics")[0] = {"mac": _get(doc, f"{vm}.nics.0.mac")}
        _set(f"{vm}.cloudinit.ipconfig", {"ip": ip, **({"gw": gw} if gw else {})})(doc)
    return change


def _get(doc: dict[str, Any], path: str) -> Any:
    node: Any = doc
    for key in path.split("."):
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def _both(*changes: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        for one in changes:
            one(doc)
    return change


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *keys, last = path.split(".")
        del _get(doc, ".".join(keys))[last]
    return change


# Hostile tenant definitions: each one mutation of docs/examples/two-tenants.yml that would hurt a site (an outage,
# a leaked name, a rewritten MAC). None may pass inventory.check; each is named by entry, key and why.
HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], None], str, str, str]] = {
    # a fixed address on a tenant's own infrastructure or pool
    "NIC on the gateway": (_set(f"{ACME_WEB}.nics.0.address", "10.110.0.1"), "acme-web01", "vm.nics.0.address",
                           "10.110.0.1 is tenant acme's gateway"),
    "NIC on the network address": (_set(f"{ACME_WEB}.nics.0.address", "10.110.0.0"), "acme-web01",
                                   "vm.nics.0.address", "10.110.0.0 is tenant acme's network address"),
    "NIC on the broadcast address": (_set(f"{ACME_WEB}.nics.0.address", "10.110.0.255"), "acme-web01",
                                     "vm.nics.0.address", "10.110.0.255 is tenant acme's broadcast address"),
    "static address on the gateway": (_static(ACME_DB, "10.110.0.1/24"), "acme-db01", "vm.cloudinit.ipconfig.ip",
                                      "10.110.0.1 is tenant acme's gateway"),
    "static address on the broadcast": (_static(ACME_DB, "10.110.0.255/24"), "acme-db01",
                                        "vm.cloudinit.ipconfig.ip", "broadcast address"),
    "NIC inside the pool": (_set(f"{ACME_WEB}.nics.0.address", "10.110.0.150"), "acme-web01", "vm.nics.0.address",
                            "inside tenant acme's dynamic pool 10.110.0.100-10.110.0.199"),
    "NIC on the pool's first": (_set(f"{ACME_WEB}.nics.0.address", "10.110.0.100"), "acme-web01",
                                "vm.nics.0.address", "dynamic pool"),
    "NIC on the pool's last": (_set(f"{ACME_WEB}.nics.0.address", "10.110.0.199"), "acme-web01",
                               "vm.nics.0.address", "dynamic pool"),
    "static address inside the pool": (_static(ACME_DB, "10.110.0.120/24"), "acme-db01", "vm.cloudinit.ipconfig.ip",
                                       "dynamic pool"),
    "second NIC inside the pool": (_set(f"{ACME_WEB}.nics", [{"mac": "02:de:21:11:01:00", "address": "10.110.0.11"},
                                                             {"mac": "02:de:21:11:01:01", "address": "10.110.0.120"}]),
                                   "acme-web01", "vm.nics.1.address", "dynamic pool"),
    # one address, two holders
    "two VMs on one address": (_set(f"{ACME_DB}.nics.0.address", "10.110.0.11"), "acme-db01", "vm.nics.0.address",
                               "address 10.110.0.11 is also held by acme-web01 vm.nics.0.address"),
    "one VM's two NICs on one address": (_set(f"{ACME_WEB}.nics", [
        {"mac": "02:de:21:11:01:00", "address": "10.110.0.11"},
        {"mac": "02:de:21:11:01:01", "address": "10.110.0.11"}]),
        "acme-web01", "vm.nics.1.address", "is also held by acme-web01 vm.nics.0.address"),
    "a static address another VM's NIC holds": (_static(ACME_DB, "10.110.0.11/24"), "acme-db01",
                                                "vm.cloudinit.ipconfig.ip", "is also held by acme-web01"),
    "a mgmt VM on its hypervisor's address": (
        _both(_set(f"{PVE_MGMT}.ssh.host", "192.168.10.5"), _set(f"{METRICS}.nics.0.address", "192.168.10.5")),
        "metrics01", "vm.nics.0.address", "address 192.168.10.5 is also held by pve-mgmt pve.ssh.host"),
    "a tenant VM on a hypervisor's address": (
        _both(_set("all.children.hypervisors.hosts.pve-tenant.pve.ssh.host", "10.110.0.30"),
              _set(f"{ACME_WEB}.nics.0.address", "10.110.0.30")),
        "pve-tenant", "pve.ssh.host", "address 10.110.0.30 is also held by acme-web01 vm.nics.0.address"),
    # a MAC claiming a tenant the VM is not in
    "another tenant's MAC byte": (_set(f"{ACME_WEB}.nics.0.mac", "02:de:22:11:01:00"), "acme-web01", "vm.nics.0.mac",
                                  "byte 2 22 is tenant globex's (id 2), but the VM belongs to tenant acme (id 1)"),
    "an undefined tenant's MAC byte": (_set(f"{ACME_WEB}.nics.0.mac", "02:de:25:11:01:00"), "acme-web01",
                                       "vm.nics.0.mac", "byte 2 25 is a tenant id no tenant has (id 5)"),
    "a tenant MAC byte on a VM of no tenant": (_drop("all.children.tenant.hosts.globex-web01.vm.tenant"),
                                               "globex-web01", "vm.nics.0.mac",
                                               "is tenant globex's (id 2), but the VM belongs to no tenant"),
    "a tenant MAC byte on a mgmt VM": (_set(f"{METRICS}.nics.0.mac", "02:de:21:01:01:00"), "metrics01",
                                       "vm.nics.0.mac", "is tenant acme's (id 1), but the VM belongs to no tenant"),
    # names that answer for someone else
    "two tenants, one domain": (_set(f"{TENANTS}.globex.domain", "acme.deevnet.lan"), "tenants acme, globex",
                                "domain", "both use domain acme.deevnet.lan"),
    "two tenants, one domain in other case": (_set(f"{TENANTS}.globex.domain", "ACME.deevnet.lan"),
                                              "tenants acme, globex", "domain", "both use domain"),
    "a tenant in the hypervisors' domain": (_set(f"{TENANTS}.acme.domain", "deevnet.lan"), "tenant acme", "domain",
                                            "deevnet.lan is the mgmt plane's domain (hypervisor pve-mgmt's"),
    "a tenant in a mgmt VM's search domain": (
        _both(_set(f"{METRICS}.cloudinit.searchdomain", "infra.example.org"),
              _set(f"{TENANTS}.acme.domain", "infra.example.org")),
        "tenant acme", "domain", "is the mgmt plane's domain (metrics01's cloudinit.searchdomain)"),
    # a tenant on the mgmt plane's network
    "a tenant subnet over a mgmt VM's network": (_set(f"{METRICS}.cloudinit.ipconfig", {"ip": "10.110.0.60/16"}),
                                                 "tenant acme", "subnet",
                                                 "10.110.0.0/24 overlaps the mgmt network (metrics01's"),
    "a tenant subnet over a mgmt VM's address": (_set(f"{METRICS}.nics.0.address", "10.120.0.60"), "tenant globex",
                                                 "subnet", "overlaps the mgmt network (metrics01's vm.nics.0.address)"),
    "a tenant subnet over a hypervisor's SSH address": (_set(f"{PVE_MGMT}.ssh.host", "10.120.0.2"), "tenant globex",
                                                        "subnet", "overlaps the mgmt network (hypervisor pve-mgmt's"),
    "a tenant subnet over a hypervisor's API address": (_set(f"{PVE_MGMT}.api_url", "https://10.110.0.3:8006"),
                                                        "tenant acme", "subnet",
                                                        "the mgmt network (hypervisor pve-mgmt's pve.api_url)"),
    # ids with more than one reading
    "id as a string": (_set(f"{TENANTS}.acme.id", "1"), "tenant acme", "id", "is not a plain integer"),
    "id as a float": (_set(f"{TENANTS}.acme.id", 1.0), "tenant acme", "id", "is not a plain integer"),
    "id with a leading zero": (_set(f"{TENANTS}.acme.id", "01"), "tenant acme", "id", "is not a plain integer"),
    "id as a boolean": (_set(f"{TENANTS}.acme.id", True), "tenant acme", "id", "is not a plain integer"),
    "VLAN as a string": (_set(f"{TENANTS}.acme.vlan", "110"), "tenant acme", "vlan", "is not a plain integer"),
    "VLAN as a float": (_set(f"{TENANTS}.acme.vlan", 110.0), "tenant acme", "vlan", "is not a plain integer"),
    "id 0": (_set(f"{TENANTS}.acme.id", 0), "tenant acme", "id", "greater than or equal to 1"),
    "id 16": (_set(f"{TENANTS}.acme.id", 16), "tenant acme", "id", "less than or equal to 15"),
    **BAD,
}


@pytest.mark.parametrize("case", HOSTILE)
def test_no_hostile_tenant_passes_inventory_check(tmp_path: Path, case: str) -> None:
    """Through the command itself: exit 2, the problem named with file, entry and key, no traceback."""
    from invoke import Collection, Program

    from image_factory.settings import DEFAULTS
    from image_factory.tasks import inventory as inventory_tasks

    change, entry, key, message = HOSTILE[case]
    path = _variant(tmp_path, change)
    with pytest.raises(ValidationFailed) as caught:
        load_site(path, CATALOGUE)
    found = [(p.file, p.entry, p.key, p.message) for p in caught.value.problems]
    assert any(f == str(path) and e == entry and k == key and message in m for f, e, k, m in found), found
    ns = Collection(inventory_tasks.ns)
    ns.configure({"factory": dict(DEFAULTS)})
    with pytest.raises(SystemExit) as code:
        Program(namespace=ns).run(["invoke", "inventory.check", "-i", str(path), "--catalogue", str(CATALOGUE)])
    assert code.value.code == 2


def test_the_example_stays_valid_for_every_check() -> None:
    site = load_site(EXAMPLE, CATALOGUE)
    assert mac.check_inventory(EXAMPLE, CATALOGUE) == []
    assert len(dhcp.checked_reservations(site)) == 4


@pytest.mark.parametrize(("key", "raw"), [
    ("id", "01"), ("id", "0x1"), ("id", "0b1"), ("vlan", "0156"), ("vlan", "1:50"), ("vlan", "1_10"),
])
def test_an_id_or_vlan_yaml_reads_otherwise_than_it_is_written_is_refused(tmp_path: Path, key: str, raw: str) -> None:
    """PyYAML (YAML 1.1) reads 0156 as 110, 1:50 as 110 and 0x1 as 1; a reader of YAML 1.2 (or a person) reads 156,
    a string, or 0x1: such an id or VLAN is refused, not given a reading the writer may not have meant."""
    value = {"id": "            id: 1\n", "vlan": "            vlan: 110\n"}[key]
    path = tmp_path / "hosts.yml"
    path.write_text(EXAMPLE.read_text().replace(value, value.replace(value.split(": ")[1], raw + "\n"), 1))
    assert raw in path.read_text()
    with pytest.raises(ValidationFailed) as caught:
        load_site(path, CATALOGUE)
    assert [(p.entry, p.key) for p in caught.value.problems] == [("tenant acme", key)]
    assert f"{raw} is not a plain integer" in caught.value.problems[0].message


@pytest.mark.parametrize("raw", ['"1"', "1.0"])
def test_a_quoted_or_float_id_is_refused_by_mac_check_and_generate_too(tmp_path: Path, raw: str) -> None:
    """One reading everywhere: mac.check and mac.generate read tenants through the site model, so the tenant's
    MACs are never taken for "no tenant" and rewritten."""
    path = tmp_path / "hosts.yml"
    path.write_text(EXAMPLE.read_text().replace("            id: 1\n", f"            id: {raw}\n"))
    problems = mac.check_inventory(path)
    assert [(p.entry, p.key) for p in problems] == [("tenant acme", "id")], problems
    with pytest.raises(ValidationFailed) as caught:
        mac.plan(path, "acme-web01")
    assert [(p.entry, p.key) for p in caught.value.problems] == [("tenant acme", "id")]
    before = path.read_text()
    with pytest.raises(ValidationFailed):
        mac.generate(path, "acme-web01")
    assert path.read_text() == before
