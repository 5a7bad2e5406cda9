"""publish.register: the create parameters of a template (firmware, Secure Boot, vTPM) against PVE's schema."""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace
from typing import Any

import pytest

from image_factory.lab.pve import formats
from image_factory.lab.spec import RELEASES, version_tuple
from image_factory.publish.register import create_params
from image_factory.site.inventory import Hypervisor

from ._support import SB_FIELDS, manifest

pytestmark = pytest.mark.unit


def test_a_uefi_build_becomes_an_ovmf_template_and_a_bios_build_does_not(site: Any) -> None:
    hv = site.hypervisors["pve-mgmt"]
    art = SimpleNamespace(template_name="tpl-x", image=site.image("debian-lab"), import_file="x.qcow2",
                          efi_vars_file="", manifest=dataclasses.replace(manifest(), firmware="uefi"))
    params = create_params(hv, art, 9000, "d", ["image-factory"])  # type: ignore[arg-type]
    assert params["bios"] == "ovmf" and params["machine"] == "q35"
    assert params["efidisk0"] == f"{hv.storage.images}:1,efitype=4m,pre-enrolled-keys=0"
    art.manifest = manifest()  # written before firmware was recorded: BIOS
    assert not {"bios", "machine", "efidisk0"} & set(create_params(hv, art, 9000, "d", []))  # type: ignore[arg-type]


# qemu-server 8.3.12 (PVE 8.4) Drive.pm:454-535: the keys its efidisk0 and tpmstate0 formats know (no ms-cert)
EFIDISK_KEYS_8_3 = {"file", "volume", "format", "size", "efitype", "pre-enrolled-keys", "import-from"}
TPMSTATE_KEYS_8_3 = {"file", "volume", "format", "size", "version", "import-from"}


def _sb_params(site: Any, efi_vars_file: str = "", **fields: Any) -> tuple[Hypervisor, dict[str, Any]]:
    hv = site.hypervisors["pve-tenant"]
    art = SimpleNamespace(template_name="tpl-x", image=site.image("debian-lab"), import_file="x.qcow2",
                          efi_vars_file=efi_vars_file,
                          manifest=dataclasses.replace(manifest(), **{**SB_FIELDS, **fields}))
    return hv, create_params(hv, art, 9000, "d", ["image-factory"])  # type: ignore[arg-type]


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


def test_a_microsoft_2023_template_imports_the_builds_store_as_qemu_servers_formats_take_it(site: Any) -> None:
    """efidisk0 from the build's own store: ``<storage>:0,import-from=<import volume>`` with efitype and
    pre-enrolled-keys given (Qemu.pm check_drive_param requires both, and size 0), 0 so PVE enrols nothing;
    valid for PVE's API schema and within the 8.3.12 drive format."""
    from fakepve import schema

    from image_factory.pve.codec import EfiDisk, parse_props

    hv, params = _sb_params(site, efi_vars_file="x.efivars.raw", secure_boot_keys="microsoft-2023")
    assert params["efidisk0"] == (f"{hv.storage.images}:0,efitype=4m,import-from={hv.storage.import_}:import/"
                                  "x.efivars.raw,pre-enrolled-keys=0")
    spec = schema.load().match("/nodes/pve/qemu").methods["POST"]["parameters"]
    assert schema.validate(spec, {"node": "pve", **params})[1] == {}
    efi = EfiDisk.parse(params["efidisk0"])
    assert (efi.efitype, efi.pre_enrolled_keys, efi.ms_cert) == ("4m", False, None)
    found = re.fullmatch(r"(([^/:\s]+):)?(\d+(\.\d+)?)", efi.volume)  # qemu-server Drive.pm $NEW_DISK_RE
    assert found is not None and found.group(3) == "0"  # 'import-from' requires <storage ID>:0
    assert set(parse_props(params["efidisk0"], "file")) <= EFIDISK_KEYS_8_3
    assert params["tpmstate0"] == f"{hv.storage.images}:1,version=v2.0"


def test_a_microsoft_2023_template_without_an_uploaded_store_is_refused(site: Any) -> None:
    from image_factory.publish.model import PublishError

    with pytest.raises(PublishError, match="needs the build's EFI variable store"):
        _sb_params(site, secure_boot_keys="microsoft-2023")


PLATFORMS = {"bios": {}, "uefi": {"firmware": "uefi"}, "secure-boot-vtpm": SB_FIELDS,
             "uefi-q35-vtpm": {**SB_FIELDS, "secure_boot": False, "secure_boot_keys": None},
             "own-store-microsoft-2023": {**SB_FIELDS, "secure_boot_keys": "microsoft-2023"}}


@pytest.mark.parametrize("release", list(RELEASES))
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_every_property_string_of_a_template_create_parses_on_every_release(site: Any, platform: str,
                                                                            release: str) -> None:
    """Each property string of the create request (disk import, cloud-init drive, NIC, agent, boot, vga, machine,
    efidisk0, tpmstate0), parsed with the release's own formats as the lab's node does (lab.pve.formats)."""
    art = SimpleNamespace(template_name="tpl-x", image=site.image("debian-lab"), import_file="x.qcow2",
                          efi_vars_file="x.efivars.raw" if platform.startswith("own-store") else "",
                          manifest=dataclasses.replace(manifest(), **PLATFORMS[platform]))
    params = create_params(site.hypervisors["pve-mgmt"], art, 9000, "d", ["image-factory"])  # type: ignore[arg-type]
    versions = version_tuple(RELEASES[release].qemu_server), version_tuple(RELEASES[release].common)
    assert formats.check_property_strings(params, *versions) == {}
    assert {"scsi0", "net0", "agent", "boot", "vga"} <= set(params)


def test_the_ms_cert_publish_sets_is_a_sub_key_8_4_lacks_and_publish_never_asks_8_4_for_it() -> None:
    """ensure_ms_2023's efidisk0 update carries ms-cert, which qemu-server 8.3.12 does not define: the capability
    check refuses 2023 keys on 8.4 before any call, so no 8.4 node is ever sent one."""
    from image_factory.platform import Platform
    from image_factory.pve.capabilities import firmware_refusals

    update = {"efidisk0": "local-lvm:vm-9000-disk-0,efitype=4m,ms-cert=2023,pre-enrolled-keys=1,size=528K"}
    for manager, release in RELEASES.items():
        refused = formats.check_property_strings(update, version_tuple(release.qemu_server),
                                                 version_tuple(release.common))
        asks = Platform("uefi", True, "microsoft-2011+2023", True, "q35")
        assert bool(refused) == bool(firmware_refusals(asks, manager)) == (manager == "8.4.1"), manager


@pytest.mark.parametrize(("keys", "version", "refused"), [
    ("microsoft-2011+2023", "9.2.5", ""),
    ("microsoft-2011+2023", "9.1.19", ""),
    ("microsoft-2011+2023", "8.4.1", "cannot do (qemu-server before 9.1.13)"),
    ("microsoft-2011+2023", "9.0.11", "upgrade the host to PVE 9.1.19"),
    ("microsoft-2023", "9.2.5", ""),  # the build's own store, imported: PVE makes none of it
    ("microsoft-2023", "9.1.19", ""),
    ("microsoft-2023", "8.4.1", ""),  # qemu-server 8.3.12 imports efidisk0 the same way
    ("microsoft-2023", "8.3.5", "upgrade the host to PVE 8.4 or newer"),
    ("distribution-only", "9.2.5", "always holds Microsoft's CAs"),
    ("none", "8.4.1", ""),
])
def test_firmware_refusals_follow_what_each_qemu_server_can_make(keys: str, version: str, refused: str) -> None:
    from image_factory.platform import Platform
    from image_factory.pve.capabilities import firmware_refusals

    why = firmware_refusals(Platform("uefi", True, keys, True, "q35"), version)
    assert (refused in " ".join(why)) if refused else why == []
    assert why == [] or why[0].startswith(f"keys: {keys}")


