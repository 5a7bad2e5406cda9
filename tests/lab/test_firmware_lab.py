"""UEFI, Secure Boot keys, vTPM and q35 through publish and deploy on both lab nodes (issue #34).

pve-mgmt runs PVE 8.4.1 (qemu-server 8.3.12) on a directory storage, pve-tenant 9.2.5 (qemu-server 9.2.0) on
LVM-thin: the lab's efidisk0/tpmstate0 follow each qemu-server (docs/pve-facts.md, "UEFI, Secure Boot, vTPM").
Only REAL_BOOT boots (the slow test: a clone of the Debian base image under the template's OVMF Secure Boot code,
keys and an swtpm); elsewhere the firmware's volumes, formats, refusals and drift are what is checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from image_factory import deploy as dep
from image_factory.errors import FactoryError
from image_factory.image import manifest as mf
from image_factory.lab import factories
from image_factory.lab.pytest_plugin import LabHandle, running_lab
from image_factory.platform import Platform
from image_factory.publish import publish_image
from image_factory.pve.client import ApiError, PveClient
from image_factory.pve.codec import EfiDisk, TpmState
from image_factory.pve.templates import find_templates
from image_factory.settings import REPO_ROOT, Settings

pytestmark = pytest.mark.lab

MGMT, TENANT = "pve-mgmt", "pve-tenant"
IMAGE = "debian-lab"
SB_TPM = {"firmware": "uefi", "secure_boot": True, "secure_boot_keys": "microsoft-2011+2023", "tpm": True,
          "machine": "q35"}
OVMF_MS_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
REAL_BOOT = "sandbox01"
BASE_IMAGE = REPO_ROOT / "builds/base/debian-13-base.qcow2"


@pytest.fixture(scope="module")
def flab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    with running_lab(tmp_path_factory.mktemp("firmware-lab"), real_boot=[REAL_BOOT]) as handle:
        yield handle


@pytest.fixture
def env(flab: LabHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[LabHandle, Settings]:
    monkeypatch.setattr(dep.ready, "READY_POLL_INTERVAL", 0.5)
    flab.reset()
    return flab, dataclasses.replace(flab.settings, builds_dir=tmp_path / "builds")


def build(builds: Path, build_id: str, **firmware: Any) -> mf.Manifest:
    """A tested 4 MiB artifact whose manifest asks for ``firmware`` (what sb-build's build records)."""
    d = builds / IMAGE
    d.mkdir(parents=True, exist_ok=True)
    art = factories.qcow2_of(os.urandom(4 * 1024 * 1024), d / f"{IMAGE}.qcow2")
    m = factories.manifest_of(art, IMAGE, build_id=build_id, tested=True,
                              fingerprint=hashlib.sha256(build_id.encode()).hexdigest(), git={"commit": "abc"},
                              finished_at="2026-12-06T11:00:00Z", **firmware)
    m.artifact.path = art.name
    mf.save(d, m)
    return m


def volume_bytes(lab: LabHandle, host: str, volid: str) -> bytes:
    """A volume's contents as the guest sees them: the file behind it (the LVM-thin pool's volumes are files in
    the host's /dev/pve, a dir storage's under images/<vmid>/), converted to raw."""
    sid, name = volid.split(":", 1)
    thin = lab.paths.host_dir(host) / "root" / "dev" / "pve"
    images = lab.paths.storage_dir(host) / "images"
    path = thin / name if sid == "local-lvm" else images / "/".join(name.split("/")[-2:])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "volume.raw"
        subprocess.run(["qemu-img", "convert", "-q", "-O", "raw", str(path), str(out)], check=True)
        return out.read_bytes()


def vm_names(lab: LabHandle, plane: str) -> list[str]:
    return [n for n, vm in lab.site.vms.items() if vm.plane == plane and n != REAL_BOOT][:1]


def test_a_secure_boot_vtpm_template_on_9_2_deploys_a_clone_that_keeps_it_and_8_4_refuses_it(env: Any) -> None:
    lab, settings = env
    m = build(settings.builds_dir, "sb1", **SB_TPM)
    before_mgmt = PveClient(lab.hv(MGMT)).list_vms()
    report = publish_image(settings, lab.site, IMAGE, progress=False)
    tenant, mgmt = report.host(TENANT), report.host(MGMT)
    assert tenant.action == "created", tenant.error
    # PVE 8.4 (qemu-server 8.3.12) has no ms-cert: Microsoft's 2023 CAs cannot be enrolled, refused before any change
    assert mgmt.action == "failed" and "cannot do (qemu-server before 9.1.13)" in str(mgmt.error)
    assert PveClient(lab.hv(MGMT)).list_vms() == before_mgmt

    c = PveClient(lab.hv(TENANT))
    cfg = c.vm_config(tenant.template_vmid)
    assert cfg["bios"] == "ovmf" and cfg["machine"] == "q35" and cfg["scsihw"] == "virtio-scsi-pci"
    efi = EfiDisk.parse(cfg["efidisk0"])
    assert (efi.efitype, efi.pre_enrolled_keys, efi.ms_cert) == ("4m", True, "2023k")
    assert efi.volume.startswith("local-lvm:base-") and dict(efi.options)["size"] == "528K"
    tpm = TpmState.parse(cfg["tpmstate0"])
    assert tpm.version == "v2.0" and tpm.volume.startswith("local-lvm:base-") and dict(tpm.options)["size"] == "4M"
    assert "ide2" not in cfg and "cloudinit" in cfg["scsi30"]
    # the EFI disk holds the vars template PVE's pre-enrolled-keys=1 picks (Microsoft + distribution keys)
    assert volume_bytes(lab, TENANT, efi.volume)[:OVMF_MS_VARS.stat().st_size] == OVMF_MS_VARS.read_bytes()
    info = find_templates(c, IMAGE)[0]
    assert Platform.parse(info.firmware) == m.platform

    names = vm_names(lab, "tenant")
    first = dep.deploy_vms(lab.settings, lab.site, names, timeout=120, progress=False)
    assert first.ok, [(r.plan.vm, r.error or r.plan.reason) for r in first.results]
    vm = lab.site.vms[names[0]]
    clone = c.vm_config(vm.vmid)
    assert clone["bios"] == "ovmf" and clone["machine"] == "q35"
    assert EfiDisk.parse(clone["efidisk0"]).compare_key() == ("4m", True)
    cloned_tpm = TpmState.parse(clone["tpmstate0"])
    # a linked clone still copies the TPM state in full: its own volume, not a snapshot of the template's
    assert cloned_tpm.version == "v2.0" and cloned_tpm.volume == f"local-lvm:vm-{vm.vmid}-disk-{cloned_tpm.volume[-1]}"
    again = dep.plan_deploy(lab.settings, lab.site, names)
    assert [(p.vm, p.action, [str(d) for d in p.diffs]) for p in again.vms] == [(names[0], "in-sync", [])]

    # the clone's TPM replaced by hand: unsafe drift, reported and never corrected
    c.set_vm_config(vm.vmid, delete="tpmstate0")
    drift = dep.plan_deploy(lab.settings, lab.site, names).vms[0]
    assert [(d.field, d.safe) for d in drift.diffs] == [("tpmstate0", False)]


def test_8_4_makes_a_uefi_vtpm_template_without_keys_with_a_raw_tpm_state_on_its_dir_storage(env: Any) -> None:
    lab, settings = env
    build(settings.builds_dir, "t1", firmware="uefi", tpm=True, machine="q35")
    report = publish_image(settings, lab.site, IMAGE, hypervisors=[MGMT], progress=False)
    h = report.host(MGMT)
    assert h.action == "created", h.error
    c = PveClient(lab.hv(MGMT))
    cfg = c.vm_config(h.template_vmid)
    efi = EfiDisk.parse(cfg["efidisk0"])
    assert (efi.efitype, efi.pre_enrolled_keys, efi.ms_cert) == ("4m", False, None)
    tpm = TpmState.parse(cfg["tpmstate0"])
    assert tpm.volume.endswith(".raw") and tpm.version == "v2.0"  # qemu-server 8.3.12: swtpm takes raw only
    names = vm_names(lab, "mgmt")
    assert dep.deploy_vms(lab.settings, lab.site, names, timeout=120, progress=False).ok
    clone = c.vm_config(lab.site.vms[names[0]].vmid)
    assert TpmState.parse(clone["tpmstate0"]).volume.endswith(".raw")
    assert dep.plan_deploy(lab.settings, lab.site, names).vms[0].diffs == []


def test_ms_cert_is_refused_by_8_4_as_pve_refuses_an_unknown_key_and_enrolled_on_9_2_by_an_update(env: Any) -> None:
    lab, _settings = env
    mgmt = PveClient(lab.hv(MGMT))
    with pytest.raises(ApiError) as refused:
        mgmt.create_vm(vmid=9050, efidisk0="local:1,efitype=4m,pre-enrolled-keys=1,ms-cert=2023", bios="ovmf")
    assert refused.value.status == 400
    assert "invalid key in comma-separated list property: ms-cert" in str(refused.value)
    # 9.2 on a host whose pve-edk2-firmware predates the 2023 CAs: create leaves no marker; setting ms-cert=2023
    # enrols them (qemu-server 9.1.4+) and PVE records 2023k
    lab.control(TENANT).call("edk2_vars", ms_2023=False)
    tenant = PveClient(lab.hv(TENANT))
    tenant.run_task("POST", f"/nodes/{tenant.node}/qemu", vmid=9051, bios="ovmf", machine="q35",
                    efidisk0="local-lvm:1,efitype=4m,pre-enrolled-keys=1")
    efi = EfiDisk.parse(tenant.vm_config(9051)["efidisk0"])
    assert efi.ms_cert is None
    tenant.update_vm_config(9051, digest=None, timeout=60, efidisk0=dataclasses.replace(efi, ms_cert="2023").format())
    assert EfiDisk.parse(tenant.vm_config(9051)["efidisk0"]).ms_cert == "2023k"
    # a TPM's version is for good (prohibit_tpm_version_change)
    tenant.run_task("POST", f"/nodes/{tenant.node}/qemu", vmid=9052, tpmstate0="local-lvm:1,version=v2.0")
    tpm = TpmState.parse(tenant.vm_config(9052)["tpmstate0"])
    with pytest.raises(FactoryError, match="cannot change TPM state version after creation"):
        tenant.update_vm_config(9052, digest=None, timeout=60,
                                tpmstate0=dataclasses.replace(tpm, version="v1.2").format())


@pytest.mark.slow
def test_a_clone_of_a_secure_boot_vtpm_template_boots_with_secure_boot_enabled_and_a_tpm(env: Any,
                                                                                           tmp_path: Path) -> None:
    """One real boot (TCG): the Debian base image (signed shim, GRUB and kernel) published as a UEFI + Secure
    Boot + vTPM template on the 9.2 node, deployed, and held over SSH to the image test's firmware suite (UEFI,
    Secure Boot enabled, shim's chain, TPM 2.0). tests/e2e/test_secure_boot_e2e.py does the same with the
    built fixture."""
    from image_factory.lab.baseimage import ensure_base_image

    lab, settings = env
    ensure_base_image(Settings.from_mapping({}))  # cached; built offline on a fresh machine
    d = settings.builds_dir / IMAGE
    d.mkdir(parents=True)
    art = d / f"{IMAGE}.qcow2"
    try:
        os.link(BASE_IMAGE, art)
    except OSError:  # another filesystem
        shutil.copyfile(BASE_IMAGE, art)
    m = factories.manifest_of(art, IMAGE, build_id="sbboot", tested=True, fingerprint="f" * 64,
                              git={"commit": "abc"}, finished_at="2026-12-06T11:00:00Z", **SB_TPM)
    m.artifact.path = art.name
    mf.save(d, m)
    report = publish_image(settings, lab.site, IMAGE, hypervisors=[TENANT], progress=False)
    assert report.ok, report.to_dict()
    vm = lab.site.vms[REAL_BOOT]
    deployed = dep.deploy_vms(lab.settings, lab.site, [REAL_BOOT], timeout=1500, progress=False)  # TCG + SMM
    [r] = deployed.results
    assert r.state == "created", r.to_dict()
    assert lab.qemu(TENANT, vm.vmid) is not None, f"{REAL_BOOT} must run a real qemu"
    counts = lab.image_suites(TENANT, vm, ["firmware"], m.platform, tmp_path / "firmware-suite")
    assert (counts.failed, counts.errors, counts.skipped) == (0, 0, 0), (
        counts.failures, (tmp_path / "firmware-suite" / "pytest.log").read_text()[-3000:])
    assert counts.passed == 5, counts.outcomes
    assert dep.plan_deploy(lab.settings, lab.site, [REAL_BOOT]).vms[0].diffs == []


def test_publish_enrols_microsofts_2023_cas_where_the_hosts_firmware_package_lacks_them(env: Any) -> None:
    """pve-edk2-firmware older than 4.2025.05: create leaves no ms-cert marker; publish sets ms-cert=2023 before the
    conversion, PVE enrols the 2023 CAs and records 2023k, and the template reads so."""
    lab, settings = env
    build(settings.builds_dir, "sb2", **SB_TPM)
    lab.control(TENANT).call("edk2_vars", ms_2023=False)
    report = publish_image(settings, lab.site, IMAGE, hypervisors=[TENANT], progress=False)
    h = report.host(TENANT)
    assert h.action == "created", h.error
    cfg = PveClient(lab.hv(TENANT)).vm_config(h.template_vmid)
    assert str(cfg["template"]) == "1" and EfiDisk.parse(cfg["efidisk0"]).ms_cert == "2023k"
