"""deploy.decide on a cluster entry's node (table cases, no I/O): the cluster's template on another node is cloned
to the planned node (the plan says so), and a VM found on another node of the cluster is not created again."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from image_factory import deploy as dep
from image_factory.deploy.act import _cluster_guard
from image_factory.errors import RemoteError
from image_factory.handoffs import tofu
from image_factory.lab import factories
from image_factory.pve.sshlink import HostKeyMismatch
from image_factory.site.inventory import Site, load_site

from .site_cases import site_files
from .test_site_cluster import with_cluster
from .test_tofu import SCHEMA

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return load_site(*site_files(tmp_path_factory.mktemp("site"), with_cluster()))


# name: (template's node, VMID elsewhere in the cluster -> node, expected action, reason or note fragment)
CLUSTER_DECIDE_CASES = {
    "template on this node": ("pve-c2", {}, "create", ""),
    "the cluster's template on another node": ("pve-c1", {}, "create",
                                               "clones template 9000 of node pve-c1 to pve-c2 (shared storage"),
    "the VMID on another node": ("pve-c1", {2201: "pve-c3"}, "blocked",
                                 "VMID 2201 is on node pve-c3 of cluster pve-cluster, not on pve-c2 (moved?): name "
                                 "vm.hypervisor pve-cluster/pve-c3, or pve-cluster"),
    "another guest elsewhere is no matter": ("pve-c2", {2999: "pve-c3"}, "create", ""),
}


@pytest.mark.parametrize("case", CLUSTER_DECIDE_CASES)
def test_decide_on_a_cluster_node(site: Site, case: str) -> None:
    template_node, elsewhere, action, fragment = CLUSTER_DECIDE_CASES[case]
    vm, hv = site.vms["sandbox01"], site.hypervisors["pve-cluster/pve-c2"]
    template = factories.template(9000, "tpl-x", image=vm.image, node=template_node)
    state = dep.HostState({vm.image: [template]}, {}, {}, elsewhere=elsewhere)
    plan = dep.decide(vm, hv, state, {})
    assert (plan.action, plan.host, plan.node) == (action, "pve-cluster/pve-c2", "pve-c2"), plan.to_dict()
    said = plan.reason + " ".join(plan.notes)
    assert fragment in said and (bool(fragment) or not plan.notes), said


def test_a_tenant_export_clones_the_clusters_template_from_its_node(site: Site) -> None:
    """tenant.export hands Tofu what deploy does: the VM on its planned node, its clone from the template's node
    (the provider's clone.node_name, in the pinned provider's schema)."""
    vm, hv = site.vms["sandbox01"], site.hypervisors["pve-cluster/pve-c2"]
    for template_node, clone_node in (("pve-c1", {"node_name": "pve-c1"}), ("pve-c2", {})):
        template = factories.template(9000, "tpl-x", image=vm.image, node=template_node)
        plan = dep.decide(vm, hv, dep.HostState({vm.image: [template]}, {}, {}), {})
        base = factories.template_config(hv, site.image(vm.image))
        resource = tofu.vm_resource(vm, hv, plan, base)
        assert (resource["node_name"], resource["provider"]) == ("pve-c2", "proxmox.pve-cluster_pve-c2")
        assert resource["clone"] == {"vm_id": 9000, "full": vm.clone_mode == "full", **clone_node}
        clone_schema = SCHEMA["properties"]["resource"]["properties"]["proxmox_virtual_environment_vm"][
            "additionalProperties"]["properties"]["clone"]["anyOf"][0]
        jsonschema.validate(resource["clone"], clone_schema)


def test_the_cluster_lock_is_taken_through_the_first_node_that_answers(site: Site) -> None:
    nodes = site.clusters["pve-cluster"]
    tried: list[str] = []

    def take(node: Any) -> Any:
        tried.append(node.name)
        if node.node == "pve-c1":
            raise RemoteError(node.name, "SSH connection to pve-c1.deevnet.lan:22 failed: no route to host")
        return f"guard via {node.node}"

    assert _cluster_guard(nodes, take) == "guard via pve-c2" and tried == [nodes[0].name, nodes[1].name]
    with pytest.raises(RemoteError, match="cannot take the cluster lock through any node: .*no route to host"):
        _cluster_guard(nodes[:1], take)

    def mismatched(node: Any) -> Any:
        raise HostKeyMismatch(node.name, "SSH host key of pve-c1 does not match the key pinned in the inventory")

    with pytest.raises(HostKeyMismatch):  # never a reason to try another node
        _cluster_guard(nodes, mismatched)
