"""The check registry: names, prerequisites, one declaration per check."""

from __future__ import annotations

import pytest

from image_factory import preflight as pf

pytestmark = pytest.mark.unit


def test_expand_checks_adds_prerequisites_in_order():
    assert pf.expand_checks(["space"]) == ("tls", "ssh", "token", "space")
    assert pf.expand_checks(None) == pf.ALL_CHECKS
    assert set(pf.DEPLOY_CHECKS) < set(pf.PUBLISH_CHECKS) == set(pf.ALL_CHECKS)
    # deploy holds its host lock over SSH, so it checks SSH; it uploads nothing
    assert "ssh" in pf.DEPLOY_CHECKS and "space" not in pf.DEPLOY_CHECKS


def test_a_new_check_is_one_declaration(node, env, monkeypatch):
    """Declared once (name, prerequisites, step), it runs after what it needs, and a failure of what it needs
    skips it; every other check is untouched."""
    monkeypatch.setattr("image_factory.preflight.registry.CHECKS", dict(pf.CHECKS))
    seen: list[str] = []

    @pf.check("ntp")
    def check_ntp(probe: pf.HostProbe) -> pf.Outcome:
        seen.append(probe.hv.name)
        assert probe.client is not None  # its prerequisites (tls, token) ran first and passed
        return pf.failed("clock is 90 s off", "run chronyc makestep")

    assert pf.expand_checks(["ntp"]) == ("tls", "token", "ntp")
    report = pf.run_preflight(*env, checks=["ntp"])
    assert seen == ["hv-unit"] and [r.name for r in report.hosts["hv-unit"]] == ["tls", "token", "ntp"]
    assert report.failures()[0][1] == pf.CheckResult("ntp", False, "clock is 90 s off", "run chronyc makestep")
    with pytest.raises(ValueError, match="declared twice"):
        pf.check("ntp")(check_ntp)

