"""run_preflight against an in-process fakepve (real HTTPS, real token auth, real ACL answers): the whole run,
its report and how one host's odd answer stays in its check.

The SSH-based checks (ssh, space) need a real sshd: they are covered in tests/lab/preflight/.
"""

from __future__ import annotations

import json

import pytest

from image_factory import preflight as pf
from image_factory.errors import ValidationFailed

from .node import API_CHECKS, writes

pytestmark = pytest.mark.unit


def test_prepared_node_passes_every_api_check(node, env):
    report = pf.run_preflight(*env, checks=API_CHECKS)
    assert report.ok, report.to_dict()
    assert [r.name for r in report.hosts["hv-unit"]] == list(API_CHECKS)
    assert "PVE 8.4.1" in report.result("hv-unit", "version").detail
    assert "(1 owned)" in report.result("hv-unit", "vmids").detail
    report.raise_for_failures()  # no exception
    assert writes(node) == []
    assert any(p.endswith("/access/permissions") for _, p, _ in node.requests)


def test_unknown_hypervisor_and_check_are_refused_before_any_request(node, env):
    before = len(node.requests)
    with pytest.raises(ValidationFailed, match="no such hypervisor"):
        pf.run_preflight(*env, ["nope"])
    with pytest.raises(ValueError, match="unknown preflight check"):
        pf.run_preflight(*env, checks=["tls", "nonsense"])
    assert len(node.requests) == before


def test_to_dict_is_json_and_complete(node, env):
    node.storages["local"]["content"] = "iso"
    d = pf.run_preflight(*env, checks=API_CHECKS).to_dict()
    json.dumps(d)
    assert d["ok"] is False and d["hosts"]["hv-unit"]["ok"] is False
    storage = next(c for c in d["hosts"]["hv-unit"]["checks"] if c["name"] == "storage")
    assert storage["status"] == "FAIL" and storage["hint"] == "pvesm set local --content iso,import"


def test_api_error_and_odd_answer_fail_only_their_check(node, env):
    from image_factory.pve.client import PveClient

    class Odd(PveClient):
        def call(self, method, path, /, **params):
            if path == "/cluster/resources":
                return ["not-a-guest"]
            return super().call(method, path, **params)

    node.fail("GET", "/nodes/pve1/network", status=500, message="ifupdown2 exploded")
    report = pf.run_preflight(*env, checks=API_CHECKS, client_factory=lambda hv: Odd(hv, timeout=10))
    bridge = report.result("hv-unit", "bridge")
    assert not bridge.ok and bridge.detail == "GET /nodes/pve1/network: HTTP 500: ifupdown2 exploded"
    assert "pveproxy runs" in bridge.hint
    vmids = report.result("hv-unit", "vmids")
    assert not vmids.ok and vmids.detail.startswith("unexpected AttributeError")
    assert [r.name for _, r in report.failures()] == ["bridge", "vmids"]

