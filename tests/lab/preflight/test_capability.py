"""preflight's version check against the lab's twin."""

from __future__ import annotations

import pytest

from image_factory import preflight as pf

from .lab_nodes import Twin, assert_failure

pytestmark = pytest.mark.lab


def test_pve_version_7_4(twin: Twin):
    twin.pve.version, twin.pve.release_version = "7.4-17", "7.4"
    before = twin.state()
    report = pf.run_preflight(twin.settings, twin.site, [twin.host])
    assert_failure(report, twin.host, "version", "PVE 7.4-17 on pve-tenant is older than 8.4",
                   "`import` uploads need 8.4 or newer", hint="upgrade pve-tenant to Proxmox VE 8.4 or newer")
    assert twin.writes() == [] and twin.state() == before

