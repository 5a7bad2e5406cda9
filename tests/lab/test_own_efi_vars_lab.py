"""keys: microsoft-2023 templates carry the build's own enrolled EFI variable store (issue #34).

PVE's pre-enrolled store always holds Microsoft's 2011 CAs, so publish uploads the store the build enrolled
(firmware.enrolled_store: KEK and db with the 2023 CAs only, a platform key whose private half is gone) beside the
disk and creates ``efidisk0: <storage>:0,import-from=<store>,efitype=4m,pre-enrolled-keys=0``: qemu-server
(8.3.12 and 9.x alike) copies it as it is (docs/pve-facts.md, "UEFI, Secure Boot"). The lab's nodes are
pve-mgmt 8.4.1 (dir storage) and pve-tenant 9.2.5 (LVM-thin). One real boot (TCG + SMM + swtpm) shows what the
guest gets.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import shutil
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from image_factory import deploy as dep
from image_factory.errors import RemoteError
from image_factory.image import firmware
from image_factory.image import manifest as mf
from image_factory.lab import factories
from image_factory.lab.pytest_plugin import LabHandle, running_lab
from image_factory.publish import publish_image
from image_factory.publish.model import PublishError
from image_factory.pve.client import ApiError, PveClient
from image_factory.pve.codec import EfiDisk
from image_factory.pve.templates import find_templates
from image_factory.settings import REPO_ROOT, Settings

from .test_firmware_lab import volume_bytes

pytestmark = pytest.mark.lab

MGMT, TENANT = "pve-mgmt", "pve-tenant"
IMAGE = "debian-lab"
MS_2023 = {"firmware": "uefi", "secure_boot": True, "secure_boot_keys": "microsoft-2023", "tpm": True,
           "machine": "q35"}
OVMF_EMPTY_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
REAL_BOOT = "sandbox01"
BASE_IMAGE = REPO_ROOT / "builds/base/debian-13-base.qcow2"
EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
EFI_IMAGE_SECURITY_DATABASE = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"
EFI_CERT_X509 = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
DB_2023 = {"CN=Windows UEFI CA 2023,O=Microsoft Corporation,C=US",
           "CN=Microsoft UEFI CA 2023,O=Microsoft Corporation,C=US",
           "CN=Microsoft Option ROM UEFI CA 2023,O=Microsoft Corporation,C=US"}
KEK_2023 = {"CN=Microsoft Corporation KEK 2K CA 2023,O=Microsoft Corporation,C=US"}


@pytest.fixture(scope="module")
def flab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    with running_lab(tmp_path_factory.mktemp("own-vars-lab"), real_boot=[REAL_BOOT]) as handle:
        yield handle


@pytest.fixture
def env(flab: LabHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[LabHandle, Settings]:
    monkeypatch.setattr(dep.ready, "READY_POLL_INTERVAL", 0.5)
    flab.reset()
    return flab, dataclasses.replace(flab.settings, builds_dir=tmp_path / "builds")


def build_with_own_store(builds: Path, build_id: str, disk: Path | None = None) -> mf.Manifest:
    """A tested microsoft-2023 build as the build stage leaves it: the disk (``disk``, else 4 MiB of noise) and
    beside it the variable store firmware.enrolled_store made, named with its sha256 in the manifest."""
    d = builds / IMAGE
    d.mkdir(parents=True, exist_ok=True)
    art = d / f"{IMAGE}.qcow2"
    if disk is not None:
        try:
            os.link(disk, art)
        except OSError:  # another filesystem
            shutil.copyfile(disk, art)
    else:
        factories.qcow2_of(os.urandom(4 * 1024 * 1024), art)
    store = d / "efivars.raw"
    enrolled = firmware.enrolled_store(OVMF_EMPTY_VARS, store, "microsoft-2023", "debian")
    m = factories.manifest_of(art, IMAGE, build_id=build_id, tested=True, fingerprint=build_id.ljust(64, "f"),
                              git={"commit": "abc"}, finished_at="2026-12-06T11:00:00Z", **MS_2023,
                              secure_boot_enrolled=enrolled, efi_vars=store.name,
                              efi_vars_sha256=mf.sha256_file(store))
    m.artifact.path = art.name
    mf.save(d, m)
    return m


def x509_subjects(efivar: bytes) -> set[str]:
    """The certificates' subjects in an efivarfs signature database (4 bytes of attributes, then
    EFI_SIGNATURE_LISTs: type GUID, list size, header size, signature size; each signature an owner GUID and the
    DER), as UEFI 2.10 section 32.4.1 lays them out."""
    data, subjects, at = efivar[4:], set(), 0
    while at < len(data):
        sig_type = uuid.UUID(bytes_le=data[at:at + 16])
        list_size, header_size, sig_size = struct.unpack_from("<III", data, at + 16)
        if sig_type == EFI_CERT_X509:
            first = at + 28 + header_size
            for sig in range(first, at + list_size, sig_size):
                der = data[sig + 16:sig + sig_size]
                subjects.add(x509.load_der_x509_certificate(der).subject.rfc4514_string())
        at += list_size
    return subjects


def test_a_microsoft_2023_template_gets_the_builds_store_as_it_is_on_8_4_and_9_2_and_its_clone_keeps_it(
        env: Any) -> None:
    lab, settings = env
    m = build_with_own_store(settings.builds_dir, "ms1")
    store = (settings.builds_dir / IMAGE / "efivars.raw").read_bytes()
    report = publish_image(settings, lab.site, IMAGE, progress=False)
    for host in (MGMT, TENANT):
        h = report.host(host)
        assert h.action == "created", h.error
        assert h.plan["efi_vars_upload"] == "upload"
        c = PveClient(lab.hv(host))
        cfg = c.vm_config(h.template_vmid)
        efi = EfiDisk.parse(cfg["efidisk0"])
        # PVE enrolled nothing: no pre-enrolled keys, no ms-cert marker, the volume the store's own 528K
        assert (efi.efitype, efi.pre_enrolled_keys, efi.ms_cert) == ("4m", False, None)
        assert dict(efi.options)["size"] == "528K" and "import-from" not in dict(efi.options)
        assert volume_bytes(lab, host, efi.volume) == store
        info = find_templates(c, IMAGE)[0]
        assert info.efi_vars_file == f"{IMAGE}-ms1.efivars.raw" and "keys=microsoft-2023" in info.firmware
        assert f"efi_vars: {info.efi_vars_file} sha256={m.efi_vars_sha256}" in cfg["description"]
        listing = os.listdir(lab.paths.storage_dir(host) / "import")
        assert info.efi_vars_file in listing

    again = publish_image(settings, lab.site, IMAGE, progress=False)  # a re-run converges: nothing sent
    assert [(h.action, h.plan["efi_vars_upload"]) for h in again.hosts] == [("unchanged", "none")] * 2

    names = [n for n, vm in lab.site.vms.items() if vm.plane == "mgmt" and n != REAL_BOOT][:1]
    deployed = dep.deploy_vms(lab.settings, lab.site, names, timeout=120, progress=False)
    assert deployed.ok, [(r.plan.vm, r.error or r.plan.reason) for r in deployed.results]
    clone = PveClient(lab.hv(MGMT)).vm_config(lab.site.vms[names[0]].vmid)
    cloned = EfiDisk.parse(clone["efidisk0"])
    assert cloned.compare_key() == ("4m", False) and volume_bytes(lab, MGMT, cloned.volume) == store
    assert dep.plan_deploy(lab.settings, lab.site, names).vms[0].diffs == []


def test_a_store_that_changed_after_the_build_is_refused_before_any_host_changes(env: Any) -> None:
    lab, settings = env
    build_with_own_store(settings.builds_dir, "ms2")
    with (settings.builds_dir / IMAGE / "efivars.raw").open("r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x01")
    before = {h: PveClient(lab.hv(h)).list_vms() for h in (MGMT, TENANT)}
    with pytest.raises(PublishError, match="the store changed after the build: rebuild it"):
        publish_image(settings, lab.site, IMAGE, progress=False)
    assert {h: PveClient(lab.hv(h)).list_vms() for h in (MGMT, TENANT)} == before
    assert not [n for h in (MGMT, TENANT) for n in os.listdir(lab.paths.storage_dir(h) / "import")
                if n.startswith(f"{IMAGE}-ms2")]


@pytest.mark.slow
def test_a_clone_of_a_microsoft_2023_template_boots_with_secure_boot_and_only_the_2023_cas(env: Any) -> None:
    """One real boot (TCG + SMM + swtpm): the Debian base image (shim 16.1 signed with both Microsoft UEFI CAs)
    published with a store enrolled by the build's code on the 9.2 node, deployed, and asked over SSH what its
    firmware holds: Secure Boot on, db and KEK with the 2023 CAs only."""
    from image_factory.lab.baseimage import ensure_base_image
    from image_factory.pve.guest import host_key_via_agent
    from image_factory.pve.sshlink import connect
    from image_factory.site.inventory import SshEndpoint

    lab, settings = env
    ensure_base_image(Settings.from_mapping({}))  # cached; built offline on a fresh machine
    build_with_own_store(settings.builds_dir, "msboot", disk=BASE_IMAGE)
    report = publish_image(settings, lab.site, IMAGE, hypervisors=[TENANT], progress=False)
    assert report.ok, report.to_dict()
    vm = lab.site.vms[REAL_BOOT]
    deployed = dep.deploy_vms(lab.settings, lab.site, [REAL_BOOT], timeout=1500, progress=False)  # TCG + SMM
    [r] = deployed.results
    assert r.state == "created", r.to_dict()
    assert lab.qemu(TENANT, vm.vmid) is not None, f"{REAL_BOOT} must run a real qemu"
    host, port = lab.vm_ssh_address(vm.vmid)
    host_key = host_key_via_agent(PveClient(lab.hv(TENANT)), vm.vmid, timeout=120)
    ep = SshEndpoint(host=host, port=port, user=vm.cloudinit.user, host_key=host_key, key_file=lab.paths.client_key)
    deadline = time.monotonic() + 300  # the agent answers before sshd has started
    while True:
        try:
            link = connect(vm.name, ep, timeout=30)
            break
        except RemoteError:
            if time.monotonic() > deadline:
                raise AssertionError(lab.serial_log(TENANT, vm.vmid).read_text(errors="replace")[-3000:]) from None
            time.sleep(5)
    efivars = "/sys/firmware/efi/efivars"
    with link:
        secure_boot = link.run(["od", "-An", "-t", "u1", f"{efivars}/SecureBoot-{EFI_GLOBAL}"], check=False)
        db = link.run(["base64", "-w0", f"{efivars}/db-{EFI_IMAGE_SECURITY_DATABASE}"], check=False)
        kek = link.run(["base64", "-w0", f"{efivars}/KEK-{EFI_GLOBAL}"], check=False)
    assert secure_boot.stdout.split()[-1:] == ["1"], f"SecureBoot variable: {secure_boot.stdout!r}"
    assert db.status == 0 and kek.status == 0, (db.stderr, kek.stderr)
    assert x509_subjects(base64.b64decode(db.stdout)) == DB_2023
    assert x509_subjects(base64.b64decode(kek.stdout)) == KEK_2023
    assert dep.plan_deploy(lab.settings, lab.site, [REAL_BOOT]).vms[0].diffs == []


def test_the_api_transport_sends_the_store_too_and_retention_removes_it_with_its_template(env: Any) -> None:
    lab, settings = env
    build_with_own_store(settings.builds_dir, "ms3")
    first = publish_image(settings, lab.site, IMAGE, hypervisors=[TENANT], transport="api", progress=False)
    h = first.host(TENANT)
    assert h.action == "created" and h.plan["efi_vars_upload"] == "upload", h.error
    c = PveClient(lab.hv(TENANT))
    efi = EfiDisk.parse(c.vm_config(h.template_vmid)["efidisk0"])
    assert volume_bytes(lab, TENANT, efi.volume) == (settings.builds_dir / IMAGE / "efivars.raw").read_bytes()

    shutil.rmtree(settings.builds_dir / IMAGE)
    build_with_own_store(settings.builds_dir, "ms4")  # a new build: a new store (its own platform key)
    second = publish_image(settings, lab.site, IMAGE, hypervisors=[TENANT], transport="api", keep=1,
                           progress=False).host(TENANT)
    assert second.action == "created", second.error
    assert [p.get("efi_vars_file_removed") for p in second.pruned] == [f"{IMAGE}-ms3.efivars.raw"]
    imports = os.listdir(lab.paths.storage_dir(TENANT) / "import")
    assert f"{IMAGE}-ms4.efivars.raw" in imports and f"{IMAGE}-ms3.efivars.raw" not in imports


def test_efidisk0_import_from_is_checked_and_copied_as_qemu_server_does(env: Any, tmp_path: Path) -> None:
    """check_drive_param refuses a size other than 0 and a missing efitype/pre-enrolled-keys (HTTP 400, before
    the task); create_disks copies the source at the vars template's size (bytes beyond it dropped), enrols
    nothing and marks no ms-cert, even on 9.2 where create_efidisk would."""
    lab, _settings = env
    store = tmp_path / "efivars.raw"
    firmware.enrolled_store(OVMF_EMPTY_VARS, store, "microsoft-2023", "debian")
    longer = store.read_bytes() + b"\xaa" * 4096
    for host in (MGMT, TENANT):
        (lab.paths.storage_dir(host) / "import" / "own.efivars.raw").write_bytes(longer)
    mgmt = PveClient(lab.hv(MGMT))
    source = "import-from=local:import/own.efivars.raw"
    refused = {"local:1,efitype=4m,pre-enrolled-keys=0": "'import-from' requires special syntax",
               "local:0,efitype=4m": "need to specify 'pre-enrolled-keys' when using 'import-from'",
               "local:0,pre-enrolled-keys=0": "need to specify 'efitype' when using 'import-from'"}
    for drive, why in refused.items():
        with pytest.raises(ApiError) as failed:
            mgmt.create_vm(vmid=9060, bios="ovmf", machine="q35", efidisk0=f"{drive},{source}")
        assert failed.value.status == 400 and why in str(failed.value)
    assert 9060 not in [int(vm["vmid"]) for vm in mgmt.list_vms()]
    for host, storage in ((MGMT, "local"), (TENANT, "local-lvm")):
        c = PveClient(lab.hv(host))
        c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=9061, bios="ovmf", machine="q35",
                   efidisk0=f"{storage}:0,efitype=4m,pre-enrolled-keys=0,{source}")
        efi = EfiDisk.parse(c.vm_config(9061)["efidisk0"])
        assert (efi.pre_enrolled_keys, efi.ms_cert, dict(efi.options)["size"]) == (False, None, "528K")
        assert volume_bytes(lab, host, efi.volume) == store.read_bytes()
