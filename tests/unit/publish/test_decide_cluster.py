"""publish.decide.cluster_targets: where a cluster entry's publish happens, from what the cluster says of itself
(its nodes online or not, its images storage shared or not): a table, no I/O."""

from __future__ import annotations

import pytest

from image_factory.publish.decide import cluster_targets
from image_factory.site.inventory import Hypervisor, load_site

from ..site_cases import site_files
from ..test_site_cluster import with_cluster

pytestmark = pytest.mark.unit
C1, C2, C3 = "pve-cluster/pve-c1", "pve-cluster/pve-c2", "pve-cluster/pve-c3"
ALL_UP = {"pve-c1": True, "pve-c2": True, "pve-c3": True}

# (case, selected nodes, online, shared) -> [(report line, acting hypervisor or None, shared nodes, refusal part)]
TARGET_CASES = [
    ("shared: once, through the first node", [C1, C2, C3], ALL_UP, True,
     [("pve-cluster", C1, ("pve-c1", "pve-c2", "pve-c3"), "")]),
    ("shared, first node offline: through the next", [C1, C2, C3], {**ALL_UP, "pve-c1": False}, True,
     [("pve-cluster", C2, ("pve-c2", "pve-c3"), "")]),
    ("shared, one node selected: through it", [C3], ALL_UP, True,
     [("pve-cluster", C3, ("pve-c1", "pve-c2", "pve-c3"), "")]),
    ("shared, every node offline", [C1, C2, C3], dict.fromkeys(ALL_UP, False), True,
     [("pve-cluster", None, (), "no node of the cluster is online (pve-c1, pve-c2, pve-c3 offline)")]),
    ("local: once per node", [C1, C2, C3], ALL_UP, False,
     [(C1, C1, (), ""), (C2, C2, (), ""), (C3, C3, (), "")]),
    ("local, a node offline: reported for it alone", [C1, C2, C3], {**ALL_UP, "pve-c2": False}, False,
     [(C1, C1, (), ""), (C2, None, (), "node pve-c2 is offline"), (C3, C3, (), "")]),
    ("a node the cluster does not have", [C1, C2, C3], {"pve-c1": True, "pve-c2": True}, False,
     [(C3, None, (), "node pve-c3 is not a node of the cluster (its nodes: pve-c1, pve-c2)"), (C1, C1, (), ""),
      (C2, C2, (), "")]),
]


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Hypervisor]:
    site = load_site(*site_files(tmp_path_factory.mktemp("site"), with_cluster()))
    return {h.name: h for h in site.clusters["pve-cluster"]}


@pytest.mark.parametrize(("case", "selected", "online", "shared", "expected"), TARGET_CASES,
                         ids=[c[0] for c in TARGET_CASES])
def test_cluster_targets(members: dict[str, Hypervisor], case: str, selected: list[str], online: dict[str, bool],
                         shared: bool, expected: list[tuple[str, str | None, tuple[str, ...], str]]) -> None:
    targets = cluster_targets("pve-cluster", [members[n] for n in selected], online, shared)
    assert [(t.label, t.hv.name if t.hv else None, t.shared_nodes) for t in targets] == [e[:3] for e in expected]
    for target, (*_, refusal) in zip(targets, expected, strict=True):
        assert refusal in target.refusal and bool(refusal) == bool(target.refusal)


def test_a_shared_publish_with_a_node_offline_says_its_templates_are_not_seen(members: dict[str, Hypervisor]) -> None:
    [target] = cluster_targets("pve-cluster", list(members.values()), {**ALL_UP, "pve-c3": False}, True)
    assert target.notes and target.notes[0].startswith("offline now: pve-c3")
    assert target.unseen_nodes == ("pve-c3",)  # decide's retention waits for it
