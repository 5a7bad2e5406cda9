"""The vmids, macs and tags checks."""

from __future__ import annotations

import re

import pytest

from image_factory import preflight as pf

from .node import GRANTS, grant

pytestmark = pytest.mark.unit


def test_foreign_guest_in_a_range(node, env):
    node.add_vm(1500, "someone-elses", node="pve1", config={"tags": "prod"})
    r = pf.run_preflight(*env, checks=["vmids"]).result("hv-unit", "vmids")
    assert not r.ok
    assert r.detail == "VM 1500 (someone-elses) in vm_vmids is not tagged image-factory"
    assert "pve.template_vmids / pve.vm_vmids" in r.hint


def test_inventory_mac_on_another_vm_is_named_with_host_vmid_and_nic(node, env):
    ok = pf.run_preflight(*env, checks=["macs"]).result("hv-unit", "macs")
    assert ok.ok, ok.detail
    node.add_vm(501, "hand-made", node="pve1", config={"net1": "e1000=02:DE:10:09:01:00,bridge=vmbr0"})
    r = pf.run_preflight(*env, checks=["macs"]).result("hv-unit", "macs")
    assert not r.ok
    assert r.detail == "unit-vm nics[0] 02:de:10:09:01:00 is already used by hv-unit VMID 501 (hand-made) net1"
    assert "mac.generate" in r.hint


@pytest.mark.parametrize(("options", "policy"), [
    ({"allowed-tags": []}, ("free", set(), set())),  # Sys.Audit and nothing set: PVE's defaults
    ({"user-tag-access": {"user-allow": "free"}}, ("free", set(), set())),
    ({"user-tag-access": {"user-allow": "list", "user-allow-list": ["A", "b"]}, "registered-tags": ["prod"]},
     ("list", {"a", "b"}, {"prod"})),
    ({"user-tag-access": {"user-allow": "existing"}}, ("existing", set(), set())),
])
def test_tag_policy_reads_pve_managers_shapes(options, policy):
    assert pf.tag_policy(options) == policy


@pytest.mark.parametrize(("options", "named"), [
    ({"user-tag-access": "user-allow=free"}, "user-tag-access is 'user-allow=free', not an object"),
    ({"registered-tags": "a;b"}, "registered-tags is 'a;b', not an array"),
    ({"user-tag-access": {"user-allow": "list", "user-allow-list": "a;b"}}, "user-allow-list is 'a;b'"),
])
def test_tag_policy_of_another_shape_is_named(options, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        pf.tag_policy(options)


def test_a_refused_tag_says_how_to_fix_it():
    from image_factory.pve.client import explain

    message = "unable to create VM 9001 - Permission check failed (/, Sys.Modify for modifying tag 'b-1')"
    text = explain(message)
    assert text.startswith(message) and "tag 'b-1'" in text and "--user-tag-access user-allow=free" in text
    assert explain("VM is locked (backup)") == "VM is locked (backup)"


def test_tags_check_warns_where_the_policy_cannot_be_read(node, env):
    """Without Sys.Audit on / the answer holds no policy: unknown, a warning (the run goes on), never "free"."""
    from image_factory.pve.client import PveClient

    class Pve(PveClient):  # fakepve refuses get_options without Sys.Audit; PVE answers (the lab does too)
        def call(self, method, path, /, **params):
            if path == "/cluster/options":
                return {"allowed-tags": ["image-factory"]}
            return super().call(method, path, **params)

    grant(node, {p: v for p, v in GRANTS.items() if p != "/"})
    report = pf.run_preflight(*env, checks=["tags"], client_factory=lambda hv: Pve(hv, timeout=10))
    r = report.result("hv-unit", "tags")
    assert report.ok and r.status == "WARN" and "unknown (needs Sys.Audit on /)" in r.detail
    assert "user-allow=free" not in r.detail and "pvesh get /cluster/options" in r.hint
    assert report.to_dict()["hosts"]["hv-unit"]["checks"][-1]["status"] == "WARN"

