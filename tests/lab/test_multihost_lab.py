"""Three hypervisors, two of them tenant hosts under placement spread: real sshd + LabPve per host, no VM boots.
inventory.check, preflight, publish and deploy each give one result per host; deploy places the tenant VMs as its
plan said and a re-run finds them where they landed."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from image_factory import deploy as dep
from image_factory.lab.pytest_plugin import LabHandle, running_lab
from image_factory.preflight import run_preflight
from image_factory.publish import publish_image
from image_factory.pve.client import PveClient
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import load_site

from .test_publish_lab import IMAGE, make_build

pytestmark = pytest.mark.lab
HOSTS = ("pve-mgmt", "pve-tenant", "pve-tenant2")


@pytest.fixture(scope="module")
def mlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    with running_lab(tmp_path_factory.mktemp("multihost-lab"), real_boot="none",
                                  extra_hosts=[("pve-tenant2", "tenant")], placement={"tenant": "spread"}) as handle:
        yield handle


def guests(lab: LabHandle, host: str) -> set[int]:
    return {int(v["vmid"]) for v in PveClient(lab.hv(host)).list_vms() if not int(v.get("template") or 0)}


def test_three_hosts_check_preflight_publish_and_deploy_as_planned(mlab: LabHandle, tmp_path: Path) -> None:
    site = load_site(mlab.site.inventory_path, REPO_ROOT / "packer/images.yml")  # what inventory.check reads
    assert list(site.hypervisors) == list(HOSTS) and site.policy("tenant") == "spread"
    assert [h.name for h in site.candidates(site.vms["sandbox01"])] == ["pve-tenant", "pve-tenant2"]

    settings = dataclasses.replace(mlab.settings, builds_dir=tmp_path / "builds")
    make_build(settings.builds_dir, build_id="20261125-1200-m1")
    checked = run_preflight(settings, site, images=[IMAGE])
    assert list(checked.hosts) == list(HOSTS)
    assert checked.ok, {h: [(r.name, r.status, r.detail) for r in rs if r.status == "FAIL"]
                        for h, rs in checked.hosts.items()}

    published = publish_image(settings, site, IMAGE, progress=False)
    assert published.ok, published.to_dict()
    assert [(h.host, h.action) for h in published.hosts] == [(h, "created") for h in HOSTS]

    plan = {p.vm: p for p in dep.plan_deploy(None, site, plane="tenant").vms}
    assert {n: (p.host, p.action) for n, p in plan.items()} == {
        "iot-api01": ("pve-tenant", "create"), "sandbox01": ("pve-tenant2", "create")}
    assert plan["sandbox01"].placement.startswith("spread: fewest guests (pve-tenant2 0; pve-tenant 1)")
    report = dep.deploy_vms(None, site, plane="tenant", wait=False, progress=False)
    assert report.ok, report.to_dict()
    assert guests(mlab, "pve-tenant") == {2101} and guests(mlab, "pve-tenant2") == {2201}

    again = dep.deploy_vms(None, site, plane="tenant", wait=False, progress=False)
    assert {r.plan.vm: (r.plan.host, r.plan.placement) for r in again.results} == {
        "iot-api01": ("pve-tenant", "already on pve-tenant"), "sandbox01": ("pve-tenant2", "already on pve-tenant2")}
    assert {r.state for r in again.results} <= {"unchanged", "corrected"}
    assert guests(mlab, "pve-tenant") == {2101} and guests(mlab, "pve-tenant2") == {2201}


def test_a_node_going_offline_mid_publish_fails_that_host_alone_and_a_rerun_converges(
        mlab: LabHandle, tmp_path: Path) -> None:
    mlab.reset()
    settings = dataclasses.replace(mlab.settings, builds_dir=tmp_path / "builds")
    make_build(settings.builds_dir, build_id="20261125-1300-m2")
    site = mlab.site
    down = "pve-tenant2"
    watcher = PveClient(mlab.hv(down))
    stop = threading.Event()

    def offline_once_its_template_vm_exists() -> None:
        while not stop.is_set():
            if watcher.list_vms():
                mlab.control(down).call("set_node_offline", offline=True)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=offline_once_its_template_vm_exists, daemon=True)
    thread.start()
    try:
        first = publish_image(settings, site, IMAGE, progress=False)
    finally:
        stop.set()
        thread.join(5)
    by_host = {h.host: h for h in first.hosts}
    assert {h: r.action for h, r in by_host.items()} == {"pve-mgmt": "created", "pve-tenant": "created",
                                                          down: "failed"}, first.to_dict()
    assert "595" in (by_host[down].error or "") or "No route to host" in (by_host[down].error or "")

    mlab.control(down).call("set_node_offline", offline=False)
    again = publish_image(settings, site, IMAGE, progress=False)
    assert again.ok, again.to_dict()
    assert {h.host: h.action for h in again.hosts} == {"pve-mgmt": "unchanged", "pve-tenant": "unchanged",
                                                       down: "created"}
    listed = PveClient(mlab.hv(down)).list_vms()
    assert [int(v["template"] or 0) for v in listed] == [1], listed  # one template, nothing half-made left
