"""Codecs for Proxmox VE property strings (``k=v,k2=v2``): parse what PVE returns, write what PVE takes.

One place knows the formats; stages compare parsed values, never strings (docs/pve-facts.md: "Compare
parsed values, not strings"; PVE writes the model key first with the MAC as its value, other keys sorted).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from image_factory.units import SIZE_UNITS, format_size, parse_size  # noqa: F401  (the codec speaks sizes too)

NET_MODELS = ("virtio", "e1000", "e1000e", "vmxnet3", "rtl8139", "i82551", "i82557b", "i82559er", "ne2k_isa",
              "ne2k_pci", "pcnet", "e1000-82540em", "e1000-82544gc", "e1000-82545em")


def parse_props(value: str, first_key: str | None = None) -> dict[str, str]:
    """Parse a PVE property string ``k=v,k2=v2``; a bare value is stored under ``first_key`` (the format's
    default key) wherever it stands: PVE accepts it in any position (PVE::JSONSchema::parse_property_string) and
    keeps cpu, machine, agent, boot and vga as they were written (update_vm_api), so a config read back can hold
    ``flags=+aes,host``. Another bare value is a key without a value."""
    out: dict[str, str] = {}
    for part in (p for p in str(value).split(",") if p != ""):
        key, eq, val = part.partition("=")
        if eq:
            out[key.strip()] = val.strip()
        elif first_key is not None and out.get(first_key) in (None, "", "0"):  # Perl's !$res->{$default_key}
            out[first_key] = key
        else:
            out[key] = ""
    return out


def format_props(props: Mapping[str, str], first: tuple[str, str] | None = None) -> str:
    """``first`` (key, value) goes first, the other keys sorted: PVE's own order."""
    parts = [f"{first[0]}={first[1]}"] if first else []
    parts += [f"{k}={props[k]}" for k in sorted(props)]
    return ",".join(parts)


@dataclass(frozen=True)
class NetSpec:
    """A parsed ``netN`` value: model, MAC (lowercase) and the other options."""

    model: str
    mac: str | None
    options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(sorted(self.options)))
        object.__setattr__(self, "mac", self.mac.lower() if self.mac else None)

    @classmethod
    def parse(cls, value: str) -> NetSpec:
        props = parse_props(value)
        model, mac = None, None
        rest: dict[str, str] = {}
        for key, val in props.items():
            if key in NET_MODELS and model is None:
                model, mac = key, (val or None)
            elif key == "model":
                model = val
            elif key == "macaddr":
                mac = val
            else:
                rest[key] = val
        if model is None:
            raise ValueError(f"not a PVE network device: {value!r} (no model such as virtio=...)")
        return cls(model, mac.lower() if mac else None, tuple(sorted(rest.items())))

    @property
    def opts(self) -> dict[str, str]:
        return dict(self.options)

    def format(self, *, mac_upper: bool = True) -> str:
        mac = (self.mac or "").upper() if mac_upper else (self.mac or "")
        return format_props(self.opts, (self.model, mac))

    def compare_key(self) -> tuple[str, str | None, tuple[tuple[str, str], ...]]:
        opts = self.opts
        opts.setdefault("firewall", "0")
        return (self.model, (self.mac or "").lower(), tuple(sorted(opts.items())))




_TAG_SEPARATORS = re.compile(r"[;,\s]+")


def parse_tags(value: object) -> list[str]:
    """A VM's ``tags`` as PVE compares them: case-insensitive, so lowercased, unique and sorted.

    qemu-server before 9.1.17 (PVE 8.4, 9.1) stores tags verbatim on create and 9.1.17+ (PVE 9.2)
    normalises them (pve-facts.md, Templates): reading
    through this codec makes both forms, and a tag an operator typed in capitals, compare equal.
    """
    items = value if isinstance(value, list | tuple | set) else _TAG_SEPARATORS.split(str(value or ""))
    return sorted({str(t).strip().lower() for t in items if str(t).strip()})


def format_tags(tags: object) -> str:
    """The ``tags`` value to write: the normalised form, so no PVE version changes what it stores."""
    return ";".join(parse_tags(tags))


# A VLAN-aware bridge without bridge-vids carries what PVE writes for one by default.
DEFAULT_BRIDGE_VIDS = "2-4094"


def parse_vids(value: object) -> list[tuple[int, int]]:
    """A bridge's ``bridge_vids`` (``2-4094``, ``10 20 30-40``; PVE's pve-vlan-id-or-range-list) as ranges."""
    ranges: list[tuple[int, int]] = []
    for item in re.split(r"[\s,;]+", str(value or "").strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d{1,4})(?:-(\d{1,4}))?", item)
        if not m:
            raise ValueError(f"not a VLAN id or range: {item!r} in {value!r}")
        first, last = int(m[1]), int(m[2] or m[1])
        if not 1 <= first <= last <= 4094:
            raise ValueError(f"VLAN range {item!r} is outside 1-4094 or reversed")
        ranges.append((first, last))
    return ranges


def format_vids(ranges: list[tuple[int, int]]) -> str:
    return " ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def drive_volume(value: object) -> str | None:
    """The volume a drive value (``scsi0``, ``ide2``, ``efidisk0`` ...) names: the bare value or ``file=`` or
    ``volume=``, wherever it stands (PVE keeps a drive as it was written); None for an empty drive (``none``,
    an empty CD-ROM)."""
    props = parse_props(str(value), "file")
    volume = props.get("file") or props.get("volume") or ""
    return volume if volume not in ("", "none") else None


def volume_storage(volume: str) -> str | None:
    """The storage of a ``<storage>:<name>`` volume id; None for a path or a device (``/dev/sdb``, ``cdrom``)."""
    storage, colon, _ = volume.partition(":")
    return storage if colon and not storage.startswith("/") else None


def _drive_props(key: str, value: str) -> tuple[str, dict[str, str]]:
    """(volume, other keys) of a drive value: the volume is the bare first value or ``file=``/``volume=``."""
    props = parse_props(value, "file")
    volume = props.pop("file", "") or props.pop("volume", "")
    if not volume:
        raise ValueError(f"{key} {value!r} names no volume")
    return volume, props


def _take_enum(props: dict[str, str], key: str, default: str | None, allowed: tuple[str, ...], where: str) -> Any:
    """Pop ``key`` (PVE's default when absent) and check it against its schema's enum."""
    got = props.pop(key, default)
    if got is not None and got not in allowed:
        raise ValueError(f"{where}: {key} {got!r} is not one of {', '.join(allowed)}")
    return got


def _pve_bool(text: str | None) -> bool:
    return str(text or "0").lower() in ("1", "true", "yes", "on")


EFITYPES = ("2m", "4m")
MS_CERTS = ("2011", "2023", "2023w", "2023k")  # qemu-server 9.2.0 Drive.pm %efitype_fmt 'ms-cert'


@dataclass(frozen=True)
class EfiDisk:
    """``efidisk0`` (qemu-server Drive.pm ``$efidisk_fmt``): ``<volume>,efitype=4m,pre-enrolled-keys=1[,ms-cert=..]``.

    ``volume`` is ``<storage>:1`` in a create request (PVE allocates the vars volume and copies its OVMF vars
    template in, ignoring the size) and the allocated volume id once read back. ``efitype`` defaults to 2m and
    ``pre-enrolled-keys`` to 0 in PVE, so a missing key reads as that default. ``ms-cert`` (qemu-server 9.0.27+)
    is the marker of the newest Microsoft UEFI CA set PVE enrolled: 2023k once it holds all 2023 certificates.
    """

    volume: str
    efitype: str = "2m"
    pre_enrolled_keys: bool = False
    ms_cert: str | None = None
    options: tuple[tuple[str, str], ...] = ()  # size=, format=, import-from=: carried, not compared

    @classmethod
    def parse(cls, value: str) -> EfiDisk:
        volume, props = _drive_props("efidisk0", value)
        where = f"efidisk0 {value!r}"
        efitype = _take_enum(props, "efitype", "2m", EFITYPES, where)
        ms_cert = _take_enum(props, "ms-cert", None, MS_CERTS, where)
        keys = _pve_bool(props.pop("pre-enrolled-keys", "0"))
        return cls(volume, efitype, keys, ms_cert, tuple(sorted(props.items())))

    def format(self) -> str:
        props = dict(self.options)
        props["efitype"] = self.efitype
        props["pre-enrolled-keys"] = "1" if self.pre_enrolled_keys else "0"
        if self.ms_cert is not None:
            props["ms-cert"] = self.ms_cert
        return ",".join([self.volume, *(f"{k}={props[k]}" for k in sorted(props))])

    @classmethod
    def imported(cls, storage: str, source: str) -> EfiDisk:
        """A create request for an EFI disk that is a copy of ``source`` (an ``import`` volume): qemu-server's
        create_disks clones it as it is (``qemu-img dd``, the vars template's size), and with import-from both
        ``efitype`` and ``pre-enrolled-keys`` must be given (Qemu.pm check_drive_param). 0: PVE enrols nothing, and
        neither its start warning nor ``qm enroll-efi-keys`` touches the store (OVMF.pm should_enroll_ms_2023_cert)."""
        return cls(f"{storage}:0", "4m", False, None, (("import-from", source),))

    def compare_key(self) -> tuple[str, bool]:
        """What a clone must keep of its template's EFI disk (the volume and ms-cert marker may differ)."""
        return (self.efitype, self.pre_enrolled_keys)


TPM_VERSIONS = ("v1.2", "v2.0")


@dataclass(frozen=True)
class TpmState:
    """``tpmstate0`` (qemu-server Drive.pm ``$tpmstate_fmt``): ``<volume>,version=v2.0``; version defaults to
    v1.2 and can never change after creation (``prohibit_tpm_version_change``)."""

    volume: str
    version: str = "v1.2"
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, value: str) -> TpmState:
        volume, props = _drive_props("tpmstate0", value)
        version = _take_enum(props, "version", "v1.2", TPM_VERSIONS, f"tpmstate0 {value!r}")
        return cls(volume, version, tuple(sorted(props.items())))

    def format(self) -> str:
        props = {**dict(self.options), "version": self.version}
        return ",".join([self.volume, *(f"{k}={props[k]}" for k in sorted(props))])


# qemu-server Machine.pm $machine_fmt 'type' pattern (the same in 8.3.12 and 9.2.0)
MACHINE_TYPE_RE = re.compile(r"(pc|pc(-i440fx)?-\d+(\.\d+)+(\+pve\d+)?(\.pxe)?|q35"
                             r"|pc-q35-\d+(\.\d+)+(\+pve\d+)?(\.pxe)?|virt(?:-\d+(\.\d+)+)?(\+pve\d+)?)")


@dataclass(frozen=True)
class MachineSpec:
    """``machine`` (qemu-server Machine.pm ``$machine_fmt``): ``[type=]<type>[,viommu=..][,enable-s3=..]``.
    No ``machine`` at all is i440fx (``pc``); ``family`` is what a template and its clones must agree on."""

    type: str = "pc"
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, value: object) -> MachineSpec:
        if value in (None, ""):
            return cls()
        props = parse_props(str(value), "type")
        kind = props.pop("type", "pc")
        if not MACHINE_TYPE_RE.fullmatch(kind):
            raise ValueError(f"machine {value!r}: {kind!r} is not a QEMU machine type PVE accepts (pc, q35, "
                             "pc-q35-<version>, ...)")
        return cls(kind, tuple(sorted(props.items())))

    @property
    def family(self) -> str:
        return "q35" if "q35" in self.type else "virt" if self.type.startswith("virt") else "pc"

    def format(self) -> str:
        return ",".join([self.type, *(f"{k}={v}" for k, v in self.options)])
