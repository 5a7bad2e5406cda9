"""End to end, the built Secure Boot + vTPM fixture (issue #34): debian-lab-uefi as this session built and
image-tested it (tests/e2e/conftest.py, shared with its build test: never a second build) -> publish to the
lab's PVE 9.2 node -> deploy -> a real boot of the clone under TCG (OVMF's Secure Boot code with SMM, the keys
PVE enrolled in the template's EFI disk, an swtpm for its TPM state) -> over SSH, the image test's own firmware
suite on the clone.

The lab's base-image boot (tests/lab/test_firmware_lab.py) proves the publish and deploy path; this one proves
that what the factory built, and nothing else, boots as its image test says once PVE holds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from image_factory import deploy as dep
from image_factory.lab.pytest_plugin import LabHandle, running_lab
from image_factory.platform import Platform
from image_factory.publish import publish_image
from image_factory.pve.client import PveClient
from image_factory.pve.codec import EfiDisk, TpmState
from image_factory.pve.templates import find_templates

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TENANT = "pve-tenant"  # PVE 9.2: the only lab node whose qemu-server enrols Microsoft's 2023 CAs (ms-cert)
REAL_BOOT = "sandbox01"


@pytest.fixture(scope="module")
def sb_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    with running_lab(tmp_path_factory.mktemp("secure-boot-e2e-lab"), real_boot=[REAL_BOOT]) as handle:
        yield handle


def passed_firmware_checks(outcomes: dict[str, str]) -> set[str]:
    """The firmware suite's checks that passed: 'test_firmware::test_x[paramiko://...]' -> 'test_x'."""
    return {k.split("::", 1)[1].split("[", 1)[0] for k, v in outcomes.items()
            if k.startswith("test_firmware::") and v == "passed"}


def test_a_clone_of_the_built_secure_boot_vtpm_fixture_boots_as_its_image_test_did(
        uefi_fixture: Any, sb_lab: LabHandle, tmp_path: Path) -> None:
    m = uefi_fixture.manifest
    assert uefi_fixture.result.status == "passed", uefi_fixture.result.failures
    lab = sb_lab
    # the lab's site, with the VM that really boots made a clone of the fixture
    vm = lab.site.vms[REAL_BOOT].model_copy(update={"image": m.image})
    site = dataclasses.replace(lab.site, vms={**lab.site.vms, REAL_BOOT: vm})
    settings = dataclasses.replace(lab.settings, builds_dir=uefi_fixture.outcome.build_dir.parent)

    report = publish_image(settings, site, m.image, hypervisors=[TENANT], progress=False)
    assert report.ok, report.to_dict()
    published = report.host(TENANT)
    c = PveClient(lab.hv(TENANT))
    cfg = c.vm_config(published.template_vmid)
    assert str(cfg["template"]) == "1" and cfg["bios"] == "ovmf" and cfg["machine"] == "q35"
    efi = EfiDisk.parse(cfg["efidisk0"])
    assert (efi.efitype, efi.pre_enrolled_keys, efi.ms_cert) == ("4m", True, "2023k")
    assert TpmState.parse(cfg["tpmstate0"]).version == "v2.0"
    [template] = find_templates(c, m.image)
    # the description names this build and the platform its manifest records: what deploy and drift read
    assert (template.vmid, template.sha256) == (published.template_vmid, m.artifact.sha256)
    platform = Platform.parse(template.firmware)
    assert platform == m.platform

    deployed = dep.deploy_vms(settings, site, [REAL_BOOT], timeout=1500, progress=False)  # TCG + SMM
    [r] = deployed.results
    assert r.state == "created", r.to_dict()
    assert lab.qemu(TENANT, vm.vmid) is not None, f"{REAL_BOOT} must run a real qemu"
    clone = c.vm_config(vm.vmid)
    assert (clone["bios"], clone["machine"]) == ("ovmf", "q35")
    assert EfiDisk.parse(clone["efidisk0"]).compare_key() == ("4m", True)
    assert TpmState.parse(clone["tpmstate0"]).version == "v2.0"

    # The checks the artifact passed in its image test, now on the clone: UEFI, SecureBoot=1 and the kernel's
    # "Secure boot enabled" with lockdown, shim as the ESP's loader with its MOK tables in this boot, TPM 2.0.
    counts = lab.image_suites(TENANT, vm, ["firmware"], platform, tmp_path / "firmware-suite")
    assert (counts.failed, counts.errors, counts.skipped) == (0, 0, 0), (
        counts.failures, (tmp_path / "firmware-suite" / "pytest.log").read_text()[-3000:])
    in_image_test = passed_firmware_checks(uefi_fixture.outcomes)
    assert len(in_image_test) == 5 and passed_firmware_checks(counts.outcomes) == in_image_test, counts.outcomes
    assert dep.plan_deploy(settings, site, [REAL_BOOT]).vms[0].diffs == []
