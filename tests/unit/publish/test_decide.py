"""publish.decide: template discovery as decide sees it, VMID choice, retention, clones, and the table of
publish decisions (PUBLISH_CASES): a host's state in, a plan out, no I/O."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from image_factory.image.delta import Delta, PublishedBase
from image_factory.lab import factories
from image_factory.ownership import marker_block
from image_factory.publish.decide import HostState, clone_dependents, decide, free_vmid, select_prunes
from image_factory.publish.model import Artifact, HostFailed, PublishError
from image_factory.pve.templates import TemplateInfo, find_templates, newest_template
from image_factory.pve.upload import TRANSPORT_KINDS
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
        # the volume given as file= after other keys (PVE keeps a drive as it was written)
        1005: {"ide2": "none,media=cdrom", "scsi0": "size=20G,file=local-lvm:vm-1005-disk-0",
               "description": described(1005, 9000)},
        1006: {"scsi0": "size=20G,file=local:9000/base-9000-disk-0.qcow2/1006/vm-1006-disk-0.qcow2"},
    }
    thin = frozenset({"local-lvm"})
    assert clone_dependents(configs, 9000, thin) == [1001, 1005, 1006]  # 1002 is on dir storage: a full clone
    assert clone_dependents(configs, 9000) == [1006]  # without knowing local-lvm is thin only the base name shows


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




# ---------------------------------------------------------------------------- the table of publish decisions

SIZE = 1000
CONTENT_MANIFEST = {"recipe": "r1", "contents": {"packages_digest": "p1"}}


VARS_SHA = "e" * 64
OWN_STORE = {"firmware": "uefi", "secure_boot": True, "secure_boot_keys": "microsoft-2023", "machine": "q35",
             "efi_vars": "efivars.raw", "efi_vars_sha256": VARS_SHA}
BASE_SHA = "3" * 64  # the artifact of build b3, the one a delta is made against


def _artifact(site: Any, *, content: bool = False, tested: bool = True, own_store: bool = False,
              delta: int | None = None) -> Artifact:
    m = factories.manifest(build_id="b9", sha256="9" * 64, tested=True, fingerprint="f" * 64,
                           **(CONTENT_MANIFEST if content else {}), **(OWN_STORE if own_store else {}))
    base = PublishedBase("b3", BASE_SHA, "g" * 64, 2 * SIZE, "qcow2", "base-b3.qcow2")
    made = None if delta is None else Delta(Path("delta-b3-b9.qcow2"), delta, "e" * 64, base, "h" * 64)
    return Artifact(manifest=m, image=site.image("debian-lab"), path=Path("debian-lab.qcow2"), size=SIZE,
                    tested=tested, forced=False, import_file="debian-lab-b9.qcow2", template_name="tpl-debian-lab-b9",
                    efi_vars=Path("efivars.raw") if own_store else None,
                    efi_vars_file="debian-lab-b9.efivars.raw" if own_store else "", delta=made)


def _tpl(vmid: int, build: str, published: str, **fields: Any) -> TemplateInfo:
    return factories.template(vmid, f"tpl-debian-lab-{build}", image="debian-lab", build_id=build,
                              published_at=published, **{"digest": f"d-{build}", **fields})


THIS = "<this build's>"  # a template's digest or content digest that _state makes the artifact's own


OLD = [_tpl(9002, "b3", "2026-03"), _tpl(9001, "b2", "2026-02"), _tpl(9000, "b1", "2026-01")]  # newest first
PARTIAL = ".debian-lab-b9.qcow2.partial"


@dataclass(frozen=True)
class Case:
    """A host's state (``state`` holds HostState's fields) and what the plan must say (a part of its to_dict)."""

    state: dict[str, Any]
    plan: dict[str, Any]
    keep: int = 3
    transport: str = "ssh"
    content: bool = False  # the artifact has a content digest (recipe + packages)
    own_store: bool = False  # keys: microsoft-2023, the build's EFI vars store goes with the disk
    delta: int | None = None  # the size of a delta against build b3 (None: no base kept, no delta made)
    no_delta: str = ""  # why the client could not make a delta


B3 = _tpl(9002, "b3", "2026-03", sha256=BASE_SHA)  # the delta's base, published; its import file debian-lab-b3.qcow2
ON_HOST = ("debian-lab-b3.qcow2",)


def _clone_of(base: int) -> dict[int, dict[str, Any]]:
    return {100: {"scsi0": f"local:{base}/base-{base}-disk-0.qcow2/100/vm-100-disk-0.qcow2"}}


PUBLISH_CASES: dict[str, Case] = {
    "none: an empty host gets an upload and the first id": Case(
        {}, {"action": "create", "upload": "upload", "vmid": 9000, "prune": [], "remove_stale": []}),
    "skip: a verified final file of this build is there": Case(
        {"sizes": {"debian-lab-b9.qcow2": SIZE}, "final_sha256": "9" * 64}, {"action": "create", "upload": "skip"}),
    "a final file of the right size but another sha256 is sent again": Case(
        {"sizes": {"debian-lab-b9.qcow2": SIZE}, "final_sha256": "0" * 64}, {"upload": "upload"}),
    "resume: this build's partial over SSH": Case(
        {"sizes": {PARTIAL: 400}, "import_listing": (PARTIAL,)},
        {"upload": "resume", "partial_bytes": 400, "remove_partials": []}),
    "the API transport cannot resume: its own partial is removed and sent anew": Case(
        {"sizes": {PARTIAL: 400}, "import_listing": (PARTIAL,)},
        {"upload": "upload", "remove_partials": [PARTIAL]}, transport="api"),
    "a partial larger than the artifact is not resumed": Case(
        {"sizes": {PARTIAL: SIZE + 1}, "import_listing": (PARTIAL,)}, {"upload": "upload", "partial_bytes": 0}),
    "stale partial: another build's partial of this image is removed, other files are not": Case(
        {"import_listing": (".debian-lab-b1.qcow2.partial", ".fedora-44-b1.qcow2.partial", "debian-lab-b1.qcow2")},
        {"remove_partials": [".debian-lab-b1.qcow2.partial"]}),
    "unchanged: a template of this digest is there (nothing sent, nothing made)": Case(
        {"templates": [_tpl(9004, "b9", "2026-04", digest=THIS)]}, {"action": "unchanged", "upload": "none",
                                                                  "vmid": 9004, "same_content_as": None}),
    "same content: the newest template holds what this build installed": Case(
        {"templates": [_tpl(9003, "b4", "2026-04", content=THIS)]},
        {"action": "unchanged", "upload": "none", "vmid": 9003, "same_content_as": "b4"}, content=True),
    "an untested template of the same content does not stand in for a tested build": Case(
        {"templates": [_tpl(9003, "b4", "2026-04", content=THIS, tested=False)]}, {"action": "create"}, content=True),
    "stale VM: a half-made factory VM is removed and its id reused": Case(
        {"templates": [_tpl(9000, "b8", "2026-04", is_template=False)], "used_vmids": frozenset({9000})},
        {"remove_stale": [9000], "left_to_running_tasks": [], "vmid": 9000}),
    "a running task: its half-made VM is left to it, its id not reused": Case(
        {"templates": [_tpl(9000, "b8", "2026-04", is_template=False)], "used_vmids": frozenset({9000}),
         "busy": frozenset({9000})},
        {"remove_stale": [], "left_to_running_tasks": [9000], "vmid": 9001}),
    "a half-made factory VM outside template_vmids is not the factory's to remove": Case(
        {"templates": [_tpl(500, "b8", "2026-04", is_template=False)], "used_vmids": frozenset({500})},
        {"remove_stale": [], "vmid": 9000}),
    "ids in use (VMs and containers) are skipped": Case(
        {"used_vmids": frozenset({9000, 9001, 9003})}, {"vmid": 9002}),
    "prune: keep 2 keeps this build and the newest other": Case(
        {"templates": OLD, "used_vmids": frozenset({9000, 9001, 9002})},
        {"vmid": 9003, "prune": [{"vmid": 9001, "name": "tpl-debian-lab-b2", "build_id": "b2"},
                                 {"vmid": 9000, "name": "tpl-debian-lab-b1", "build_id": "b1"}]}, keep=2),
    "keep 3 with three templates already there: the oldest goes": Case(
        {"templates": OLD}, {"prune": [{"vmid": 9000, "name": "tpl-debian-lab-b1", "build_id": "b1"}]}),
    "retention blocked by a clone: the template is kept and reported": Case(
        {"templates": OLD, "configs": _clone_of(9000)},
        {"prune": [{"vmid": 9001, "name": "tpl-debian-lab-b2", "build_id": "b2"}],
         "kept_for_linked_clones": {"9000": [100]}}, keep=2),
    "a cluster node offline (shared storage): retention waits, its VMs may be clones": Case(
        {"templates": OLD, "unseen_nodes": ("pve-c3",)},
        {"prune": [], "kept_for_linked_clones": {},
         "retention_waits": "retention waits for pve-c3 (offline: its VMs may be linked clones of 9000)"}),
    "an unchanged host still prunes beyond keep (the current template counts first)": Case(
        {"templates": [_tpl(9009, "b9", "2026-01", digest=THIS), *OLD]},
        {"action": "unchanged", "prune": [{"vmid": 9001, "name": "tpl-debian-lab-b2", "build_id": "b2"},
                                          {"vmid": 9000, "name": "tpl-debian-lab-b1", "build_id": "b1"}]}, keep=2),
    "a template PVE's vars make has no EFI vars store to send": Case({}, {"efi_vars_upload": "none"}),
    "own store: the build's EFI vars store is sent beside the disk": Case(
        {}, {"upload": "upload", "efi_vars_upload": "upload"}, own_store=True),
    "own store: the same store bytes already there are not sent again, whatever the disk needs": Case(
        {"efi_vars_sha256": VARS_SHA}, {"upload": "upload", "efi_vars_upload": "skip"}, own_store=True),
    "own store: other bytes under the store's name are replaced": Case(
        {"efi_vars_sha256": "0" * 64}, {"efi_vars_upload": "upload"}, own_store=True),
    "own store, unchanged: a template of this digest is there, nothing is sent": Case(
        {"templates": [_tpl(9004, "b9", "2026-04", digest=THIS)]},
        {"action": "unchanged", "upload": "none", "efi_vars_upload": "none"}, own_store=True),
    "delta: the host holds the base's import file, and the delta is 7% of the image": Case(
        {"templates": [B3], "import_listing": ON_HOST},
        {"action": "create", "upload": "delta", "delta_base": "debian-lab-b3.qcow2", "delta_bytes": 70}, delta=70),
    "delta on an older template of the base build (a newer one is another build)": Case(
        {"templates": [_tpl(9003, "b4", "2026-04"), B3], "import_listing": ON_HOST},
        {"upload": "delta", "delta_base": "debian-lab-b3.qcow2"}, delta=70),
    "no delta: the base's import file is gone from the host": Case(
        {"templates": [B3]}, {"upload": "upload", "delta_base": None, "delta_bytes": 0,
                              "no_delta": "the host holds no template of build b3 with its import file"}, delta=70),
    "no delta: the host missed the base's night (its templates are other builds)": Case(
        {"templates": OLD, "import_listing": ("debian-lab-b1.qcow2", "debian-lab-b3.qcow2")},
        {"upload": "upload", "delta_base": None}, delta=70),
    "no delta: a half-made VM of the base build is not known good": Case(
        {"templates": [dataclasses.replace(B3, is_template=False)], "import_listing": ON_HOST},
        {"upload": "upload", "delta_base": None}, delta=70),
    "no delta: it would save less than half the bytes": Case(
        {"templates": [B3], "import_listing": ON_HOST},
        {"upload": "upload", "no_delta": "a delta would be 50% of the image"}, delta=SIZE // 2 + 1),
    "no delta over the API transport (it cannot run the host's rebuild)": Case(
        {"templates": [B3], "import_listing": ON_HOST},
        {"upload": "upload", "no_delta": "the transport cannot rebuild a delta on the host"},
        transport="api", delta=70),
    "no delta made (no base kept): the full image": Case(
        {"templates": [B3], "import_listing": ON_HOST}, {"upload": "upload", "delta_base": None, "no_delta": None}),
    "no delta could be made: each host's plan says why": Case(
        {"templates": [B3], "import_listing": ON_HOST},
        {"upload": "upload", "no_delta": "no delta could be made (qemu-img rebase failed: No space left on device)"},
        no_delta="no delta could be made (qemu-img rebase failed: No space left on device)"),
    "own store with a delta: the disk goes as a delta, the EFI vars store beside it in full": Case(
        {"templates": [B3], "import_listing": ON_HOST}, {"upload": "delta", "efi_vars_upload": "upload"},
        own_store=True, delta=70),
    "a verified final file beats a delta (skip)": Case(
        {"templates": [B3], "import_listing": ON_HOST, "sizes": {"debian-lab-b9.qcow2": SIZE},
         "final_sha256": "9" * 64}, {"upload": "skip", "delta_base": None}, delta=70),
    "resume beats a delta": Case(
        {"templates": [B3], "import_listing": (*ON_HOST, PARTIAL), "sizes": {PARTIAL: 400}},
        {"upload": "resume", "delta_base": None}, delta=70),
    "what a delta publish that died left is removed (any build of this image), other images' are not": Case(
        {"import_listing": (".debian-lab-b8.qcow2.delta", "..debian-lab-b8.qcow2.delta.partial",
                            ".debian-lab-b9.qcow2.rebuild", ".debian-lab-b9.qcow2.guestview",
                            ".fedora-44-b1.qcow2.delta", "debian-lab-b8.qcow2")},
        {"remove_partials": ["..debian-lab-b8.qcow2.delta.partial", ".debian-lab-b8.qcow2.delta",
                             ".debian-lab-b9.qcow2.guestview", ".debian-lab-b9.qcow2.rebuild"]}),
}


def _state(site: Any, art: Artifact, fields: dict[str, Any]) -> HostState:
    templates = [dataclasses.replace(t, digest=art.manifest.digest if t.digest == THIS else t.digest,
                                     content=art.manifest.content_digest if t.content == THIS else t.content)
                 for t in fields.get("templates", [])]
    base: dict[str, Any] = {"sizes": {"debian-lab-b9.qcow2": None, PARTIAL: None}, "own_partial": PARTIAL}
    given = {k: v for k, v in fields.items() if k != "templates"}
    if "sizes" in given:
        given["sizes"] = {**base["sizes"], **given["sizes"]}
    return HostState(hv=site.hypervisors["pve-mgmt"], node="pve-x", templates=templates, **{**base, **given})


@pytest.mark.parametrize("name", list(PUBLISH_CASES))
def test_publish_decisions(site: Any, name: str) -> None:
    case = PUBLISH_CASES[name]
    art = dataclasses.replace(_artifact(site, content=case.content, own_store=case.own_store, delta=case.delta),
                              no_delta=case.no_delta)
    plan = decide(_state(site, art, case.state), art, case.keep, TRANSPORT_KINDS[case.transport]).to_dict()
    assert {k: plan[k] for k in case.plan} == case.plan


def test_no_free_id_fails_the_host_by_name(site: Any) -> None:
    art = _artifact(site)
    state = _state(site, art, {"used_vmids": frozenset(range(9000, 9100))})
    with pytest.raises(HostFailed, match="no free VMID in template_vmids 9000-9099") as failed:
        decide(state, art, 3, TRANSPORT_KINDS["ssh"])
    assert failed.value.host == "pve-mgmt" and not failed.value.reason.startswith("pve-mgmt")
