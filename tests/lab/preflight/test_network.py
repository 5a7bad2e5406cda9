"""preflight's bridge check against the lab."""

from __future__ import annotations

import pytest

from image_factory import preflight as pf
from image_factory.lab.pytest_plugin import LabHandle

pytestmark = pytest.mark.lab


def test_a_bridge_that_cannot_carry_a_nics_vlan_is_named(fresh_lab: LabHandle):
    """jump01's second NIC is tagged 99 on vmbr1: the bridge must be VLAN-aware and list 99 in bridge-vids."""
    fresh_lab.bridge_vlans("pve-mgmt", "vmbr1", vids="2-98 100-4094")
    r = pf.run_preflight(fresh_lab.settings, fresh_lab.site, checks=["bridge"]).result("pve-mgmt", "bridge")
    assert not r.ok and r.detail == "bridge vmbr1 carries VLANs 2-98 100-4094, not vlan 99 (jump01 nic1)"
    assert "bridge-vids" in r.hint
    fresh_lab.bridge_vlans("pve-mgmt", "vmbr1", aware=False)
    r = pf.run_preflight(fresh_lab.settings, fresh_lab.site, checks=["bridge"]).result("pve-mgmt", "bridge")
    assert not r.ok and r.detail == "bridge vmbr1 is not VLAN-aware, but vlan 99 (jump01 nic1) use VLAN tags"
    fresh_lab.clear_faults("pve-mgmt")
    assert pf.run_preflight(fresh_lab.settings, fresh_lab.site, checks=["bridge"]).result("pve-mgmt", "bridge").ok

