"""deploy with two tenant hosts (in-process fakepve servers, as test_deploy_fakepve): the plane's policy places
each new VM, the plan says where and why, a re-run finds each VM where it landed."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fakepve.certs import make_cert
from fakepve.pytest_plugin import _Serving

from image_factory import deploy as dep
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import load_site

from .example_site import flat_example
from .test_deploy_fakepve import (
    BUILD_ID,
    TOKEN_ID,
    FakeSite,
    LocalHostLock,
    ResizingPve,
    add_template,
    agents,  # noqa: F401 (a fixture: its fs is this module's three-host site)
    writes,
)

pytestmark = pytest.mark.unit
HOSTS = {"pve-mgmt": "fedora-44", "pve-tenant": "fedora-45", "pve-tenant2": "fedora-45"}


@pytest.fixture
def fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSite]:
    monkeypatch.setattr(dep.act, "LOCK_RETRY_DELAY", 0.05)
    monkeypatch.setattr(dep.ready, "READY_POLL_INTERVAL", 0.05)
    monkeypatch.setattr(dep.act, "ssh_host_lock",
                        lambda hv, owner, wait: LocalHostLock(tmp_path / f"{hv.name}.lock", owner, wait))
    cert, key, _ = make_cert(str(tmp_path), hosts=("127.0.0.1",))
    data = flat_example()
    hvs = data["all"]["children"]["hypervisors"]["hosts"]
    hvs["pve-tenant2"] = copy.deepcopy(hvs["pve-tenant"])
    hvs["pve-tenant2"]["pve"]["node"] = "pve-tenant2"
    hvs["pve-tenant2"]["pve"].pop("install")
    data["all"]["children"]["tenant"]["vars"]["placement"] = "spread"
    servings, pves = [], {}
    try:
        for i, (host, image) in enumerate(HOSTS.items()):
            pve = ResizingPve(host="127.0.0.1", port=0)
            pve.add_node(host)
            pve.nodes.pop("pve1", None)
            pve.apitokens[TOKEN_ID] = f"secret-{i}"
            add_template(pve, host, 9000, image, BUILD_ID)
            servings.append(_Serving(pve, cert, key))
            pves[host] = pve
            body = hvs[host]["pve"]
            body.update(api_url=f"https://127.0.0.1:{pve.port}", tls_ca_file=cert,
                        token_secret_env=f"TEST_MULTIHOST_SECRET_{i}")
            body.pop("tls_fingerprint", None)
            monkeypatch.setenv(f"TEST_MULTIHOST_SECRET_{i}", f"secret-{i}")
        inv = tmp_path / "inventory"
        inv.mkdir()
        (inv / "hosts.yml").write_text(yaml.safe_dump(data, sort_keys=False))
        yield FakeSite(load_site(inv, REPO_ROOT / "packer/images.yml"), pves, inv)
    finally:
        for s in servings:
            s.stop()


def test_spread_places_new_vms_and_a_rerun_finds_them(fs: FakeSite, agents: None) -> None:  # noqa: F811
    fs.pves["pve-tenant"].add_vm(2990, "someones-vm", node="pve-tenant")  # one guest already there
    plan = {p.vm: p for p in dep.plan_deploy(None, fs.site, plane="tenant").vms}
    assert {n: (p.host, p.action) for n, p in plan.items()} == {
        "iot-api01": ("pve-tenant2", "create"), "sandbox01": ("pve-tenant", "create")}
    assert plan["iot-api01"].placement == "spread: fewest guests (pve-tenant2 0; pve-tenant 1)"
    assert plan["sandbox01"].placement == "spread: fewest guests (pve-tenant 1; pve-tenant2 1)"
    table = dep.plan_table(dep.DeployPlan(list(plan.values())))
    assert "placement: spread" in str(table.columns[-1]._cells[0])

    report = dep.deploy_vms(None, fs.site, plane="tenant", timeout=30, progress=False)
    assert report.ok, report.to_dict()
    assert fs.vm("pve-tenant2", 2101) is not None and fs.vm("pve-tenant", 2101) is None
    assert fs.vm("pve-tenant", 2201) is not None and fs.vm("pve-tenant2", 2201) is None
    assert report.to_dict()["vms"][0]["placement"].startswith("spread")

    fs.pves["pve-tenant"].add_vm(2991, "another", node="pve-tenant")  # spread would now pick pve-tenant2 for both
    for pve in fs.pves.values():
        pve.requests.clear()
    again = dep.deploy_vms(None, fs.site, plane="tenant", timeout=30, progress=False)
    assert {r.plan.vm: (r.plan.host, r.state, r.plan.placement) for r in again.results} == {
        "iot-api01": ("pve-tenant2", "unchanged", "already on pve-tenant2"),
        "sandbox01": ("pve-tenant", "unchanged", "already on pve-tenant")}
    assert all(writes(pve) == [] for pve in fs.pves.values())


def test_an_unreadable_candidate_blocks_only_what_it_may_hold(fs: FakeSite, agents: None) -> None:  # noqa: F811
    assert dep.deploy_vms(None, fs.site, ["sandbox01"], timeout=30, progress=False).ok  # lands on pve-tenant
    fs.pves["pve-tenant2"].fail("GET", "/nodes/pve-tenant2/qemu", status=595, message="no route to host",
                                times=99)
    plan = {p.vm: p for p in dep.plan_deploy(None, fs.site, plane="tenant").vms}
    assert plan["sandbox01"].host == "pve-tenant" and plan["sandbox01"].action == "blocked"  # MACs unverifiable
    assert plan["iot-api01"].host == "" and plan["iot-api01"].action == "blocked"
    assert "pve-tenant2 could not be read" in plan["iot-api01"].reason and "may hold it" in plan["iot-api01"].reason
    hosts = dep.plan_table(dep.DeployPlan([plan["iot-api01"], plan["sandbox01"]])).columns[1]._cells
    assert hosts == ["-", "pve-tenant"]
    report = dep.deploy_vms(None, fs.site, ["iot-api01"], timeout=5, progress=False)
    assert [r.state for r in report.results] == ["blocked"]
    assert fs.vm("pve-tenant", 2101) is None


def test_destroy_finds_the_host_that_holds_it(fs: FakeSite, agents: None) -> None:  # noqa: F811
    assert dep.deploy_vms(None, fs.site, ["iot-api01"], timeout=30, progress=False).ok
    held = "pve-tenant" if fs.vm("pve-tenant", 2101) else "pve-tenant2"
    assert dep.destroy_vm(None, fs.site, "iot-api01") == f"iot-api01 (2101) destroyed on {held}"
    assert fs.vm(held, 2101) is None
    assert "does not exist on any of pve-tenant, pve-tenant2" in dep.destroy_vm(None, fs.site, "iot-api01")
