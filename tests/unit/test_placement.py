"""Several hypervisors per plane: the inventory's placement rules and deploy's pure place_vms (table cases)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from image_factory import deploy as dep
from image_factory.errors import ValidationFailed
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import Hypervisor, Vm, load_site

from .site_cases import example_inventory, group, only, problems_of, site_files

pytestmark = pytest.mark.unit

GIB = 1024 ** 3


def two_tenant_hosts(placement: str | None = None) -> dict[str, Any]:
    """The example site with a second tenant host, pve-tenant2, on its own SSH host key and the same VMID range."""
    inv = example_inventory()
    hosts = group(inv, "hypervisors")
    second = copy.deepcopy(hosts["pve-tenant"])
    second["pve"]["node"] = "pve-tenant2"
    second["pve"]["api_url"] = "https://pve-tenant2.deevnet.lan:8006"
    second["pve"]["ssh"]["host"] = "pve-tenant2.deevnet.lan"
    second["pve"].pop("install", None)
    hosts["pve-tenant2"] = second
    if placement is not None:
        inv["all"]["children"]["tenant"]["vars"]["placement"] = placement
    return inv


# ------------------------------------------------------------------------ the inventory


def test_two_host_inventory_unchanged_is_pinned_and_fixed() -> None:
    site = load_site(REPO_ROOT / "ansible/inventory", REPO_ROOT / "packer/images.yml")
    assert site.policy("tenant") == site.policy("mgmt") == "pinned"
    assert all(not site.placed_by_policy(vm) for vm in site.vms.values())
    assert site.hypervisor_for(site.vms["sandbox01"]).name == "pve-tenant"


def test_pinned_plane_with_two_hosts_needs_each_vm_to_name_one(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, two_tenant_hosts())
    p = only(problems, "sandbox01", "vm.hypervisor")
    assert "2 hypervisors for VMID 2201 (pve-tenant, pve-tenant2) and placement pinned" in p.message
    assert {q.entry for q in problems} == {"iot-api01", "sandbox01"}


def test_named_hypervisor_or_vmid_range_fixes_the_host(tmp_path: Path) -> None:
    inv = two_tenant_hosts()
    group(inv, "tenant")["sandbox01"]["vm"]["hypervisor"] = "pve-tenant2"
    group(inv, "hypervisors")["pve-tenant2"]["pve"]["vm_vmids"] = {"first": 2200, "last": 2299}
    group(inv, "hypervisors")["pve-tenant"]["pve"]["vm_vmids"] = {"first": 2000, "last": 2199}
    site = load_site(*site_files(tmp_path, inv))
    assert site.hypervisor_for(site.vms["sandbox01"]).name == "pve-tenant2"
    assert site.hypervisor_for(site.vms["iot-api01"]).name == "pve-tenant"  # 2101: only pve-tenant's range


def test_spread_plane_places_at_deploy(tmp_path: Path) -> None:
    site = load_site(*site_files(tmp_path, two_tenant_hosts("spread")))
    vm = site.vms["sandbox01"]
    assert [h.name for h in site.candidates(vm)] == ["pve-tenant", "pve-tenant2"]
    assert site.placed_by_policy(vm) and site.summary()["placement"]["tenant"] == "spread"
    assert [v.name for v in site.vms_on("pve-tenant2")] == ["iot-api01", "sandbox01"]
    with pytest.raises(ValidationFailed, match="placed by the tenant plane's policy spread"):
        site.hypervisor_for(vm)


@pytest.mark.parametrize(("value", "fragment"), [("random", "'random' is not one of pinned, spread, fill"),
                                                 (3, "3 is not one of")])
def test_unknown_placement_names_the_group(tmp_path: Path, value: Any, fragment: str) -> None:
    p = only(problems_of(tmp_path, two_tenant_hosts(value)), "group tenant", "vars.placement")
    assert fragment in p.message


def test_vmid_outside_every_plane_host_is_refused(tmp_path: Path) -> None:
    inv = two_tenant_hosts("fill")
    group(inv, "tenant")["sandbox01"]["vm"]["vmid"] = 3500
    p = only(problems_of(tmp_path, inv), "sandbox01", "vm.vmid")
    assert "3500 is outside the vm_vmids of every tenant hypervisor (pve-tenant 2000-2999, pve-tenant2 " in p.message


def test_macs_stay_unique_across_hosts(tmp_path: Path) -> None:
    inv = two_tenant_hosts("spread")
    tenant = group(inv, "tenant")
    tenant["sandbox01"]["vm"]["nics"][0]["mac"] = tenant["iot-api01"]["vm"]["nics"][0]["mac"]
    assert "is used more than once" in only(problems_of(tmp_path, inv), "iot-api01", "vm.nics.mac").message


# ------------------------------------------------------------------------ place_vms: the pure placement


@pytest.fixture(scope="module")
def hosts() -> list[Hypervisor]:
    base = load_site(REPO_ROOT / "ansible/inventory", REPO_ROOT / "packer/images.yml").hypervisors["pve-tenant"]
    return [base.model_copy(update={"name": n, "node": n}) for n in ("t1", "t2", "t3")]


@pytest.fixture(scope="module")
def vms() -> list[Vm]:
    base = load_site(REPO_ROOT / "ansible/inventory", REPO_ROOT / "packer/images.yml").vms["sandbox01"]
    return [base.model_copy(update={"name": f"vm{i}", "vmid": 2500 + i, "memory": 2048}) for i in range(3)]


def state(guests: int = 0, total_gib: int = 32, committed_gib: float = 0, present: tuple[int, ...] = ()
          ) -> dep.HostState:
    seen = {vmid: dep.Observed({"vmid": vmid, "status": "running"}) for vmid in present}
    return dep.HostState({}, seen, {}, dep.HostLoad(guests, total_gib * GIB, int(committed_gib * GIB)))


PLACE_CASES: dict[str, tuple[str, int, dict[str, dep.HostState], dict[str, str], list[str | None], list[str]]] = {
    # name: (policy, VMs, host states, unreadable hosts, hosts expected per VM, fragment of each "how")
    "spread: fewest guests": ("spread", 1, {"t1": state(3), "t2": state(1), "t3": state(2)}, {}, ["t2"],
                              ["spread: fewest guests (t2 1; t1 3, t3 2)"]),
    "spread: a tie goes to inventory order": ("spread", 1, {"t1": state(1), "t2": state(1), "t3": state(1)}, {},
                                              ["t1"], ["t1 1"]),
    "spread: earlier VMs of the plan count": ("spread", 3, {"t1": state(0), "t2": state(0), "t3": state(1)}, {},
                                              ["t1", "t2", "t1"], ["t1 0", "t2 0", "t1 1"]),
    "fill: first host with room": ("fill", 1, {"t1": state(9, 4, 3), "t2": state(1, 8), "t3": state()}, {}, ["t2"],
                                   ["fill: first host with room (8192 MiB unallocated)"]),
    "fill: the plan's VMs use the room": ("fill", 3, {"t1": state(0, 4, 0), "t2": state(0, 4), "t3": state()}, {},
                                          ["t1", "t1", "t2"], ["4096 MiB", "2048 MiB", "4096 MiB"]),
    "fill: no room anywhere": ("fill", 1, {"t1": state(1, 2, 1), "t2": state(1, 1), "t3": state(0, 2, 3)}, {},
                               [None],
                               ["no tenant host has 2048 MiB unallocated (t1 1024 MiB, t2 1024 MiB, t3 0 MiB)"]),
    "an existing VM stays where it is": ("spread", 1, {"t1": state(0), "t2": state(5, present=(2500,)),
                                                       "t3": state(0)}, {}, ["t2"], ["already on t2"]),
    "its VMID on two hosts": ("spread", 1, {"t1": state(0, present=(2500,)), "t2": state(0, present=(2500,)),
                                            "t3": state(0)}, {}, [None], ["VMID 2500 exists on t1 and t2"]),
    "an unreadable host may hold it": ("spread", 1, {"t1": state(0), "t3": state(0)}, {"t2": "timed out"}, [None],
                                       ["t2 could not be read (timed out) and may hold it"]),
    "found on a readable host despite one unreadable": ("fill", 1, {"t1": state(0), "t3": state(0, present=(2500,))},
                                                        {"t2": "timed out"}, ["t3"], ["already on t3"]),
    "pinned cannot choose": ("pinned", 1, {"t1": state(), "t2": state(), "t3": state()}, {}, [None],
                             ["placement pinned but 3 hosts fit"]),
}


@pytest.mark.parametrize("case", PLACE_CASES)
def test_place_vms(hosts: list[Hypervisor], vms: list[Vm], case: str) -> None:
    policy, count, states, failures, expected, fragments = PLACE_CASES[case]
    chosen = vms[:count]
    placed = dep.place_vms(chosen, {vm.name: hosts for vm in chosen}, {"tenant": policy},  # type: ignore[dict-item]
                           states, failures)
    assert [placed[vm.name].host for vm in chosen] == expected, placed
    for vm, fragment in zip(chosen, fragments, strict=True):
        assert fragment in placed[vm.name].how, placed[vm.name]


def test_one_candidate_needs_no_reading(hosts: list[Hypervisor], vms: list[Vm]) -> None:
    named = vms[0].model_copy(update={"hypervisor": "t3"})
    placed = dep.place_vms([named], {named.name: hosts[2:]}, {"tenant": "spread"}, {}, {"t1": "down"})
    assert placed[named.name] == dep.Placed("t3", "")


# ------------------------------------------------------------------------ nodes of one cluster as entries


def cluster_nodes(tmp_path: Path, second_range: dict[str, int], *, node: str = "pve-tenant2") -> list[Any]:
    """pve-tenant and pve-tenant2 as two nodes of one cluster: each lists the other's API as a fallback."""
    inv = two_tenant_hosts("spread")
    hosts = group(inv, "hypervisors")
    ca = tmp_path / "pve-root-ca.pem"
    ca.write_text("not read by the model\n")
    for me, other in (("pve-tenant", "pve-tenant2"), ("pve-tenant2", "pve-tenant")):
        pve = hosts[me]["pve"]
        pve.pop("tls_fingerprint")
        pve["tls_ca_file"] = str(ca)
        pve["api_urls"] = [f"https://{other}.deevnet.lan:8006"]
    hosts["pve-tenant2"]["pve"]["template_vmids"] = second_range
    hosts["pve-tenant2"]["pve"]["node"] = node
    try:
        load_site(*site_files(tmp_path, inv))
    except ValidationFailed as exc:
        return list(exc.problems)
    return []


def test_nodes_of_one_cluster_need_template_ranges_of_their_own(tmp_path: Path) -> None:
    p = only(cluster_nodes(tmp_path, {"first": 9050, "last": 9149}), "pve-tenant, pve-tenant2", "pve.template_vmids")
    assert "9000-9099 and 9050-9149 overlap: nodes of one cluster" in p.message
    assert cluster_nodes(tmp_path, {"first": 9100, "last": 9199}) == []


def test_a_cluster_node_is_one_entry(tmp_path: Path) -> None:
    p = only(cluster_nodes(tmp_path, {"first": 9100, "last": 9199}, node="pve-tenant"), "pve-tenant, pve-tenant2",
             "pve.node")
    assert "both are node pve-tenant of the cluster" in p.message
