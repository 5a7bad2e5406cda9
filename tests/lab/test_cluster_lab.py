"""Issue #35's "done when", against the lab's modelled three-node cluster (lab/cluster.py) beside two tenant hosts:
the cluster described as ONE inventory entry (pve.nodes) passes inventory.check, preflight, publish and deploy --
one template for the cluster on shared storage, one per node on local storage, clones placed as the plan said --
and a node going offline mid-publish is reported for that node alone, a re-run converging. No VM boots."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from image_factory import deploy as dep
from image_factory.lab.cluster import SHARED_STORAGE
from image_factory.lab.inventory import InventoryDumper, InventoryLoader
from image_factory.lab.pytest_plugin import LabHandle
from image_factory.preflight import run_preflight
from image_factory.publish import publish_image
from image_factory.pve.client import PveClient
from image_factory.pve.hostlock import ClusterLock, LockBusy
from image_factory.pve.sshlink import SshLink
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import Site, load_site

from .test_publish_lab import IMAGE, make_build

pytestmark = pytest.mark.lab
NODES = ("pve-c1", "pve-c2", "pve-c3")
MEMBERS = tuple(f"labc/{n}" for n in NODES)
HOSTS = ("pve-mgmt", "pve-tenant", "pve-tenant2", *MEMBERS)


def cluster_entry_site(lab: LabHandle, tmp_path: Path, *, images: str, shared_import: bool = False) -> Site:
    """The lab's inventory with its three node entries folded into one cluster entry ``labc``, as an operator
    writes it (docs/inventory.md, "A Proxmox VE cluster"): the first node's endpoint and the others' in order, each
    node's SSH (and, as the lab's nodes keep their files apart, its storage paths), the cluster lock in the lab's
    shared /etc/pve; the tenant VMs name the cluster, where the plane's spread places them."""
    inventory = yaml.load(lab.settings.inventory.joinpath("hosts.yml").read_text(), Loader=InventoryLoader)  # noqa: S506
    groups = inventory["all"]["children"]
    hosts = groups["hypervisors"]["hosts"]
    nodes = {n: hosts.pop(n)["pve"] for n in NODES}
    first = nodes[NODES[0]]
    entry = {k: v for k, v in first.items() if k not in ("node", "ssh", "storage")}
    entry["api_urls"] = [nodes[n]["api_url"] for n in NODES[1:]]
    entry["cluster_lock_dir"] = str(lab.etc_pve() / "priv" / "lock")
    imports = {"import": SHARED_STORAGE, "import_dir": str(lab.paths.shared_storage_dir("labc") / "import")}
    entry["nodes"] = {n: {"ssh": pve["ssh"], "storage": {**pve["storage"], "images": images, "cloudinit": images,
                                                         **(imports if shared_import else {})}}
                      for n, pve in nodes.items()}
    hosts["labc"] = {"ansible_host": first["ssh"]["host"], "pve": entry}
    for vm in groups["tenant"]["hosts"].values():
        vm["vm"]["hypervisor"] = "labc"
    folder = tmp_path / "inventory"
    folder.mkdir()
    (folder / "hosts.yml").write_text(yaml.dump(inventory, Dumper=InventoryDumper, sort_keys=False, width=200))
    return load_site(folder, REPO_ROOT / "packer/images.yml")  # what inventory.check reads


def guests(lab: LabHandle, node: str) -> dict[int, bool]:
    """Each VM on the node and whether it is a template."""
    return {int(v["vmid"]): bool(int(v.get("template") or 0)) for v in PveClient(lab.hv(node)).list_vms()}


def settings_for(lab: LabHandle, tmp_path: Path, build_id: str) -> Any:
    settings = dataclasses.replace(lab.settings, builds_dir=tmp_path / "builds")
    make_build(settings.builds_dir, build_id=build_id)
    return settings


def test_a_cluster_entry_on_shared_storage_gets_one_template_and_clones_on_the_planned_nodes(
        fresh_cluster_lab: LabHandle, tmp_path: Path) -> None:
    lab = fresh_cluster_lab
    site = cluster_entry_site(lab, tmp_path, images=SHARED_STORAGE)
    assert list(site.hypervisors) == list(HOSTS) and [h.name for h in site.clusters["labc"]] == list(MEMBERS)
    settings = settings_for(lab, tmp_path, "20261206-1900-c1")

    checked = run_preflight(settings, site, images=[IMAGE])
    assert list(checked.hosts) == list(HOSTS)
    assert checked.ok, {h: [(r.name, r.detail) for r in rs if not r.ok] for h, rs in checked.hosts.items()}
    said = checked.result(MEMBERS[1], "cluster").detail
    assert "storage.images 'shared' is shared: one template for the cluster" in said
    assert checked.result("pve-tenant", "cluster").detail == "a hypervisor of its own"
    # the lab's own inventory lists each node as an entry of its own: a warning, the run goes on
    alone = run_preflight(settings, lab.site, ["pve-c2"], checks=["cluster"]).result("pve-c2", "cluster")
    assert alone.status == "WARN" and "node pve-c2 is in a cluster with pve-c1, pve-c3" in alone.detail, alone

    planned = publish_image(settings, site, IMAGE, progress=False, dry_run=True, hypervisors=["labc"])
    assert [(h.host, h.node, h.action) for h in planned.hosts] == [("labc", "pve-c1", "planned")]
    assert all(guests(lab, n) == {} for n in NODES)  # a dry run changes nothing

    published = publish_image(settings, site, IMAGE, progress=False)
    assert published.ok, published.to_dict()
    assert [(h.host, h.node, h.action) for h in published.hosts] == [
        ("pve-mgmt", "pve-mgmt", "created"), ("pve-tenant", "pve-tenant", "created"),
        ("pve-tenant2", "pve-tenant2", "created"), ("labc", "pve-c1", "created")]
    template = published.host("labc").template_vmid
    assert guests(lab, "pve-c1") == {template: True} and guests(lab, "pve-c2") == guests(lab, "pve-c3") == {}

    plan = {p.vm: p for p in dep.plan_deploy(None, site, plane="tenant").vms}
    assert {n: (p.host, p.action) for n, p in plan.items()} == {
        "iot-api01": ("labc/pve-c1", "create"), "sandbox01": ("labc/pve-c2", "create")}
    assert f"clones template {template} of node pve-c1 to pve-c2" in " ".join(plan["sandbox01"].notes)
    report = dep.deploy_vms(None, site, plane="tenant", wait=False, progress=False)
    assert report.ok, report.to_dict()
    assert guests(lab, "pve-c1") == {template: True, 2101: False} and guests(lab, "pve-c2") == {2201: False}

    again = dep.deploy_vms(None, site, plane="tenant", wait=False, progress=False)
    assert {r.plan.vm: (r.plan.host, r.plan.placement) for r in again.results} == {
        "iot-api01": ("labc/pve-c1", "already on labc/pve-c1"), "sandbox01": ("labc/pve-c2", "already on labc/pve-c2")}
    assert {r.state for r in again.results} <= {"unchanged", "corrected"}
    assert dep.destroy_vm(None, site, "sandbox01") == "sandbox01 (2201) destroyed on labc/pve-c2"
    assert guests(lab, "pve-c2") == {}
    republished = publish_image(settings, site, IMAGE, progress=False, hypervisors=["labc"])
    assert [(h.host, h.action) for h in republished.hosts] == [("labc", "unchanged")]
    assert not (lab.etc_pve() / "priv" / "lock" / "image-factory").exists()  # the cluster lock went with its runs

    lab.node_offline("pve-c1")  # the node holding the template is down: a new build goes through the next
    make_build(settings.builds_dir, build_id="20261206-1915-c1")
    newer = publish_image(settings, site, IMAGE, progress=False, hypervisors=["labc"])
    [line] = newer.hosts
    assert (line.host, line.node, line.action) == ("labc", "pve-c2", "created"), newer.to_dict()
    assert line.notes[-1].startswith("offline now: pve-c1")
    down = dep.deploy_vms(None, site, plane="tenant", wait=False, progress=False)  # its lock through pve-c2
    assert {r.plan.vm: r.state for r in down.results} == {"iot-api01": "blocked", "sandbox01": "blocked"}
    assert all("labc/pve-c1" in r.plan.reason or "labc/pve-c1" in r.plan.placement for r in down.results)
    lab.node_online("pve-c1")
    settled = publish_image(settings, site, IMAGE, progress=False, hypervisors=["labc"])
    assert [(h.host, h.node, h.action, h.template_vmid) for h in settled.hosts] == [
        ("labc", "pve-c1", "unchanged", line.template_vmid)]
    assert guests(lab, "pve-c2") == {line.template_vmid: True}


def test_a_cluster_entry_on_local_storage_gets_a_template_per_node_and_a_node_down_mid_publish_fails_alone(
        fresh_cluster_lab: LabHandle, tmp_path: Path) -> None:
    lab = fresh_cluster_lab
    site = cluster_entry_site(lab, tmp_path, images="local")
    settings = settings_for(lab, tmp_path, "20261206-1930-c2")
    down = "pve-c2"
    watcher = PveClient(lab.hv(down))
    stop = threading.Event()

    def down_once_its_template_vm_exists() -> None:  # the nodes converge in parallel: watch the one going down
        while not stop.is_set():
            if watcher.list_vms():
                lab.node_offline(down)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=down_once_its_template_vm_exists, daemon=True)
    thread.start()
    try:
        first = publish_image(settings, site, IMAGE, progress=False, hypervisors=["labc"])
    finally:
        stop.set()
        thread.join(10)
    by_host = {h.host: h for h in first.hosts}
    assert {h: r.action for h, r in by_host.items()} == {
        "labc/pve-c1": "created", f"labc/{down}": "failed", "labc/pve-c3": "created"}, [
        (h.host, h.error) for h in first.hosts]
    assert by_host["labc/pve-c1"].template_vmid != by_host["labc/pve-c3"].template_vmid  # VMIDs cluster-wide
    assert "595: No route to host" in (by_host[f"labc/{down}"].error or "")  # its peers answer for it, as PVE

    lab.node_online(down)
    again = publish_image(settings, site, IMAGE, progress=False, hypervisors=["labc"])
    assert again.ok, again.to_dict()
    assert {h.host: h.action for h in again.hosts} == {
        "labc/pve-c1": "unchanged", f"labc/{down}": "created", "labc/pve-c3": "unchanged"}
    templates = {n: guests(lab, n) for n in NODES}
    assert all(list(t.values()) == [True] for t in templates.values()), templates  # one each, nothing half-made
    assert len({vmid for t in templates.values() for vmid in t}) == 3

    plan = {p.vm: p for p in dep.plan_deploy(None, site, plane="tenant").vms}  # each node clones its own
    assert {n: (p.host, p.template_vmid, p.template_node) for n, p in plan.items()} == {
        "iot-api01": ("labc/pve-c1", again.host("labc/pve-c1").template_vmid, ""),
        "sandbox01": ("labc/pve-c2", again.host("labc/pve-c2").template_vmid, "")}
    report = dep.deploy_vms(None, site, plane="tenant", wait=False, progress=False)
    assert report.ok, report.to_dict()
    assert 2101 in guests(lab, "pve-c1") and 2201 in guests(lab, "pve-c2")


def test_a_run_holding_the_cluster_lock_keeps_another_from_every_node(fresh_cluster_lab: LabHandle,
                                                                      tmp_path: Path) -> None:
    lab = fresh_cluster_lab
    site = cluster_entry_site(lab, tmp_path, images="local")
    settings = settings_for(lab, tmp_path, "20261206-1945-c3")
    holder = site.hypervisors["labc/pve-c3"]
    lock = ClusterLock(SshLink(holder.name, holder.ssh).connect(), holder.cluster_lock_dir, "ops@x pid 7 run other",
                       owns_link=True)
    lock.acquire()
    try:
        blocked = publish_image(settings, site, IMAGE, progress=False, hypervisors=["labc"], lock_wait=1)
        assert [h.host for h in blocked.hosts] == list(MEMBERS)
        assert all("in progress by ops@x pid 7 run other" in (h.error or "") for h in blocked.hosts), blocked.to_dict()
        assert all(h.bytes_sent == 0 for h in blocked.hosts) and all(guests(lab, n) == {} for n in NODES)
        with pytest.raises(LockBusy, match="in progress by ops@x pid 7 run other"):
            dep.deploy_vms(None, site, plane="tenant", wait=False, progress=False, lock_wait=1)
    finally:
        lock.release()
    done = publish_image(settings, site, IMAGE, progress=False, hypervisors=["labc"], lock_wait=5)
    assert [(h.host, h.action) for h in done.hosts] == [(m, "created") for m in MEMBERS], done.to_dict()


def test_local_images_with_a_shared_import_storage_upload_once_and_import_on_every_node(
        fresh_cluster_lab: LabHandle, tmp_path: Path) -> None:
    lab = fresh_cluster_lab
    site = cluster_entry_site(lab, tmp_path, images="local", shared_import=True)
    settings = settings_for(lab, tmp_path, "20261206-2000-c4")
    published = publish_image(settings, site, IMAGE, progress=False, hypervisors=["labc"])
    assert published.ok, published.to_dict()
    assert [(h.host, h.action, h.upload) for h in published.hosts] == [
        ("labc/pve-c1", "created", "uploaded"), ("labc/pve-c2", "created", "skip"), ("labc/pve-c3", "created", "skip")]
    size = (settings.builds_dir / IMAGE / "debian-lab.qcow2").stat().st_size
    assert published.bytes_sent == size  # once, through the first node
    assert all(list(guests(lab, n).values()) == [True] for n in NODES)
