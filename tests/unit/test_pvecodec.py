"""The property-string codecs: what PVE returns parses, what the factory writes round-trips."""

from __future__ import annotations

import pytest

from image_factory.lab.pve import formats
from image_factory.lab.pve.props import parse_property_string
from image_factory.pve import codec as pvecodec
from image_factory.pve.codec import NetSpec, format_props, format_tags, parse_props, parse_tags


@pytest.mark.parametrize(("raw", "expected"), [
    ("b;a", ["a", "b"]),
    ("Web,db web", ["db", "web"]),  # PVE splits on ; , and space, and compares case-insensitively
    ("", []),
    (None, []),
    (["X", "x", " y "], ["x", "y"]),
])
def test_parse_tags(raw: object, expected: list[str]) -> None:
    assert parse_tags(raw) == expected


def test_format_tags_is_the_normalised_form_and_round_trips() -> None:
    written = format_tags(["mgmt", "Image-Factory", "jump", "mgmt"])
    assert written == "image-factory;jump;mgmt"
    assert format_tags(parse_tags(written)) == written


def test_props_round_trip_in_pves_order() -> None:
    props = parse_props("virtio=BC:24:11:00:00:01,firewall=1,bridge=vmbr0", first_key="model")
    assert props == {"virtio": "BC:24:11:00:00:01", "firewall": "1", "bridge": "vmbr0"}
    assert format_props({"firewall": "1", "bridge": "vmbr0"}, ("virtio", "X")) == "virtio=X,bridge=vmbr0,firewall=1"


@pytest.mark.parametrize(("text", "default_key", "expected"), [
    ("host,flags=+aes", "cputype", {"cputype": "host", "flags": "+aes"}),
    ("flags=+aes;+pcid,host", "cputype", {"flags": "+aes;+pcid", "cputype": "host"}),
    ("viommu=virtio,q35", "type", {"viommu": "virtio", "type": "q35"}),
    ("type=virtio,1", "enabled", {"type": "virtio", "enabled": "1"}),
    ("order=scsi0;net0", "legacy", {"order": "scsi0;net0"}),
    ("size=8G,local-lvm:vm-100-disk-0", "file", {"size": "8G", "file": "local-lvm:vm-100-disk-0"}),
])
def test_a_bare_value_is_the_default_keys_wherever_pve_kept_it(text: str, default_key: str,
                                                                expected: dict[str, str]) -> None:
    """PVE stores cpu, machine, agent, boot and vga as given (qemu-server update_vm_api), and its parser takes the
    default key's bare value in any position; the lab's parser (the oracle) reads each string the same way."""
    assert parse_props(text, default_key) == expected
    name = {"cputype": "cpu", "type": "machine", "enabled": "agent", "legacy": "boot", "file": "scsi"}[default_key]
    assert parse_property_string(text, formats.FORMATS[name].at((9, 2, 0))) == expected


def test_a_machine_or_cpu_written_with_its_type_last_reads_the_same() -> None:
    assert pvecodec.MachineSpec.parse("viommu=virtio,q35") == pvecodec.MachineSpec.parse("q35,viommu=virtio")
    assert pvecodec.MachineSpec.parse("viommu=virtio,q35").family == "q35"


def test_net_round_trip() -> None:
    spec = NetSpec.parse("virtio=BC:24:11:00:00:01,firewall=1,bridge=vmbr0,tag=20")
    assert spec.mac == "bc:24:11:00:00:01" and spec.opts == {"bridge": "vmbr0", "firewall": "1", "tag": "20"}
    assert NetSpec.parse(spec.format()) == spec
    assert spec.format() == "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1,tag=20"


@pytest.mark.parametrize(("text", "size"), [("10G", 10 * 2**30), ("2252M", 2252 * 2**20), ("512K", 512 * 2**10),
                                            ("1048576", 2**20), ("1.5G", int(1.5 * 2**30))])
def test_sizes_parse_and_format_as_pve_writes_them(text: str, size: int) -> None:
    from image_factory.pve.codec import format_size, parse_size

    assert parse_size(text) == size
    assert parse_size(format_size(size)) == size
    assert format_size(20 * 2**30) == "20G" and format_size(2252 * 2**20) == "2252M" and format_size(1000) == "1000"


@pytest.mark.parametrize(("text", "ranges"), [
    ("2-4094", [(2, 4094)]), ("10 20 30-40", [(10, 10), (20, 20), (30, 40)]), ("10,20", [(10, 10), (20, 20)]),
    ("", []),
])
def test_bridge_vids_round_trip(text: str, ranges: list[tuple[int, int]]) -> None:
    assert pvecodec.parse_vids(text) == ranges
    assert pvecodec.parse_vids(pvecodec.format_vids(ranges)) == ranges


@pytest.mark.parametrize("bad", ["0-10", "10-5", "4095", "ten", "1-2-3"])
def test_bridge_vids_refuse_what_pve_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        pvecodec.parse_vids(bad)


# Shapes qemu-server writes (print_drive: the volume, then the keys sorted; Drive.pm 8.3.12:454-535,
# 9.2.0:507-604) and reads.
@pytest.mark.parametrize(("text", "volume", "efitype", "keys", "cert"), [
    ("local-lvm:vm-100-disk-0,efitype=4m,pre-enrolled-keys=1,size=528K", "local-lvm:vm-100-disk-0", "4m", True, None),
    ("local-lvm:base-9000-disk-0,efitype=4m,ms-cert=2023k,pre-enrolled-keys=1,size=528K",
     "local-lvm:base-9000-disk-0", "4m", True, "2023k"),
    ("local:100/vm-100-disk-0.qcow2,size=128K", "local:100/vm-100-disk-0.qcow2", "2m", False, None),  # defaults
    ("file=local-lvm:vm-1-disk-0,efitype=4m,pre-enrolled-keys=0", "local-lvm:vm-1-disk-0", "4m", False, None),
])
def test_efidisk_parses_what_qemu_server_writes(text: str, volume: str, efitype: str, keys: bool,
                                                cert: str | None) -> None:
    efi = pvecodec.EfiDisk.parse(text)
    assert (efi.volume, efi.efitype, efi.pre_enrolled_keys, efi.ms_cert) == (volume, efitype, keys, cert)
    assert pvecodec.EfiDisk.parse(efi.format()) == efi


def test_efidisk_and_tpmstate_format_as_print_drive_does() -> None:
    efi = pvecodec.EfiDisk("local-lvm:1", "4m", True)
    assert efi.format() == "local-lvm:1,efitype=4m,pre-enrolled-keys=1"
    marked = pvecodec.EfiDisk.parse("local-lvm:vm-1-disk-0,efitype=4m,pre-enrolled-keys=1,size=528K")
    assert (pvecodec.EfiDisk(marked.volume, "4m", True, "2023", marked.options).format()
            == "local-lvm:vm-1-disk-0,efitype=4m,ms-cert=2023,pre-enrolled-keys=1,size=528K")
    tpm = pvecodec.TpmState.parse("local:100/vm-100-disk-1.raw,size=4M,version=v2.0")
    assert (tpm.volume, tpm.version) == ("local:100/vm-100-disk-1.raw", "v2.0")
    assert tpm.format() == "local:100/vm-100-disk-1.raw,size=4M,version=v2.0"
    assert pvecodec.TpmState.parse("local-lvm:vm-1-disk-1,size=4M").version == "v1.2"  # PVE's default


# A drive as qemu-server writes it (the volume first) and as it keeps one it was given (file= anywhere, or
# volume=: Drive.pm's alias), an empty CD-ROM, and a passthrough device, which is on no storage.
@pytest.mark.parametrize(("text", "volume", "storage"), [
    ("local-lvm:base-9000-disk-0/vm-1000-disk-0,size=20G", "local-lvm:base-9000-disk-0/vm-1000-disk-0", "local-lvm"),
    ("size=20G,iothread=1,file=local:1000/vm-1000-disk-0.qcow2", "local:1000/vm-1000-disk-0.qcow2", "local"),
    ("media=cdrom,volume=local-lvm:vm-1000-cloudinit", "local-lvm:vm-1000-cloudinit", "local-lvm"),
    ("none,media=cdrom", None, None),
    ("cdrom,media=cdrom", "cdrom", None),
    ("/dev/disk/by-id/ata-X,backup=0", "/dev/disk/by-id/ata-X", None),
])
def test_a_drive_names_its_volume_wherever_it_stands(text: str, volume: str | None, storage: str | None) -> None:
    assert pvecodec.drive_volume(text) == volume
    assert (pvecodec.volume_storage(volume) if volume else None) == storage


@pytest.mark.parametrize(("codec", "text", "why"), [
    (pvecodec.EfiDisk, "local-lvm:1,efitype=8m", "efitype '8m'"),
    (pvecodec.EfiDisk, "local-lvm:1,ms-cert=2024", "ms-cert '2024'"),
    (pvecodec.EfiDisk, "efitype=4m", "names no volume"),
    (pvecodec.TpmState, "local-lvm:1,version=v3", "version 'v3'"),
])
def test_malformed_firmware_drives_are_named(codec: type, text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        codec.parse(text)


@pytest.mark.parametrize(("text", "kind", "family"), [
    (None, "pc", "pc"), ("", "pc", "pc"), ("q35", "q35", "q35"), ("pc-q35-9.2+pve1", "pc-q35-9.2+pve1", "q35"),
    ("type=q35,viommu=virtio", "q35", "q35"), ("pc-i440fx-8.1", "pc-i440fx-8.1", "pc"),
])
def test_machine_parses_machine_fmt(text: str | None, kind: str, family: str) -> None:
    machine = pvecodec.MachineSpec.parse(text)
    assert (machine.type, machine.family) == (kind, family)


def test_machine_refuses_what_machine_fmt_refuses() -> None:
    with pytest.raises(ValueError, match="not a QEMU machine type"):
        pvecodec.MachineSpec.parse("q36")
