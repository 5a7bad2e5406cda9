"""One inventory entry for a whole PVE cluster (pve.nodes): each node a hypervisor ``<entry>/<node>`` with its own
SSH, everything else the cluster's; VMs name the cluster (placed over its nodes) or one node; mistakes named."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from image_factory.errors import ValidationFailed
from image_factory.site.inventory import load_site

from .site_cases import example_inventory, group, only, problems_of, site_files

pytestmark = pytest.mark.unit
KEYS = {
    "pve-c1": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBIKjPbOcAwqThWzRa5Ex/b92J/o3wlQ7KdlVFOwg5BD",
    "pve-c2": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx6Nk0cvDPGXWyCCm2/m5o4zK1dbVDOsJ5cQ2zYI1Dk",
    "pve-c3": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM0Ab6l0oDqk3qMJ9oZy/9p2mQOCGbvpp8f4uHcCFXEN",
}
MEMBERS = ["pve-cluster/pve-c1", "pve-cluster/pve-c2", "pve-cluster/pve-c3"]


def with_cluster(placement: str | None = "spread", **changes: Any) -> dict[str, Any]:
    """The example site with its tenant host replaced by a three-node cluster entry."""
    inv = example_inventory()
    hosts = group(inv, "hypervisors")
    pve = copy.deepcopy(hosts.pop("pve-tenant")["pve"])
    for key in ("node", "ssh", "install"):
        pve.pop(key, None)
    pve.update(api_url="https://pve-c1.deevnet.lan:8006", tls_ca_file="pve-root-ca.pem",
               api_urls=["https://pve-c2.deevnet.lan:8006", "https://pve-c3.deevnet.lan:8006"],
               nodes={n: {"ssh": {"host": f"{n}.deevnet.lan", "host_key": k}} for n, k in KEYS.items()})
    pve.pop("tls_fingerprint", None)
    pve.update(changes)
    hosts["pve-cluster"] = {"pve": pve}
    for body in group(inv, "tenant").values():
        body["vm"].pop("hypervisor", None)
    if placement is not None:
        inv["all"]["children"]["tenant"]["vars"]["placement"] = placement
    return inv


def test_a_cluster_entry_is_one_hypervisor_per_node_sharing_the_rest(tmp_path: Path) -> None:
    site = load_site(*site_files(tmp_path, with_cluster()))
    assert list(site.clusters) == ["pve-cluster"] and [h.name for h in site.clusters["pve-cluster"]] == MEMBERS
    c2 = site.hypervisors["pve-cluster/pve-c2"]
    assert (c2.node, c2.ssh.host, c2.ssh.host_key, c2.cluster) == ("pve-c2", "pve-c2.deevnet.lan", KEYS["pve-c2"],
                                                                   "pve-cluster")
    assert c2.api_url == "https://pve-c1.deevnet.lan:8006" and len(c2.api_urls) == 2
    assert c2.template_vmids == site.hypervisors[MEMBERS[0]].template_vmids  # allocated cluster-wide: no overlap
    assert [h.name for h in site.candidates(site.vms["sandbox01"])] == MEMBERS
    assert [h.name for h in site.select_hypervisors(["pve-cluster"])] == MEMBERS
    assert [h.name for h in site.select_hypervisors(["pve-cluster/pve-c3", "pve-mgmt"])] == [MEMBERS[2], "pve-mgmt"]
    shown = site.summary()["hypervisors"]  # inventory.check --json
    assert shown["pve-cluster/pve-c2"]["cluster"] == "pve-cluster" and "cluster" not in shown["pve-mgmt"]


def test_a_vm_names_the_cluster_or_one_of_its_nodes(tmp_path: Path) -> None:
    inv = with_cluster(placement=None)
    group(inv, "tenant")["sandbox01"]["vm"]["hypervisor"] = "pve-cluster/pve-c2"
    group(inv, "tenant")["iot-api01"]["vm"]["hypervisor"] = "pve-cluster"
    p = only(problems_of(tmp_path, inv), "iot-api01", "vm.hypervisor")
    assert "cluster pve-cluster has 3 nodes and the tenant plane's placement is pinned: name one node" in p.message
    inv["all"]["children"]["tenant"]["vars"]["placement"] = "fill"
    site = load_site(*site_files(tmp_path, inv))
    assert site.hypervisor_for(site.vms["sandbox01"]).name == "pve-cluster/pve-c2"
    assert [h.name for h in site.candidates(site.vms["iot-api01"])] == MEMBERS


@pytest.mark.parametrize(("change", "key", "fragment"), [
    ({"node": "pve-c1"}, "pve.node", "a cluster entry names its nodes as the keys of pve.nodes"),
    ({"ssh": {"host": "x.lan", "host_key": KEYS["pve-c1"]}}, "pve.ssh", "pve.nodes.<node>.ssh"),
    ({"nodes": {}}, "pve.nodes", "at least 1 item"),
    ({"nodes": {"pve_c1": {"ssh": {"host": "x.lan", "host_key": KEYS["pve-c1"]}}}}, "pve.nodes.pve_c1.[key]",
     "PVE node name"),
    ({"nodes": {"pve-c1": {"ssh": {"host": "x.lan", "host_key": "nope"}}}}, "pve.nodes.pve-c1.ssh.host_key",
     "SSH public host key"),
    ({"nodes": {"pve-c1": {}}}, "pve.nodes.pve-c1.ssh", "required key is missing"),
    ({"tls_ca_file": None, "tls_fingerprint": "AB:" * 31 + "AB"}, "pve", "api_urls needs tls_ca_file"),
    ({"cluster": True}, "pve.cluster", "lists its nodes under pve.nodes"),
])
def test_a_cluster_entry_mistake_names_its_key(tmp_path: Path, change: dict[str, Any], key: str,
                                               fragment: str) -> None:
    p = only(problems_of(tmp_path, with_cluster(**change)), "pve-cluster", key)
    assert fragment in p.message


def test_an_unknown_cluster_or_node_is_named_with_what_there_is(tmp_path: Path) -> None:
    inv = with_cluster()
    group(inv, "tenant")["sandbox01"]["vm"]["hypervisor"] = "pve-cluster/pve-c9"
    p = only(problems_of(tmp_path, inv), "sandbox01", "vm.hypervisor")
    assert "no hypervisor or cluster named 'pve-cluster/pve-c9' (have: pve-mgmt, pve-cluster;" in p.message
    site = load_site(*site_files(tmp_path, with_cluster()))
    with pytest.raises(ValidationFailed, match="no such hypervisor"):
        site.select_hypervisors(["pve-c1"])


def test_a_node_also_listed_as_an_entry_of_its_own_is_refused(tmp_path: Path) -> None:
    inv = with_cluster()
    pve = copy.deepcopy(group(inv, "hypervisors")["pve-mgmt"]["pve"])
    pve.pop("install", None)
    pve.update(node="pve-c2", role="tenant", api_url="https://pve-c2.deevnet.lan:8006",
               template_vmids={"first": 9800, "last": 9899})
    group(inv, "hypervisors")["pve-c2"] = {"pve": pve}
    p = only(problems_of(tmp_path, inv), "pve-cluster/pve-c2, pve-c2", "pve.node")
    assert "both are node pve-c2" in p.message


def test_a_node_with_storage_of_its_own_replaces_the_entrys_mapping(tmp_path: Path) -> None:
    inv = with_cluster()
    nodes = group(inv, "hypervisors")["pve-cluster"]["pve"]["nodes"]
    nodes["pve-c3"]["storage"] = {"images": "local", "import_dir": "/srv/import"}
    site = load_site(*site_files(tmp_path, inv))
    c1, c3 = site.hypervisors[MEMBERS[0]], site.hypervisors[MEMBERS[2]]
    assert (c3.storage.images, c3.storage.import_dir, c3.storage.cloudinit) == ("local", "/srv/import", "local-lvm")
    assert c1.storage.import_dir == "/var/lib/vz/import"
    nodes["pve-c3"]["storage"] = {"import_dir": "not absolute"}
    assert only(problems_of(tmp_path, inv), "pve-cluster", "pve.nodes.pve-c3.storage.import_dir")
