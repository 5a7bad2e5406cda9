"""publish.decide: template discovery as decide sees it, VMID choice, retention, clones, and the table of
publish decisions (PUBLISH_CASES): a host's state in, a plan out, no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from image_factory.ownership import marker_block
from image_factory.publish.decide import clone_dependents, free_vmid, select_prunes
from image_factory.publish.model import PublishError
from image_factory.pve.templates import TemplateInfo, find_templates, newest_template
from image_factory.site.inventory import Hypervisor

from ._support import FakeClient, manifest, tpl_config

pytestmark = pytest.mark.unit


def test_find_templates_newest_first_and_ignores_strangers() -> None:
    a, b, c = manifest("a", "a" * 64), manifest("b", "b" * 64), manifest("c", "c" * 64)
    configs = {
        9000: tpl_config(a, "2026-01-01T00:00:00Z"),
        9001: tpl_config(b, "2026-03-01T00:00:00Z", tested=False),
        9002: tpl_config(c, "2026-02-01T00:00:00Z"),
        9003: tpl_config(c, "2026-04-01T00:00:00Z", template=False),  # half-made
        9004: {"name": "human", "tags": "image-factory", "description": "hand made", "template": 1},
        1000: {"name": "vm", "scsi0": "local:9000/base-9000-disk-0.qcow2/1000/vm-1000-disk-0.qcow2"},
    }
    for vmid in (9000, 9001, 9002, 9003):
        configs[vmid]["scsi0"] = f"local:{vmid}/base-{vmid}-disk-0.qcow2,size=2G"
    client = FakeClient(configs)
    found = find_templates(client, "debian-lab")  # type: ignore[arg-type]
    assert [t.vmid for t in found] == [9001, 9002, 9000]
    assert not found[0].tested and found[1].tested
    assert newest_template(client, "debian-lab").vmid == 9002  # type: ignore[arg-type, union-attr]
    every = find_templates(client, "debian-lab", include_incomplete=True)  # type: ignore[arg-type]
    assert 9003 in [t.vmid for t in every] and not next(t for t in every if t.vmid == 9003).is_template
    assert find_templates(client, "fedora-44") == []  # type: ignore[arg-type]
    assert clone_dependents(configs, 9000) == [1000]
    assert clone_dependents(configs, 9002) == []


def test_clone_dependents_on_lvm_thin_come_from_the_factory_marker() -> None:
    """LVM-thin linked clones have plain vm-<id>-disk-<n> ids: the marker names the template instead."""
    def described(vmid: int, template_vmid: int) -> str:
        return marker_block(vm_name=f"vm{vmid}", vmid=vmid, template="tpl", template_vmid=template_vmid,
                            run_id="r1", incomplete=False)
    configs = {
        9000: {"scsi0": "local-lvm:base-9000-disk-0,size=2G"},
        1001: {"scsi0": "local-lvm:vm-1001-disk-0,size=20G", "description": described(1001, 9000)},
        1002: {"scsi0": "local:1002/vm-1002-disk-0.qcow2,size=20G", "description": described(1002, 9000)},
        1003: {"scsi0": "local-lvm:vm-1003-disk-0,size=20G", "description": described(1003, 9001)},
        1004: {"scsi0": "local-lvm:vm-1004-disk-0,size=20G",
               "description": described(1003, 9000)},  # a marker copied from another VMID does not count
    }
    thin = frozenset({"local-lvm"})
    assert clone_dependents(configs, 9000, thin) == [1001]  # 1002 is on dir storage: a full clone there
    assert clone_dependents(configs, 9000) == []  # without knowing local-lvm is thin nothing shows it


def test_free_vmid_is_lowest_unused_in_range(site: Any) -> None:
    hv: Hypervisor = site.hypervisors["pve-mgmt"]
    first = hv.template_vmids.first
    assert free_vmid(hv, set()) == first
    assert free_vmid(hv, {first, first + 1, first + 3}) == first + 2
    with pytest.raises(PublishError, match="no free VMID"):
        free_vmid(hv, set(range(hv.template_vmids.first, hv.template_vmids.last + 1)))


def _info(vmid: int, digest: str, published: str) -> TemplateInfo:
    return TemplateInfo(vmid, f"t{vmid}", "n", "img", "b", digest, "s", True, published, "f", "r", True, None, ())


def test_select_prunes_keeps_newest_and_current() -> None:
    ts = [_info(3, "d3", "3"), _info(2, "d2", "2"), _info(1, "d1", "1")]  # newest first
    assert [t.vmid for t in select_prunes(ts, "d3", 2)] == [1]
    assert [t.vmid for t in select_prunes(ts, "d3", 1)] == [2, 1]
    # re-publishing an older build: it stays, the slots left go to the newest others
    assert [t.vmid for t in select_prunes(ts, "d1", 2)] == [2]
    assert select_prunes(ts, "d3", 5) == []
    with pytest.raises(PublishError):
        select_prunes(ts, "d3", 0)


