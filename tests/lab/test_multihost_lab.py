"""Three hypervisors, two of them tenant hosts under placement spread: real sshd + LabPve per host, no VM boots.
inventory.check, preflight, publish and deploy each give one result per host; deploy places the tenant VMs as its
plan said and a re-run finds them where they landed."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from image_factory import deploy as dep
from image_factory.inventory import load_site
from image_factory.lab.pytest_plugin import LabHandle, start_lab, stop_lab
from image_factory.preflight import run_preflight
from image_factory.publish import publish_image
from image_factory.pve import PveClient
from image_factory.settings import REPO_ROOT

from .test_publish_lab import IMAGE, make_build

pytestmark = pytest.mark.lab
HOSTS = ("pve-mgmt", "pve-tenant", "pve-tenant2")


@pytest.fixture(scope="module")
def mlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    handle, slot_lock = start_lab(tmp_path_factory.mktemp("multihost-lab"), real_boot="none",
                                  extra_hosts=[("pve-tenant2", "tenant")], placement={"tenant": "spread"})
    try:
        yield handle
    finally:
        stop_lab(handle, slot_lock)


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
