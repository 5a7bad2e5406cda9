"""The version and firmware checks against an in-process fakepve."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from image_factory import preflight as pf
from image_factory.preflight.capability import check_cluster
from image_factory.pve.client import ApiError
from image_factory.pve.templates import ClusterFacts
from image_factory.site.inventory import load_site

from ..site_cases import site_files
from ..test_site_cluster import with_cluster
from .node import API_CHECKS, writes

pytestmark = pytest.mark.unit


def test_old_pve_version(node, env):
    node.version, node.release_version = "7.4-3", "7.4"
    report = pf.run_preflight(*env, checks=API_CHECKS)
    r = report.result("hv-unit", "version")
    assert not r.ok
    assert r.detail == "PVE 7.4-3 on pve1 is older than 8.4: `import` uploads need 8.4 or newer"
    assert "upgrade pve1" in r.hint
    # the other checks still ran: one failure does not hide the others
    assert report.result("hv-unit", "privileges").ok


def test_pve8_is_reported_as_end_of_life(node, env):
    r = pf.run_preflight(*env, checks=["version"]).result("hv-unit", "version")
    assert r.ok and "reached its end of life in August 2026" in r.detail and "pve8to9" in r.detail


def test_firmware_check_refuses_keys_the_hosts_pve_cannot_enrol_and_passes_on_9_2(node, env, tmp_path):
    settings, site = env
    images = Path(settings.images)
    images.write_text(images.read_text() + textwrap.indent(textwrap.dedent("""\
        tiny-sb:
          family: debian
          release: 12
          mode: cloud
          firmware: uefi
          secure_boot: true
          keys: microsoft-2011+2023
          tpm: true
          source: {url: fixtures/tiny.qcow2, checksum: none}
        """), "  "))
    site = load_site(Path(settings.inventory), images)
    report = pf.run_preflight(settings, site, checks=["firmware"])
    r = report.result("hv-unit", "firmware")
    assert not r.ok and r.detail.startswith("tiny-sb: keys: microsoft-2011+2023 needs Microsoft's 2023 UEFI CAs")
    assert "PVE 8.4.1 cannot do" in r.detail and "upgrade the host to PVE 9.1.19" in r.detail
    assert "change the entry's keys in the catalogue" in r.hint and writes(node) == []
    node.version, node.release_version = "9.2.5", "9.2"
    r = pf.run_preflight(settings, site, checks=["firmware"]).result("hv-unit", "firmware")
    assert r.ok and "tiny-sb (uefi,machine=q35,secure_boot=yes,keys=microsoft-2011+2023,tpm=v2.0)" in r.detail
    assert pf.run_preflight(settings, site, checks=["firmware"], images=["tiny"]).result("hv-unit", "firmware").ok



# (case, the cluster's view, shared) -> (ok, detail fragment)
CLUSTER_CHECK_CASES = [
    ("online, shared", {"pve-c1": True, "pve-c2": True}, True,
     (True, "node pve-c2 of pve-cluster, online (2/2 nodes); storage.images 'local-lvm' is shared: one template")),
    ("online, local", {"pve-c1": False, "pve-c2": True}, False, (True, "(1/2 nodes); storage.images 'local-lvm' "
                                                                     "is each node's own: one template per node")),
    ("offline", {"pve-c1": True, "pve-c2": False}, True, (False, "node pve-c2 is offline")),
    ("not a node of it", {"pve-c1": True}, True, (False, "node pve-c2 is not a node of the cluster (its nodes: "
                                                         "pve-c1)")),
]


@pytest.mark.parametrize(("case", "online", "shared", "expected"), CLUSTER_CHECK_CASES,
                         ids=[c[0] for c in CLUSTER_CHECK_CASES])
def test_check_cluster(tmp_path: Path, case: str, online: dict[str, bool], shared: bool,
                       expected: tuple[bool, str]) -> None:
    site = load_site(*site_files(tmp_path, with_cluster()))
    probe = SimpleNamespace(hv=site.hypervisors["pve-cluster/pve-c2"], cluster=ClusterFacts(online, shared, False))
    outcome = check_cluster(probe)  # type: ignore[arg-type]
    assert (outcome.ok, expected[1] in outcome.detail) == (expected[0], True), outcome


# A hypervisor entry of its own: /cluster/resources lists only its node, or its node's peers too, or cannot be read
OWN_ENTRY_CASES = [
    ("alone", {"pve-mgmt": True}, "a hypervisor of its own"),
    ("in a cluster", {"pve-mgmt": True, "pve-x2": False, "pve-x3": True},
     "a hypervisor of its own, but node pve-mgmt is in a cluster with pve-x2, pve-x3: its host lock keeps no run"),
    ("unreadable", ApiError("pve-mgmt", "GET /cluster/resources", 403, "Permission check failed"),
     "a hypervisor of its own"),
]


@pytest.mark.parametrize(("case", "nodes", "detail"), OWN_ENTRY_CASES, ids=[c[0] for c in OWN_ENTRY_CASES])
def test_check_cluster_on_an_entry_of_its_own_warns_when_its_node_has_peers(
        tmp_path: Path, case: str, nodes: dict[str, bool] | Exception, detail: str) -> None:
    site = load_site(*site_files(tmp_path, with_cluster()))

    class Probe:
        hv = site.hypervisors["pve-mgmt"]

        @property
        def cluster_nodes(self) -> dict[str, bool]:
            if isinstance(nodes, Exception):
                raise nodes
            return nodes

    outcome = check_cluster(Probe())  # type: ignore[arg-type]
    assert outcome.ok and outcome.detail.startswith(detail), outcome
    assert outcome.warning == (case == "in a cluster")
    assert ("pve.nodes" in outcome.hint) == outcome.warning
