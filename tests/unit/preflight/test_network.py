"""The bridge check and its VLAN rules."""

from __future__ import annotations

import pytest

from image_factory import preflight as pf

from .node import SECRET, unit_site

pytestmark = pytest.mark.unit


def test_missing_bridge(node, fakepve_cafile, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLIGHT_UNIT_SECRET", SECRET)
    r = pf.run_preflight(*unit_site(tmp_path, node.url, ca=fakepve_cafile, bridge="vmbr9"),
                         checks=["bridge"]).result("hv-unit", "bridge")
    assert not r.ok and r.detail == "bridge vmbr9 does not exist on pve1 (has: vmbr0)"
    assert "ifreload -a" in r.hint


@pytest.mark.parametrize(("iface", "detail"), [
    ({"type": "bridge", "bridge_vlan_aware": 1, "bridge_vids": "2-4094"}, None),
    ({"type": "bridge", "bridge_vlan_aware": 1}, None),  # no bridge_vids: PVE's default for a VLAN-aware bridge
    ({"type": "OVSBridge"}, None),
    ({"type": "bridge"},
     "bridge vmbr1 is not VLAN-aware, but vlan 99 (jump01 nic1), vlan 300 (a nic0, b nic0) use VLAN tags"),
    ({"type": "bridge", "bridge_vlan_aware": 1, "bridge_vids": "99"},
     "bridge vmbr1 carries VLANs 99, not vlan 300 (a nic0, b nic0)"),
    ({"type": "bridge", "bridge_vlan_aware": 1, "bridge_vids": "99 x"},
     "bridge vmbr1: bridge_vids '99 x' does not parse"),
])
def test_vlan_problems_name_bridge_vlan_and_nics(iface, detail):
    problems = pf.vlan_problems("vmbr1", iface, {99: ["jump01 nic1"], 300: ["a nic0", "b nic0"]})
    assert (problems == []) if detail is None else problems[0].startswith(detail)

