"""Per-VM options (issue #34) against the lab: a VM with a CPU type, extra data disks, IPv6 and a cloud-init
vendor-data snippet lands, a second plan shows no drift, a changed snippet or a larger disk is drift deploy
corrects, and a disk the inventory no longer lists is reported and kept."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from image_factory import deploy as dep
from image_factory.errors import RemoteError
from image_factory.lab import controller
from image_factory.lab.pytest_plugin import LabHandle
from image_factory.pve import codec as pvecodec
from image_factory.pve.client import PveClient
from image_factory.site.inventory import Site, load_site

from . import test_deploy_lab
from .test_deploy_lab import MGMT, api_config, errors

pytestmark = pytest.mark.lab
# test_deploy_lab's lab (fresh hosts, one tested template each), shared by name
dlab, tiny_image, lab = test_deploy_lab.dlab, test_deploy_lab.tiny_image, test_deploy_lab.lab

VENDOR = "#cloud-config\nwrite_files:\n  - path: /etc/vendor-data-seen\n    content: from the site repository\n"
OPTIONS: dict[str, Any] = {
    "cpu": "x86-64-v2-AES",
    "disks": [{"slot": "scsi1", "size_gb": 2, "discard": True, "iothread": True, "ssd": True},
              {"slot": "virtio1", "size_gb": 1, "storage": "local"}],
}


def options_site(lab: LabHandle, root: Path, vm_changes: dict[str, Any] | None = None,
                 vendor: str = VENDOR) -> Site:
    """The lab's site with jump01 given every option; its vendor data in <root>/cloud-init/vendor.yaml."""
    source = Path(lab.settings.inventory)
    text = (source / "hosts.yml" if source.is_dir() else source).read_text()
    doc = yaml.load(text, Loader=controller.InventoryLoader)  # noqa: S506 - a SafeLoader keeping !vault values
    vm = doc["all"]["children"]["mgmt"]["hosts"]["jump01"]["vm"]
    vm.update(copy.deepcopy(OPTIONS))
    vm.update(copy.deepcopy(vm_changes or {}))
    vm.setdefault("cloudinit", {}).update(ip6={"ip": "2001:db8:10::30/64", "gw": "2001:db8:10::1"},
                                          vendor_data="cloud-init/vendor.yaml")
    (root / "inventory").mkdir(parents=True, exist_ok=True)
    (root / "inventory" / "hosts.yml").write_text(yaml.dump(doc, Dumper=controller.InventoryDumper, sort_keys=False))
    (root / "cloud-init").mkdir(exist_ok=True)
    (root / "cloud-init" / "vendor.yaml").write_text(vendor)
    return load_site(root / "inventory", lab.site.images_path)


def plan_of(lab: LabHandle, site: Site) -> dep.VmPlan:
    [p] = dep.plan_deploy(lab.settings, site, ["jump01"]).vms
    return p


def deploy(lab: LabHandle, site: Site) -> dep.DeployReport:
    return dep.deploy_vms(lab.settings, site, ["jump01"], timeout=120, progress=False)


def snippet_file(lab: LabHandle, site: Site) -> Path:
    vendor = site.vms["jump01"].cloudinit.vendor
    assert vendor is not None
    return Path(lab.hv(MGMT).storage.snippets_dir) / vendor.snippet_name


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "site"


def test_a_vm_with_every_option_lands_and_a_second_plan_shows_no_drift(lab: LabHandle, root: Path) -> None:
    site = options_site(lab, root)
    vm = site.vms["jump01"]
    report = deploy(lab, site)
    assert report.ok, errors(report)
    cfg = api_config(lab, MGMT, vm.vmid)
    assert cfg["cpu"] == "x86-64-v2-AES"
    scsi1 = pvecodec.parse_props(cfg["scsi1"], "file")
    assert (scsi1["size"], scsi1["discard"], scsi1["iothread"], scsi1["ssd"]) == ("2G", "on", "1", "1")
    assert cfg["virtio1"].startswith("local:") and pvecodec.parse_props(cfg["virtio1"], "file")["size"] == "1G"
    assert cfg["ipconfig0"] == "ip=192.168.10.30/24,gw=192.168.10.1,ip6=2001:db8:10::30/64,gw6=2001:db8:10::1"
    assert cfg["cicustom"] == f"vendor=local:snippets/{snippet_file(lab, site).name}"
    assert snippet_file(lab, site).read_text() == VENDOR, "uploaded by SSH into the host's snippets storage"

    again = plan_of(lab, site)
    assert (again.action, again.diffs) == ("in-sync", []), [str(d) for d in again.diffs]
    assert [r.state for r in deploy(lab, site).results] == ["unchanged"]


def test_a_changed_snippet_and_a_larger_disk_are_drift_deploy_corrects(lab: LabHandle, root: Path) -> None:
    first = options_site(lab, root)
    assert deploy(lab, first).ok
    old = snippet_file(lab, first)
    changed = options_site(lab, root, {"disks": [{**OPTIONS["disks"][0], "size_gb": 3}, OPTIONS["disks"][1]]},
                           vendor=VENDOR + "runcmd:\n  - [\"true\"]\n")
    drift = plan_of(lab, changed)
    assert drift.action == "drift" and not drift.blocked
    assert {(d.field, d.safe) for d in drift.diffs} == {("cicustom", True), ("scsi1.size", True)}
    report = deploy(lab, changed)
    assert report.ok and [r.state for r in report.results] == ["corrected"], errors(report)
    cfg = api_config(lab, MGMT, changed.vms["jump01"].vmid)
    assert pvecodec.parse_props(cfg["scsi1"], "file")["size"] == "3G"
    assert snippet_file(lab, changed).read_text().endswith("runcmd:\n  - [\"true\"]\n")
    assert old.read_text() == VENDOR, "the previous snippet is kept (another VM may still name it)"
    assert plan_of(lab, changed).action == "in-sync"

    # a disk the inventory no longer lists: reported, never removed; a smaller size: never shrunk
    fewer = options_site(lab, root, {"disks": [{**OPTIONS["disks"][0], "size_gb": 2}]},
                         vendor=VENDOR + "runcmd:\n  - [\"true\"]\n")
    kept = plan_of(lab, fewer)
    assert kept.blocked and {(d.field, d.safe) for d in kept.diffs} == {("virtio1", False), ("scsi1.size", False)}
    deploy(lab, fewer)
    cfg = api_config(lab, MGMT, fewer.vms["jump01"].vmid)
    assert "virtio1" in cfg and pvecodec.parse_props(cfg["scsi1"], "file")["size"] == "3G"


def test_the_lab_checks_cpu_and_cicustom_as_pve_does(lab: LabHandle, root: Path) -> None:
    site = options_site(lab, root)
    vm = site.vms["jump01"]
    assert deploy(lab, site).ok
    client = PveClient(lab.hv(MGMT))
    with pytest.raises(RemoteError, match="Built-in cputype 'x86-64-v2-aes' is not defined"):
        client.set_vm_config(vm.vmid, cpu="x86-64-v2-aes")
    with pytest.raises(RemoteError, match="invalid key in comma-separated list property: vendr"):
        client.set_vm_config(vm.vmid, cicustom="vendr=local:snippets/x.yaml")
    # a snippet that is not there: PVE writes the cloud-init drive at start, and the start fails
    client.set_vm_config(vm.vmid, cicustom="vendor=local:snippets/missing.yaml")
    client.run_task("POST", f"/nodes/{client.node}/qemu/{vm.vmid}/status/stop", timeout=60)
    with pytest.raises(RemoteError, match="can't find file 'local:snippets/missing.yaml'"):
        client.run_task("POST", f"/nodes/{client.node}/qemu/{vm.vmid}/status/start", timeout=60)


def test_each_option_needs_its_privilege(lab: LabHandle, root: Path) -> None:
    """qemu-server's check_vm_modify_config_perm: cpu needs VM.Config.CPU, a new disk VM.Config.Disk (and
    Datastore.AllocateSpace on its storage), cicustom and ipconfigN VM.Config.Cloudinit or VM.Config.Network."""
    site = options_site(lab, root)
    vm = site.vms["jump01"]
    assert deploy(lab, site).ok
    client = PveClient(lab.hv(MGMT))
    control = lab.control(MGMT)
    for privs, change, missing in (
            (["VM.Config.CPU"], {"cpu": "host"}, "VM.Config.CPU"),
            (["VM.Config.Disk"], {"scsi2": "local:1"}, "VM.Config.Disk"),
            (["VM.Config.Cloudinit", "VM.Config.Network"], {"cicustom": "vendor=local:snippets/x.yaml"},
             "VM.Config.Cloudinit")):
        control.revoke(path="/vms", privs=privs)
        with pytest.raises(RemoteError, match=missing):
            client.set_vm_config(vm.vmid, **change)
        control.grant(path="/vms", privs=privs)
    control.revoke(path="/storage/local", privs=["Datastore.AllocateSpace"])
    with pytest.raises(RemoteError, match="Datastore.AllocateSpace"):
        client.set_vm_config(vm.vmid, scsi2="local:1")
