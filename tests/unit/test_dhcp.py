"""DHCP/DNS exports of the site's MACs (image_factory.handoffs.dhcp): byte-stable, complete, refused on a bad MAC."""

from __future__ import annotations

import csv
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from invoke.context import Context
from invoke.exceptions import Exit

from image_factory.errors import ValidationFailed
from image_factory.handoffs import dhcp
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import load_site
from image_factory.tasks import mac as mac_tasks

from .example_site import copy_example, edit

pytestmark = pytest.mark.unit

IMAGES = REPO_ROOT / "packer/images.yml"


@pytest.fixture
def inv(tmp_path: Path) -> Path:
    return copy_example(tmp_path)


def export(path: Path, fmt: str) -> str:
    return dhcp.export(load_site(path, IMAGES), fmt)


@pytest.mark.parametrize("fmt", dhcp.FORMATS)
def test_exports_are_byte_stable_and_independent_of_inventory_order(inv: Path, tmp_path: Path, fmt: str) -> None:
    first = export(inv, fmt)
    assert export(inv, fmt) == first
    data = yaml.safe_load(inv.read_text())
    children = data["all"]["children"]
    for group in ("mgmt", "tenant"):
        hosts = children[group]["hosts"]
        children[group]["hosts"] = dict(reversed(list(hosts.items())))
    data["all"]["children"] = dict(reversed(list(children.items())))
    shuffled = inv.parent / "shuffled.yml"  # beside host_vars/, which hold the hypervisors' pve mappings
    shuffled.write_text(yaml.safe_dump(data, sort_keys=False, width=4096))
    assert export(shuffled, fmt) == first


def test_export_contents(inv: Path) -> None:
    edit(inv, '{mac: "02:de:10:03:01:01", bridge: vmbr1, vlan: 99}',
         '{mac: "02:de:10:03:01:01", bridge: vmbr1, vlan: 99, address: 10.99.0.30}')
    rows = list(csv.DictReader(io.StringIO(export(inv, "csv"))))
    assert [r["mac"] for r in rows] == sorted(r["mac"] for r in rows)
    by_host = {r["hostname"]: r for r in rows}
    assert by_host["jump01"]["address"] == "192.168.10.30"
    assert by_host["jump01-nic1"]["address"] == "10.99.0.30"
    assert by_host["metrics01"]["address"] == ""

    kea = json.loads(export(inv, "kea"))["Dhcp4"]["reservations"]
    assert {r["hostname"]: r.get("ip-address") for r in kea}["jump01"] == "192.168.10.30"
    assert "ip-address" not in next(r for r in kea if r["hostname"] == "metrics01")
    assert len({r["hw-address"] for r in kea}) == len(kea) == 7

    root = ET.fromstring(export(inv, "opnsense"))  # noqa: S314 (our own output)
    entries = root.findall("./dnsmasq/hosts")
    assert len(entries) == 7 and len({e.get("uuid") for e in entries}) == 7
    by_host = {e.findtext("host"): e for e in entries}
    assert (by_host["jump01"].findtext("hwaddr"), by_host["jump01"].findtext("ip"),
            by_host["jump01"].findtext("domain")) == ("02:de:10:03:01:00", "192.168.10.30", "deevnet.lan")
    assert by_host["metrics01"].findtext("ip") == "" and by_host["metrics01"].findtext("hwaddr") == "02:de:10:01:01:00"
    # the fields, in the order OPNsense's Dnsmasq model declares them (core: models/OPNsense/Dnsmasq/Dnsmasq.xml)
    assert [child.tag for child in entries[0]] == ["host", "domain", "local", "ip", "cnames", "client_id", "hwaddr",
                                                   "lease_time", "ignore", "set_tag", "descr", "comments", "aliases"]
    assert export(inv, "opnsense") == export(inv, "opnsense"), "stable uuids: a re-export is the same text"

    root = ET.fromstring(export(inv, "opnsense-isc"))  # noqa: S314 (our own output)
    maps = root.findall("./dhcpd/lan/staticmap")
    assert [m.findtext("mac") for m in maps][:1] == ["02:de:10:01:01:00"]
    assert len(maps) == 5 and len(root.findall("./dhcpd/opt1/staticmap")) == 2
    hosts = root.findall("./OPNsense/unboundplus/hosts/host")
    assert [(h.findtext("hostname"), h.findtext("domain"), h.findtext("server")) for h in hosts] == [
        ("jump01", "deevnet.lan", "192.168.10.30"), ("jump01-nic1", "deevnet.lan", "10.99.0.30"),
    ]

    assert "dhcp-host=02:de:10:03:01:00,192.168.10.30,jump01\n" in export(inv, "dnsmasq")
    assert "dhcp-host=02:de:10:01:01:00,metrics01\n" in export(inv, "dnsmasq")
    etc = export(inv, "hosts").splitlines()
    assert etc[1:3] == ["10.99.0.30\tjump01-nic1.deevnet.lan jump01-nic1", "192.168.10.30\tjump01.deevnet.lan jump01"]
    assert "# metrics01.deevnet.lan (02:de:10:01:01:00): no address" in "\n".join(etc)


def test_export_refuses_duplicate_addresses_and_bad_macs(inv: Path) -> None:
    edit(inv, '{mac: "02:de:10:01:01:00"}', '{mac: "02:de:10:01:01:00", address: 192.168.10.30}')
    with pytest.raises(ValidationFailed) as exc:  # the site model refuses it: no task gets that far
        export(inv, "kea")
    assert "address 192.168.10.30 is also held by jump01 vm.cloudinit.ipconfig.ip" in str(exc.value)
    edit(inv, '{mac: "02:de:10:01:01:00", address: 192.168.10.30}', '{mac: "02:de:10:01:01:00"}')
    edit(inv, '"02:de:10:01:02:00"', '"02:de:10:02:02:00"')  # still well-formed: load_site accepts it
    with pytest.raises(ValidationFailed) as exc:
        export(inv, "csv")
    assert "byte 3 (role) 02 means automation" in str(exc.value)


def test_export_task_writes_output_and_rejects_unknown_format(inv: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "dhcp.conf"
    mac_tasks.export(Context(), format="dnsmasq", output=str(out), inventory=str(inv), catalogue=str(IMAGES))
    assert out.read_text() == export(inv, "dnsmasq")
    with pytest.raises(Exit):
        mac_tasks.export(Context(), format="bind", inventory=str(inv), catalogue=str(IMAGES))
    with pytest.raises(Exit):
        mac_tasks.export(Context(), format="opnsense-isc", interfaces="dmz=igb0", inventory=str(inv),
                         catalogue=str(IMAGES))
