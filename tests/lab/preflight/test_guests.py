"""preflight's tags check against the lab's twin, and the tag policy answers it reads."""

from __future__ import annotations

import pytest

from image_factory import preflight as pf
from image_factory.lab.spec import RELEASES
from image_factory.pve.client import ApiError, PveClient

from .lab_nodes import Twin, assert_failure

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("twin", list(RELEASES), indirect=True)
def test_datacenter_tag_policy_is_reported(twin: Twin):
    """GET /cluster/options answers everyone, but holds the tag policy only for Sys.Audit on /: without it the
    policy is unknown (a warning, never "free"); with it a restrictive policy is refused with its fix."""
    twin.pve.cluster_options.update({"user-tag-access": "user-allow=list,user-allow-list=factory;mgmt",
                                     "registered-tags": "mgmt;tenant", "tag-style": "ordering=config"})
    first = pf.run_preflight(twin.settings, twin.site, [twin.host], checks=["version", "tags"])
    assert f"PVE {twin.pve.version}" in first.result(twin.host, "version").detail
    r = first.result(twin.host, "tags")
    assert r.ok and r.status == "WARN" and "unknown (needs Sys.Audit on /)" in r.detail  # what the playbook grants
    assert "user-allow=free" not in r.detail and "pvesh get /cluster/options" in r.hint
    token = twin.site.hypervisors[twin.host].token_id
    for who in (token, token.split("!")[0]):
        twin.pve.grant(who, "/", "Sys.Audit")
    report = pf.run_preflight(twin.settings, twin.site, [twin.host], checks=["tags"])
    assert_failure(report, twin.host, "tags", "user-tag-access user-allow=list (factory, mgmt)",
                   "per-build tags (image, build-<id>) are never on the list", "registered-tags holds tenant",
                   "needs Sys.Modify on /",
                   hint="pvesh set /cluster/options --user-tag-access user-allow=free")
    twin.pve.cluster_options.update({"user-tag-access": "user-allow=existing", "registered-tags": "prod"})
    report = pf.run_preflight(twin.settings, twin.site, [twin.host], checks=["tags"])
    assert_failure(report, twin.host, "tags", "user-tag-access user-allow=existing", hint="user-allow=free")
    twin.pve.cluster_options.clear()
    ok = pf.run_preflight(twin.settings, twin.site, [twin.host], checks=["tags"]).result(twin.host, "tags")
    assert ok.status == "ok" and "user-allow=free" in ok.detail
    assert twin.writes() == []


def test_cluster_options_answer_in_pve_managers_shapes(twin: Twin):
    """pve-manager's get_options: console, tag-style and allowed-tags for everyone; all of datacenter.cfg,
    parsed (objects, arrays), with Sys.Audit on / ."""

    client = PveClient(twin.site.hypervisors[twin.host])
    twin.pve.cluster_options.update({"user-tag-access": "user-allow=list,user-allow-list=a;b",
                                     "registered-tags": "prod;tenant", "tag-style": "ordering=config",
                                     "keyboard": "de"})
    assert client.cluster_options() == {"tag-style": {"ordering": "config"}, "allowed-tags": ["a", "b"]}
    token = twin.site.hypervisors[twin.host].token_id
    for who in (token, token.split("!")[0]):
        twin.pve.grant(who, "/", "Sys.Audit")
    assert client.cluster_options() == {
        "user-tag-access": {"user-allow": "list", "user-allow-list": ["a", "b"]},
        "registered-tags": ["prod", "tenant"], "tag-style": {"ordering": "config"}, "keyboard": "de",
        "allowed-tags": ["a", "b"]}


@pytest.mark.parametrize("twin", ["9.1.19"], indirect=True)
def test_a_pve_91_node_runs_qemu_server_9_1_15(twin: Twin):
    """pve-manager 9.1.19 shipped with qemu-server 9.1.15: create keeps its tags verbatim and does not check the
    tag policy; the config POST locks and checks the policy before it forks (an HTTP 403, not a task failure)."""

    c = PveClient(twin.site.hypervisors[twin.host])
    assert c.version()["version"] == "9.1.19"
    twin.pve.cluster_options.update({"user-tag-access": "user-allow=list,user-allow-list=ok"})
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=1990, name="v", memory=512, tags="Zeta;ok", timeout=30)
    assert c.vm_config(1990)["tags"] == "Zeta;ok"
    with pytest.raises(ApiError) as refused:
        c.call("POST", f"/nodes/{c.node}/qemu/1990/config", tags="Zeta;ok;new")
    assert refused.value.status == 403 and "modifying tag 'new'" in refused.value.pve_message

