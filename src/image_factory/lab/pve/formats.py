"""Each node's own property-string formats: the sub-keys of every VM option the factory sends, by qemu-server.

fakepve checks a value against the newest schema; a real node knows only the sub-keys its own qemu-server
defines, and PVE::JSONSchema::parse_property_string refuses any other ("invalid key in comma-separated list
property: <key>", a 400 before the handler runs). Read from qemu-server's format hashes at 8.3.12 (a411016f),
9.1.15 (6785065b) and 9.2.0 (b69480d6), each change dated by the release that first shipped it
(docs/pve-facts.md, "Property strings by version").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from image_factory.lab.pve.props import (
    PropertyFormat,
    PropertyStringError,
    parse_property_string,
    print_property_string,
)

Version = tuple[int, ...]
ALWAYS: Version = (0,)


@dataclass(frozen=True)
class VersionedFormat:
    """One format through qemu-server's releases: ``keys`` maps each sub-key to the release that added it and
    the one that dropped it (None: still there); ``aliases`` each alias to its target and the release that made
    it one (before that, a key of its own or unknown); ``booleans`` its keys of type boolean."""

    keys: dict[str, tuple[Version, Version | None]]
    default_key: str | None = None
    aliases: dict[str, tuple[str, Version]] = field(default_factory=dict)
    key_aliases: dict[str, str] = field(default_factory=dict)
    booleans: frozenset[str] = frozenset()

    def at(self, qemu_server: Version) -> PropertyFormat:
        """The format as this qemu-server release defines it."""
        keys = {k for k, (since, gone) in self.keys.items() if since <= qemu_server and (gone is None or
                                                                                          qemu_server < gone)}
        aliases = {a: target for a, (target, since) in self.aliases.items() if since <= qemu_server}
        return PropertyFormat(frozenset(keys - set(aliases)), self.default_key, aliases,
                              {a: t for a, t in self.key_aliases.items() if a in aliases},
                              frozenset(self.booleans & (keys - set(aliases))))


def _keys(names: str, since: Version = ALWAYS, gone: Version | None = None) -> dict[str, tuple[Version,
                                                                                               Version | None]]:
    return dict.fromkeys(names.split(), (since, gone))


# Drive.pm %drivedesc_base (with its $add_throttle_desc keys) and %import_from_fmt, the same in every release
# but for the geometry options, dropped in 9.0.1 (bb614783, "drive: remove geometry options gone since QEMU 3.1").
_DRIVE_BASE = _keys(
    "file media snapshot cache format size backup replicate rerror werror aio discard detect_zeroes serial shared "
    "import-from bps bps_rd bps_wr mbps mbps_rd mbps_wr iops iops_rd iops_wr mbps_max mbps_rd_max mbps_wr_max "
    "iops_max iops_rd_max iops_wr_max bps_max_length bps_rd_max_length bps_wr_max_length iops_max_length "
    "iops_rd_max_length iops_wr_max_length") | _keys("cyls heads secs trans", ALWAYS, (9, 0, 1))
_DRIVE_ALIASES = {"volume": ("file", ALWAYS), "bps_rd_length": ("bps_rd_max_length", ALWAYS),
                  "bps_wr_length": ("bps_wr_max_length", ALWAYS), "iops_rd_length": ("iops_rd_max_length", ALWAYS),
                  "iops_wr_length": ("iops_wr_max_length", ALWAYS)}
_VOLUME_ALIAS = {"volume": ("file", ALWAYS)}
# Network.pm (QemuServer.pm in 8.3.12) $nic_model_list: each model is also a key, `virtio=<mac>`
NIC_MODELS = ("e1000", "e1000-82540em", "e1000-82544gc", "e1000-82545em", "e1000e", "i82551", "i82557b", "i82559er",
              "ne2k_isa", "ne2k_pci", "pcnet", "rtl8139", "virtio", "vmxnet3")


_DRIVE_BOOLEANS = "backup detect_zeroes replicate shared snapshot iothread ro scsiblock ssd"


def _drive(extra: str) -> VersionedFormat:
    return VersionedFormat(_DRIVE_BASE | _keys(extra), "file", _DRIVE_ALIASES,
                           booleans=frozenset(_DRIVE_BOOLEANS.split()))


FORMATS: dict[str, VersionedFormat] = {
    # Network.pm $net_fmt; host-tunnel from 9.1.18 (c180ff75)
    "net": VersionedFormat(_keys("model macaddr bridge queues rate tag trunks firewall link_down mtu")
                           | _keys("host-tunnel", (9, 1, 18)), "model",
                           {m: ("macaddr", ALWAYS) for m in NIC_MODELS}, dict.fromkeys(NIC_MODELS, "model"),
                           frozenset({"firewall", "link_down", "host-tunnel"})),
    "ipconfig": VersionedFormat(_keys("ip gw ip6 gw6")),  # Network.pm $ipconfig_fmt
    # Drive.pm $ide_fmt, $sata_fmt, $scsi_fmt, $virtio_fmt (the *_with_alloc variants create and update take)
    "ide": _drive("model ssd wwn"),
    "sata": _drive("ssd wwn"),
    "scsi": _drive("iothread product queues ro scsiblock ssd vendor wwn"),
    "virtio": _drive("iothread ro"),
    # Drive.pm $efidisk_fmt: ms-cert from 9.0.27 (c5b3a314); $tpmstate_fmt: format from 9.0.26 (64880b4d)
    "efidisk": VersionedFormat(_keys("file size format efitype pre-enrolled-keys import-from")
                               | _keys("ms-cert", (9, 0, 27)), "file", _VOLUME_ALIAS,
                               booleans=frozenset({"pre-enrolled-keys"})),
    "tpmstate": VersionedFormat(_keys("file size version import-from") | _keys("format", (9, 0, 26)), "file",
                                _VOLUME_ALIAS),
    # Agent.pm $agent_fmt: guest-fsfreeze from 9.1.5 (fcc2dc56); 9.1.6 (b701115d) renamed it freeze-fs and made
    # it and freeze-fs-on-backup aliases of freeze-fs
    "agent": VersionedFormat(_keys("enabled fstrim_cloned_disks type")
                             | _keys("freeze-fs-on-backup", ALWAYS, (9, 1, 6))
                             | _keys("guest-fsfreeze", (9, 1, 5), (9, 1, 6)) | _keys("freeze-fs", (9, 1, 6)),
                             "enabled", {"freeze-fs-on-backup": ("freeze-fs", (9, 1, 6)),
                                         "guest-fsfreeze": ("freeze-fs", (9, 1, 6))},
                             booleans=frozenset({"enabled", "fstrim_cloned_disks", "freeze-fs-on-backup",
                                                 "guest-fsfreeze", "freeze-fs"})),
    # CPUConfig.pm $cpu_fmt (pve-vm-cpu-conf): guest-phys-bits from 9.0.18 (2f3c741b), level from 9.1.14 (82f0c412)
    "cpu": VersionedFormat(_keys("cputype reported-model hidden hv-vendor-id flags phys-bits")
                           | _keys("guest-phys-bits", (9, 0, 18)) | _keys("level", (9, 1, 14)), "cputype",
                           booleans=frozenset({"hidden"})),
    # Machine.pm $machine_fmt: aw-bits from 9.0.21 (dc52c006)
    "machine": VersionedFormat(_keys("type viommu enable-s3 enable-s4") | _keys("aw-bits", (9, 0, 21)), "type",
                               booleans=frozenset({"enable-s3", "enable-s4"})),
    "boot": VersionedFormat(_keys("legacy order"), "legacy"),  # QemuServer.pm $boot_fmt
    "vga": VersionedFormat(_keys("type memory clipboard"), "type"),  # QemuServer.pm $vga_fmt
    "cicustom": VersionedFormat(_keys("meta network user vendor")),  # QemuServer.pm $cicustom_fmt
}
_OPTION = re.compile(r"(net|ipconfig|ide|sata|scsi|virtio)\d+|(efidisk|tpmstate)0"
                     r"|(agent|cpu|machine|boot|vga|cicustom)")


def format_of(option: str) -> str | None:
    """The format name of a VM option the table covers (net0 -> net), else None."""
    found = _OPTION.fullmatch(option)
    return next((group for group in found.groups() if group), None) if found else None


def check_property_strings(values: dict[str, Any], qemu_server: Version, pve_common: Version) -> dict[str, str]:
    """Each covered option's value parsed with this node's own format: {option: PVE's 400 text} for those it
    refuses. pve-common 9.1.9+ (5d84387) also refuses a key given both directly and through an alias."""
    errors: dict[str, str] = {}
    for option, value in values.items():
        name = format_of(option)
        if name is None or value is None or value == "":
            continue
        try:
            _parse(name, str(value), qemu_server, pve_common)
        except PropertyStringError as refused:
            errors[option] = f"invalid format - {refused}"
    return errors


def _parse(name: str, value: str, qemu_server: Version, pve_common: Version) -> dict[str, str]:
    """pve-common 9.0.12+ (ac547b8) reads a bare boolean default key as a boolean; 9.1.9+ (5d84387) refuses a key
    given both directly and through an alias."""
    return parse_property_string(value, FORMATS[name].at(qemu_server), alias_conflicts=pve_common >= (9, 1, 9),
                                 boolean_default=pve_common >= (9, 0, 12))


DRIVES = frozenset({"ide", "sata", "scsi", "virtio", "efidisk", "tpmstate"})


def reprinted_drives(values: dict[str, Any], qemu_server: Version, pve_common: Version) -> dict[str, str]:
    """Each drive option of a create or config request as qemu-server stores it (check_drive_param's print_drive:
    the volume first, the other keys sorted, booleans as 1 or 0), whatever order the caller wrote it in. Only for
    values this node's format already accepted (check_property_strings)."""
    out: dict[str, str] = {}
    for option, value in values.items():
        name = format_of(option)
        if name in DRIVES and value not in (None, ""):
            out[option] = print_property_string(_parse(name, str(value), qemu_server, pve_common),
                                                FORMATS[name].at(qemu_server))
    return out
