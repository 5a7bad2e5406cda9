"""deploy.decide on a cluster entry's node (table cases, no I/O): the cluster's template on another node is cloned
to the planned node (the plan says so), and a VM found on another node of the cluster is not created again."""

from __future__ import annotations

import pytest

from image_factory import deploy as dep
from image_factory.lab import factories
from image_factory.site.inventory import Site, load_site

from .site_cases import site_files
from .test_site_cluster import with_cluster

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
