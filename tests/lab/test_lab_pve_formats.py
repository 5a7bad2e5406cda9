"""Each lab node's own property-string formats (lab/pve/formats.py): the sub-keys its qemu-server defines."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakepve import PveError, schema

from image_factory.lab.pve import LabPve, formats, props
from image_factory.lab.spec import RELEASES, version_tuple

from .test_lab_pve_rules import make

pytestmark = pytest.mark.unit

UNDEFINED = "invalid format - invalid key in comma-separated list property: {}\n"
QEMU_SERVERS = {manager: version_tuple(release.qemu_server) for manager, release in RELEASES.items()}


@pytest.mark.parametrize(("name", "key", "first_release"), [
    ("net", "host-tunnel", "9.2.5"),  # qemu-server 9.1.18
    ("efidisk", "ms-cert", "9.1.19"),  # 9.0.27
    ("tpmstate", "format", "9.1.19"),  # 9.0.26
    ("cpu", "guest-phys-bits", "9.1.19"),  # 9.0.18
    ("cpu", "level", "9.1.19"),  # 9.1.14, shipped with pve-manager 9.1.19's qemu-server 9.1.15
    ("machine", "aw-bits", "9.1.19"),  # 9.0.21
    ("agent", "freeze-fs", "9.1.19"),  # 9.1.6
    ("agent", "guest-fsfreeze", "9.1.19"),  # 9.1.5, an alias of freeze-fs from 9.1.6
])
def test_a_sub_key_is_known_from_the_release_whose_qemu_server_added_it(name: str, key: str,
                                                                        first_release: str) -> None:
    for manager, qemu_server in QEMU_SERVERS.items():
        known = formats.FORMATS[name].at(qemu_server).knows(key)
        assert known == (qemu_server >= QEMU_SERVERS[first_release]), (manager, name, key)


def test_the_geometry_options_are_gone_from_every_drive_from_qemu_server_9_0_1() -> None:
    for name in ("ide", "sata", "scsi", "virtio"):
        assert formats.FORMATS[name].at((8, 3, 12)).knows("cyls")
        assert not formats.FORMATS[name].at((9, 0, 1)).knows("cyls")
        assert formats.FORMATS[name].at((9, 0, 0)).knows("trans")


def test_freeze_fs_on_backup_is_its_own_key_on_8_4_and_an_alias_of_freeze_fs_from_9_1_6() -> None:
    agent = formats.FORMATS["agent"]
    assert "freeze-fs-on-backup" in agent.at((8, 3, 12)).keys
    assert agent.at((9, 1, 5)).keys >= {"freeze-fs-on-backup", "guest-fsfreeze"}
    assert agent.at((9, 1, 15)).aliases == {"freeze-fs-on-backup": "freeze-fs", "guest-fsfreeze": "freeze-fs"}


def test_the_newest_release_has_exactly_the_formats_of_the_api_schema_fakepve_checks() -> None:
    """Two readings of qemu-server agree: the table (from the Perl format hashes) at 9.2.0 and PVE's published
    API schema that fakepve validates against: the same keys, default key and aliases per format."""
    params = schema.load().paths["/nodes/{node}/qemu"]["POST"]["parameters"]["properties"]
    newest = max(QEMU_SERVERS.values())
    inline = {"net": "net[n]", "ide": "ide[n]", "sata": "sata[n]", "scsi": "scsi[n]", "virtio": "virtio[n]",
              "efidisk": "efidisk0", "tpmstate": "tpmstate0", "agent": "agent", "machine": "machine", "vga": "vga"}
    for name, param in inline.items():
        documented = params[param]["format"]
        fmt = formats.FORMATS[name].at(newest)
        assert set(documented) == fmt.keys | set(fmt.aliases), name
        assert [k for k, v in documented.items() if v.get("default_key")] == [fmt.default_key], name
        assert {k: v["alias"] for k, v in documented.items() if v.get("alias")} == dict(fmt.aliases), name
        assert {k: v["keyAlias"] for k, v in documented.items() if v.get("keyAlias")} == dict(fmt.key_aliases)
        assert {k for k, v in documented.items() if v.get("type") == "boolean"} == fmt.booleans, name


@pytest.mark.parametrize(("option", "name"), [
    ("net0", "net"), ("net31", "net"), ("ipconfig0", "ipconfig"), ("scsi0", "scsi"), ("ide2", "ide"),
    ("efidisk0", "efidisk"), ("tpmstate0", "tpmstate"), ("cpu", "cpu"), ("agent", "agent"), ("machine", "machine"),
    ("boot", "boot"), ("vga", "vga"), ("cicustom", "cicustom"), ("cpulimit", None), ("serial0", None),
    ("efidisk1", None), ("name", None),
])
def test_each_vm_option_the_table_covers_is_named_by_its_format(option: str, name: str | None) -> None:
    assert formats.format_of(option) == name


def test_a_node_refuses_a_sub_key_its_qemu_server_lacks_with_pves_400(tmp_path: Path) -> None:
    """PVE's RESTHandler names every refused parameter at once: a newer top-level key and a newer sub-key."""
    pve = make(tmp_path)
    assert pve.version == "8.4.1"
    create = ("POST", "/nodes/{node}/qemu")
    values = {"vmid": 100, "net0": "virtio,bridge=vmbr0,host-tunnel=1", "cpu": "host,level=30",
              "efidisk0": "local:1,efitype=4m,ms-cert=2023", "allow-ksm": 1, "scsi0": "local:1,cyls=2"}
    with pytest.raises(PveError) as refused:
        pve.check_own_schema(*create, values)
    assert refused.value.status == 400 and refused.value.errors == {
        "net0": UNDEFINED.format("host-tunnel"), "cpu": UNDEFINED.format("level"),
        "efidisk0": UNDEFINED.format("ms-cert"),
        "allow-ksm": "property is not defined in schema and the schema does not allow additional properties"}
    pve.set_release("9.1.19")
    with pytest.raises(PveError) as refused:
        pve.check_own_schema(*create, values)
    assert refused.value.errors == {"net0": UNDEFINED.format("host-tunnel"), "scsi0": UNDEFINED.format("cyls")}
    pve.set_release("9.2.5")
    with pytest.raises(PveError) as refused:
        pve.check_own_schema(*create, values)
    assert refused.value.errors == {"scsi0": UNDEFINED.format("cyls")}
    pve.check_own_schema(*create, {k: v for k, v in values.items() if k != "scsi0"})
    pve.check_own_schema("POST", "/nodes/{node}/qemu/{vmid}/clone", {"net0": "anything=1"})  # takes no net0


def test_an_alias_given_twice_is_refused_from_pve_common_9_1_9_only(tmp_path: Path) -> None:
    pve = make(tmp_path)
    config = ("PUT", "/nodes/{node}/qemu/{vmid}/config")
    twice = {"scsi1": "local:1,volume=local:2"}
    pve.check_own_schema(*config, twice)  # pve-common 8.3.1: the later part wins
    pve.set_release("9.2.5")
    with pytest.raises(PveError) as refused:
        pve.check_own_schema(*config, twice)
    assert refused.value.errors == {"scsi1": "invalid format - key 'file' is already defined (via alias)\n"}


@pytest.mark.parametrize(("cpu", "message"), [
    ("flags=+aes", "invalid format - CPU is missing cputype\n"),
    ("x86-64-v2-aes", "invalid format - Built-in cputype 'x86-64-v2-aes' is not defined (missing 'custom-' "
                      "prefix?)\n"),
    ("host,reported-model=qemu64", "invalid format - Property 'reported-model' not allowed in VM-specific CPU "
                                   "config.\n"),
])
def test_a_vm_cpu_is_validated_as_validate_vm_cpu_conf_does(cpu: str, message: str) -> None:
    with pytest.raises(PveError) as refused:
        LabPve.check_vm_formats({"cpu": cpu})
    assert refused.value.errors == {"cpu": message}


def test_a_vm_cpu_with_its_cputype_anywhere_passes() -> None:
    LabPve.check_vm_formats({"cpu": "flags=+aes,x86-64-v2-AES"})


def test_a_drive_is_reprinted_as_print_drive_writes_it_and_nothing_else_is() -> None:
    values = {"scsi1": "ssd=on,discard=on,local-lvm:8", "efidisk0": "volume=local:1,pre-enrolled-keys=yes,efitype=4m",
              "net0": "bridge=vmbr0,virtio", "cpu": "flags=+aes,host", "name": "x"}
    assert formats.reprinted_drives(values, (8, 3, 12), (8, 3, 1)) == {
        "scsi1": "local-lvm:8,discard=on,ssd=1", "efidisk0": "local:1,efitype=4m,pre-enrolled-keys=1"}


def test_a_bare_boolean_default_key_reads_as_a_boolean_from_pve_common_9_0_12() -> None:
    agent = formats.FORMATS["agent"].at((9, 2, 0))
    assert props.parse_property_string("yes,fstrim_cloned_disks=on", agent) == {"enabled": "1",
                                                                               "fstrim_cloned_disks": "1"}
    assert props.parse_property_string("yes", agent, boolean_default=False) == {"enabled": "yes"}


def test_a_cicustom_volume_that_is_none_is_a_nested_format_error() -> None:
    """pve-qm-cicustom's keys have format pve-volume-id (pve-storage Plugin.pm parse_volume_id): its error sits
    under cicustom.<key> inside the format error, as PVE::Exception prints a nested one."""
    with pytest.raises(PveError) as refused:
        LabPve.check_vm_formats({"cicustom": "vendor=snippets/v.yaml"})
    assert refused.value.errors == {"cicustom": "invalid format - format error\ncicustom.vendor: invalid format - "
                                                "unable to parse volume ID 'snippets/v.yaml'\n\n"}
