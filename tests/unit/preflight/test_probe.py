"""HostProbe: each fact of a host read once, its error kept."""

from __future__ import annotations

import pytest

from image_factory import preflight as pf
from image_factory.pve.client import ApiError

pytestmark = pytest.mark.unit


def test_parse_version():
    assert pf.parse_version("8.4.1") == (8, 4, 1)
    assert pf.parse_version("7.4-3") == (7, 4, 3)
    assert pf.parse_version("9.0") == (9, 0, 0)
    assert pf.parse_version("garbage") is None


def test_a_fact_is_read_once_and_its_error_kept_for_every_check_that_needs_it(node, env):
    """The probe reads each fact on first use; a failed read is not retried behind the next check's back: every
    check that needs the fact gets the same error (here the one failed read is the only one sent)."""
    settings, site = env
    probe = pf.HostProbe(site, site.hypervisors["hv-unit"], timeout=10)

    def storage_reads() -> int:
        return sum(1 for m, p, _ in node.requests if m == "GET" and p.endswith("/nodes/pve1/storage"))

    before = storage_reads()
    node.fail("GET", "/nodes/pve1/storage", status=500, message="pvestatd timed out", times=1)
    errors = []
    for _ in range(2):
        with pytest.raises(ApiError) as info:
            _ = probe.storages
        errors.append(info.value)
    assert errors[0] is errors[1] and "pvestatd timed out" in str(errors[0])
    assert storage_reads() == before + 1
    assert probe.version["version"] == "8.4.1" and probe.version is probe.version  # read once, then kept

