"""publish: names, tags, description, template discovery, VMID choice, retention (no processes)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import pytest

from image_factory.image import manifest as mf
from image_factory.lab import factories
from image_factory.ownership import marker_block
from image_factory.publish import (
    DESCRIPTION_MAX,
    IMPORT_NAME_RE,
    PublishError,
    clone_dependents,
    dns_name,
    free_vmid,
    import_file_name,
    load_artifact,
    publish_image,
    sanitize_tag,
    select_prunes,
    template_description,
    template_name,
    template_tags,
)
from image_factory.pve.templates import FACTORY_TAG, TemplateInfo, find_templates, newest_template, parse_description
from image_factory.settings import REPO_ROOT, Settings
from image_factory.site.inventory import Hypervisor, load_site

pytestmark = pytest.mark.unit
TAG_RE = re.compile(r"^[a-z0-9_][a-z0-9_\-+.]*$")


def manifest(build_id: str = "20261125-1200-a1", sha: str = "ab" * 32, tested: bool = True) -> mf.Manifest:
    return factories.manifest(build_id=build_id, sha256=sha, tested=tested or None, fingerprint="f" * 64,
                              git={"commit": "abc"})


@pytest.fixture(scope="module")
def site() -> Any:
    return load_site(REPO_ROOT / "ansible/inventory", REPO_ROOT / "packer/images.yml")


def test_names_follow_pve_rules(site: Any) -> None:
    m = manifest(build_id="2026-11-25T12:00:00Z/A+B")
    name = import_file_name(m)
    assert IMPORT_NAME_RE.match(name) and name.endswith(".qcow2") and "/" not in name and ":" not in name
    tpl = template_name(site.image("debian-lab"), m)
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", tpl)
    assert tpl.startswith("tpl-debian-lab-2026-11-25t12-00-00z")
    assert dns_name("x" * 100 + "-") == "x" * 63
    with pytest.raises(PublishError):
        dns_name("---")


def test_tags_are_valid_sorted_and_mark_tested() -> None:
    tags = template_tags(manifest(build_id="B_1:x"), tested=True)
    assert tags == sorted(tags) and all(TAG_RE.match(t) for t in tags)
    assert {FACTORY_TAG, "debian-lab", "debian-12", "tested"} <= set(tags)
    assert "untested" in template_tags(manifest(), tested=False)
    assert sanitize_tag("-Weird Tag!") == "weird-tag"
    assert TAG_RE.match(sanitize_tag("+x"))


def test_description_round_trips_and_fits() -> None:
    m = manifest()
    text = template_description(m, import_file="f.qcow2", tested=False, forced=True, run_id="r1",
                                published_at="2026-11-25T12:00:00Z")
    meta = parse_description(text)
    assert meta is not None
    assert meta["digest"] == m.digest and meta["sha256"] == m.artifact.sha256
    assert meta["tested"].startswith("no") and "--force-untested" in meta["tested"]
    assert meta["publish_run"] == "r1" and meta["import_file"] == "f.qcow2"
    assert parse_description("some human note") is None
    assert m.image_test is not None
    big = dataclasses.replace(m, image_test=dataclasses.replace(m.image_test, suites=["s" * 100] * 200))
    long_text = template_description(big, import_file="f", tested=True, forced=False, run_id="r",
                                     published_at="t")
    assert len(long_text.encode()) <= DESCRIPTION_MAX


class FakeClient:
    """Answers list_vms/vm_config/get like PveClient from a dict of configs."""

    node = "pve-x"
    node_path = "/nodes/pve-x"

    def __init__(self, configs: dict[int, dict[str, Any]]):
        self.configs = configs

    def list_vms(self) -> list[dict[str, Any]]:
        out = []
        for vmid, cfg in self.configs.items():
            row: dict[str, Any] = {"vmid": vmid, "name": cfg.get("name", "")}
            if cfg.get("tags"):
                row["tags"] = cfg["tags"]
            if cfg.get("template"):
                row["template"] = 1
            out.append(row)
        return out

    def vm_config(self, vmid: int) -> dict[str, Any]:
        return dict(self.configs[vmid])

    def list_containers(self) -> list[dict[str, Any]]:
        return []

    def storages(self) -> list[dict[str, Any]]:
        return []


def tpl_config(m: mf.Manifest, published: str, *, template: bool = True, tested: bool = True) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": f"tpl-{m.build_id}",
        "tags": ";".join(template_tags(m, tested)),
        "description": template_description(m, import_file=import_file_name(m), tested=tested, forced=not tested,
                                            run_id="r", published_at=published),
        "scsi0": "local:9000/base-9000-disk-0.qcow2,size=2G",
    }
    if template:
        cfg["template"] = 1
    return cfg


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


def _write_build(builds: Path, m: mf.Manifest, data: bytes) -> Path:
    d = builds / m.image
    d.mkdir(parents=True)
    (d / m.artifact.path).write_bytes(data)
    mf.save(d, m)
    return d


def test_load_artifact_refuses_untested_tampered_and_missing(tmp_path: Path, site: Any) -> None:
    data = b"qcow2-ish bytes"
    sha = hashlib.sha256(data).hexdigest()
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "b")})
    with pytest.raises(mf.ManifestError, match="build the image first"):
        load_artifact(settings, site, "debian-lab", force_untested=False)
    _write_build(settings.builds_dir, manifest(sha=sha, tested=False), data)
    with pytest.raises(PublishError, match="no passing image test"):
        load_artifact(settings, site, "debian-lab", force_untested=False)
    art = load_artifact(settings, site, "debian-lab", force_untested=True)
    assert art.forced and not art.tested and art.size == len(data)

    settings2 = Settings.from_mapping({"builds_dir": str(tmp_path / "c")})
    # a test result for another sha256 does not count
    other = manifest(sha=sha)
    assert other.image_test is not None
    other.image_test.artifact_sha256 = "0" * 64
    _write_build(settings2.builds_dir, other, data)
    with pytest.raises(PublishError, match="no passing image test"):
        load_artifact(settings2, site, "debian-lab", force_untested=False)

    settings3 = Settings.from_mapping({"builds_dir": str(tmp_path / "d")})
    d = _write_build(settings3.builds_dir, manifest(sha=sha), data)
    assert load_artifact(settings3, site, "debian-lab", force_untested=False).tested
    (d / "debian-lab.qcow2").write_bytes(b"changed")
    with pytest.raises(PublishError, match="does not match the manifest"):
        load_artifact(settings3, site, "debian-lab", force_untested=False)


def test_publish_image_validates_before_contacting_hosts(tmp_path: Path, site: Any) -> None:
    settings = Settings.from_mapping({"builds_dir": str(tmp_path)})
    with pytest.raises(PublishError, match="unknown transport"):
        publish_image(settings, site, "debian-lab", transport="ftp", progress=False)
    with pytest.raises(PublishError, match="--keep"):
        publish_image(settings, site, "debian-lab", keep=0, progress=False)
    with pytest.raises(Exception, match="no such hypervisor"):
        publish_image(settings, site, "debian-lab", hypervisors=["nope"], progress=False)
    with pytest.raises(Exception, match="no such image"):
        publish_image(settings, site, "nope", progress=False)


def test_a_uefi_build_becomes_an_ovmf_template_and_a_bios_build_does_not(site: Any) -> None:
    from types import SimpleNamespace

    from image_factory.publish import _create_params

    hv = site.hypervisors["pve-mgmt"]
    art = SimpleNamespace(template_name="tpl-x", image=site.image("debian-lab"), import_file="x.qcow2",
                          manifest=dataclasses.replace(manifest(), firmware="uefi"))
    params = _create_params(hv, art, 9000, "d", ["image-factory"])  # type: ignore[arg-type]
    assert params["bios"] == "ovmf" and params["machine"] == "q35"
    assert params["efidisk0"] == f"{hv.storage.images}:1,efitype=4m,pre-enrolled-keys=0"
    art.manifest = manifest()  # written before firmware was recorded: BIOS
    assert not {"bios", "machine", "efidisk0"} & set(_create_params(hv, art, 9000, "d", []))  # type: ignore[arg-type]


SB_FIELDS = {"firmware": "uefi", "secure_boot": True, "secure_boot_keys": "microsoft-2011+2023", "tpm": True,
             "machine": "q35"}
# qemu-server 8.3.12 (PVE 8.4) Drive.pm:454-535: the keys its efidisk0 and tpmstate0 formats know (no ms-cert)
EFIDISK_KEYS_8_3 = {"file", "volume", "format", "size", "efitype", "pre-enrolled-keys", "import-from"}
TPMSTATE_KEYS_8_3 = {"file", "volume", "format", "size", "version", "import-from"}


def _sb_params(site: Any, **fields: Any) -> tuple[Hypervisor, dict[str, Any]]:
    from types import SimpleNamespace

    from image_factory.publish import _create_params

    hv = site.hypervisors["pve-tenant"]
    art = SimpleNamespace(template_name="tpl-x", image=site.image("debian-lab"), import_file="x.qcow2",
                          manifest=dataclasses.replace(manifest(), **{**SB_FIELDS, **fields}))
    return hv, _create_params(hv, art, 9000, "d", ["image-factory"])  # type: ignore[arg-type]


def test_uefi_secure_boot_tpm_create_parameters_pass_pves_own_schema(site: Any) -> None:
    """The create request of a UEFI + Secure Boot + vTPM template, checked against PVE's API schema (the
    apidoc fakepve vendors) and against the 8.3.12 drive formats, then read back through the codecs."""
    from fakepve import schema

    from image_factory.pve.codec import EfiDisk, TpmState, parse_props

    hv, params = _sb_params(site)
    spec = schema.load().match("/nodes/pve/qemu").methods["POST"]["parameters"]
    _values, errors = schema.validate(spec, {"node": "pve", **params})
    assert errors == {}
    assert params["bios"] == "ovmf" and params["machine"] == "q35" and params["scsihw"] == "virtio-scsi-pci"
    efi = EfiDisk.parse(params["efidisk0"])
    assert (efi.volume, efi.efitype, efi.pre_enrolled_keys, efi.ms_cert) == (f"{hv.storage.images}:1", "4m", True,
                                                                             None)
    assert TpmState.parse(params["tpmstate0"]) == TpmState(f"{hv.storage.images}:1", "v2.0")
    assert set(parse_props(params["efidisk0"], "file")) <= EFIDISK_KEYS_8_3
    assert set(parse_props(params["tpmstate0"], "file")) <= TPMSTATE_KEYS_8_3
    assert "ide2" not in params and params["scsi30"] == f"{hv.storage.cloudinit}:cloudinit"
    _hv, no_sb = _sb_params(site, secure_boot=False, secure_boot_keys=None, tpm=False)
    assert EfiDisk.parse(no_sb["efidisk0"]).pre_enrolled_keys is False and "tpmstate0" not in no_sb


@pytest.mark.parametrize(("keys", "version", "refused"), [
    ("microsoft-2011+2023", "9.2.5", ""),
    ("microsoft-2011+2023", "9.1.19", ""),
    ("microsoft-2011+2023", "8.4.1", "cannot do (qemu-server before 9.1.13)"),
    ("microsoft-2011+2023", "9.0.11", "upgrade the host to PVE 9.1.19"),
    ("microsoft-2023", "9.2.5", "always holds Microsoft's expired 2011 CAs"),
    ("distribution-only", "9.2.5", "always holds Microsoft's CAs"),
    ("none", "8.4.1", ""),
])
def test_firmware_refusals_follow_what_each_qemu_server_can_make(keys: str, version: str, refused: str) -> None:
    from image_factory.platform import Platform
    from image_factory.pve.capabilities import firmware_refusals

    why = firmware_refusals(Platform("uefi", True, keys, True, "q35"), version)
    assert (refused in " ".join(why)) if refused else why == []
    assert why == [] or why[0].startswith(f"keys: {keys}")


def test_the_description_records_firmware_and_template_discovery_reads_it() -> None:
    from image_factory.platform import Platform

    m = dataclasses.replace(manifest(), **SB_FIELDS)
    text = template_description(m, import_file="x.qcow2", tested=True, forced=False, run_id="r", published_at="t")
    line = parse_description(text)["firmware"]  # type: ignore[index]
    assert line == "uefi,machine=q35,secure_boot=yes,keys=microsoft-2011+2023,tpm=v2.0"
    assert Platform.parse(line) == Platform("uefi", True, "microsoft-2011+2023", True, "q35")
    bios = parse_description(template_description(manifest(), import_file="x.qcow2", tested=True, forced=False,
                                                  run_id="r", published_at="t"))
    assert bios is not None and Platform.parse(bios["firmware"]) == Platform()
    assert Platform.parse("") is None  # a template published before the line existed
