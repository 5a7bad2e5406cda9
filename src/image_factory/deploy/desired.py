"""The inventory's VM as PVE config, and how a VM's effective config differs from it."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote

from image_factory.deploy.model import FieldDiff
from image_factory.errors import Problem, ValidationFailed
from image_factory.ownership import Marker, marker_block, user_description, with_marker
from image_factory.platform import Platform
from image_factory.pve.codec import (
    EfiDisk,
    MachineSpec,
    NetSpec,
    TpmState,
    format_tags,
    parse_props,
    parse_size,
    parse_tags,
)
from image_factory.pve.templates import TemplateInfo
from image_factory.site.inventory import DataDisk, Hypervisor, Site, StaticIp, StaticIp6, Vm

DISK_KEYS = re.compile(r"^(scsi|virtio|sata|ide)\d+$")
DATA_DISK_KEYS = re.compile(r"^(scsi|virtio|sata)\d+$")


def nic_net(vm: Vm, hv: Hypervisor, index: int) -> NetSpec:
    nic = vm.nics[index]
    opts = {"bridge": nic.bridge or hv.bridge, "firewall": "1" if nic.firewall else "0"}
    if nic.vlan is not None:
        opts["tag"] = str(nic.vlan)
    return NetSpec(nic.model, nic.mac.lower(), tuple(sorted(opts.items())))


def encode_sshkeys(keys: Iterable[str]) -> str:
    """PVE wants the newline-separated keys percent-encoded, spaces as %20 (never '+')."""
    return quote("\n".join(keys), safe="")


def decode_sshkeys(value: str) -> list[str]:
    return [line.strip() for line in unquote(value).splitlines() if line.strip()]


def ipconfig_value(vm: Vm) -> str:
    ip, ip6 = vm.cloudinit.ipconfig, vm.cloudinit.ip6
    value = (f"ip={ip.ip},gw={ip.gw}" if ip.gw else f"ip={ip.ip}") if isinstance(ip, StaticIp) else "ip=dhcp"
    if isinstance(ip6, StaticIp6):
        value += f",ip6={ip6.ip}" + (f",gw6={ip6.gw}" if ip6.gw else "")
    elif ip6 is not None:
        value += f",ip6={ip6}"  # auto (SLAAC) or dhcp (DHCPv6)
    return value


def cicustom_value(vm: Vm, hv: Hypervisor) -> str | None:
    """``vendor=<snippets storage>:snippets/<content-named file>``, or None without vendor data."""
    vendor = vm.cloudinit.vendor
    if vendor is None or hv.storage.snippets is None:
        return None
    return f"vendor={vendor.volume(hv.storage.snippets)}"


DISK_FLAGS = ("discard", "iothread", "ssd")  # the drive options the inventory sets on a data disk


def _flag_on(value: str | None) -> bool:
    return str(value).lower() in ("1", "on", "yes", "true")


def disk_options(disk: DataDisk) -> dict[str, str]:
    """The data disk's options as PVE writes them (discard=on, booleans as 1); unset ones are left out."""
    opts = {"discard": "on"} if disk.discard else {}
    opts.update({o: "1" for o in ("iothread", "ssd") if getattr(disk, o)})
    return opts


def new_disk_value(disk: DataDisk, hv: Hypervisor) -> str:
    """``<storage>:<GiB>,...``: PVE allocates a new volume of that size."""
    opts = disk_options(disk)
    return ",".join([f"{disk.storage or hv.storage.images}:{disk.size_gb}", *(f"{k}={opts[k]}" for k in sorted(opts))])


def disk_update_value(disk: DataDisk, current: str) -> str:
    """The existing volume with the inventory's options (its size and other options kept as PVE has them)."""
    props = parse_props(current, "file")
    volume = props.pop("file")
    for flag in DISK_FLAGS:
        props.pop(flag, None)
    props.update(disk_options(disk))
    return ",".join([volume, *(f"{k}={props[k]}" for k in sorted(props))])


def is_cdrom(value: object) -> bool:
    props = parse_props(str(value), "file")
    return props.get("media") == "cdrom" or "cloudinit" in props.get("file", "")



def describe(vm: Vm, template: TemplateInfo, run_id: str, *, incomplete: bool = False) -> str:
    """The inventory's description followed by the factory's sealed marker block (ownership.py)."""
    block = marker_block(vm_name=vm.name, vmid=vm.vmid, template=template.name, template_vmid=template.vmid,
                         run_id=run_id, incomplete=incomplete, template_digest=template.digest)
    return with_marker(vm.description, block)



def select_vms(site: Site, names: Iterable[str] | None = None, *, plane: str | None = None) -> list[Vm]:
    """The VMs to act on, in inventory order; unknown names and a plane mismatch are errors."""
    wanted = [n for n in (names or []) if n]
    if plane is not None and plane not in ("mgmt", "tenant"):
        raise ValidationFailed([Problem(str(site.inventory_path), "", "--plane", f"unknown plane {plane!r}")])
    unknown = [n for n in wanted if n not in site.vms]
    if unknown:
        raise ValidationFailed(
            Problem(str(site.inventory_path), n, "", f"no such VM in the inventory (have: {', '.join(site.vms)})")
            for n in unknown
        )
    vms = [site.vms[n] for n in dict.fromkeys(wanted)] if wanted else list(site.vms.values())
    if plane is not None:
        if wanted:
            other = [v.name for v in vms if v.plane != plane]
            if other:
                raise ValidationFailed(
                    Problem(str(site.inventory_path), n, "vm.plane", f"is not a {plane} VM") for n in other
                )
        vms = [v for v in vms if v.plane == plane]
    return vms


def check_placement(site: Site, vms: Iterable[Vm]) -> None:
    """Re-assert the placement rules per VM before any API call (load_site checked them too)."""
    problems = []
    for vm in vms:
        where = site.vm_sources.get(vm.name, str(site.inventory_path))
        hosts = site.candidates(vm)
        if not hosts:
            problems.append(Problem(where, vm.name, "vm.hypervisor",
                                    f"refused: no {vm.plane} hypervisor's vm_vmids hold VMID {vm.vmid} "
                                    "(nothing was sent to any hypervisor)"))
        for hv in hosts:
            if hv.role != vm.plane:
                problems.append(Problem(
                    where, vm.name, "vm.hypervisor",
                    f"refused: {vm.plane} VMs may only run on the {vm.plane} hypervisors, but {hv.name} has role "
                    f"{hv.role} (nothing was sent to any hypervisor)",
                ))
            elif vm.vmid not in hv.vm_vmids:
                problems.append(Problem(
                    where, vm.name, "vm.vmid",
                    f"refused: {vm.vmid} is outside {hv.name}'s vm_vmids {hv.vm_vmids.first}-{hv.vm_vmids.last}",
                ))
    if problems:
        raise ValidationFailed(problems)


def desired_config(vm: Vm, hv: Hypervisor, template: TemplateInfo, run_id: str) -> dict[str, str]:
    """The one config update written after the clone (strings as PVE takes them)."""
    cfg: dict[str, str] = {}
    for i in range(len(vm.nics)):
        cfg[f"net{i}"] = nic_net(vm, hv, i).format()
    cfg["name"] = vm.name
    if vm.cpu is not None:
        cfg["cpu"] = vm.cpu
    for disk in vm.disks:
        cfg[disk.slot] = new_disk_value(disk, hv)
    cfg["cores"] = str(vm.cores)
    cfg["memory"] = str(vm.memory)
    ci = vm.cloudinit
    cfg["ciuser"] = ci.user
    if ci.ssh_keys:
        cfg["sshkeys"] = encode_sshkeys(ci.ssh_keys)
    cfg["ipconfig0"] = ipconfig_value(vm)
    if ci.nameserver:
        cfg["nameserver"] = ci.nameserver
    if ci.searchdomain:
        cfg["searchdomain"] = ci.searchdomain
    cfg["ciupgrade"] = "1" if ci.upgrade else "0"
    cicustom = cicustom_value(vm, hv)
    if cicustom is not None:
        cfg["cicustom"] = cicustom
    cfg["tags"] = format_tags(vm.all_tags)
    cfg["description"] = describe(vm, template, run_id)
    return cfg


def boot_disk(config: Mapping[str, Any]) -> tuple[str, int] | None:
    """(key, size in bytes) of the VM's boot disk: first in ``boot: order=``, else scsi0/virtio0/sata0/ide0."""
    order = parse_props(str(config.get("boot", "")), "legacy").get("order", "")
    candidates = [k for k in order.split(";") if DISK_KEYS.match(k)]
    candidates += [k for k in ("scsi0", "virtio0", "sata0", "ide0") if k not in candidates]
    for key in candidates:
        value = config.get(key)
        if not value:
            continue
        props = parse_props(str(value), "file")
        if props.get("media") == "cdrom" or "cloudinit" in props.get("file", ""):
            continue
        try:
            return key, parse_size(props.get("size", "0"))
        except ValueError:
            return key, 0
    return None



UNSAFE_NIC_KEYS = frozenset({"tag", "bridge"})


def compare(vm: Vm, hv: Hypervisor, template: TemplateInfo | None, config: Mapping[str, Any]) -> list[FieldDiff]:
    """Differences between the VM's effective config and the inventory; ``safe`` ones a config update fixes."""
    return [*_nic_diffs(vm, hv, config), *_scalar_diffs(vm, hv, config), *compare_disks(vm, hv, config),
            *_boot_size_diffs(vm, config), *_lineage_diffs(vm, template, config)]


def _nic_diffs(vm: Vm, hv: Hypervisor, config: Mapping[str, Any]) -> list[FieldDiff]:
    """The inventory's NICs against the VM's netN: a NIC on another VLAN or bridge is reported, never moved."""
    diffs: list[FieldDiff] = []
    for i in range(len(vm.nics)):
        want = nic_net(vm, hv, i)
        have_raw = config.get(f"net{i}")
        if have_raw is None:
            diffs.append(FieldDiff(f"net{i}", None, want.format(), True))
            continue
        try:
            have = NetSpec.parse(str(have_raw))
        except ValueError:
            diffs.append(FieldDiff(f"net{i}", have_raw, want.format(), True))
            continue
        if (have.mac or "").lower() != (want.mac or "").lower():
            diffs.append(FieldDiff(f"net{i}.mac", have.mac, want.mac, True))
        if have.model != want.model:
            diffs.append(FieldDiff(f"net{i}.model", have.model, want.model, True))
        have_opts, want_opts = have.opts, want.opts
        have_opts.setdefault("firewall", "0")
        for key in sorted(set(have_opts) | set(want_opts)):
            if have_opts.get(key) != want_opts.get(key):
                # A NIC on another VLAN or bridge is on another network (another tenant's, maybe): reported,
                # never moved by a config update.
                diffs.append(FieldDiff(f"net{i}.{key}", have_opts.get(key), want_opts.get(key),
                                       key not in UNSAFE_NIC_KEYS))
    nets = sorted((k for k in config if re.fullmatch(r"net\d+", k)), key=lambda k: int(k[3:]))
    diffs += [FieldDiff(key, config[key], None, True) for key in nets if int(key[3:]) >= len(vm.nics)]
    return diffs


def _scalar_diffs(vm: Vm, hv: Hypervisor, config: Mapping[str, Any]) -> list[FieldDiff]:
    """Name, size, cloud-init, tags and CPU type: every difference a config update corrects."""
    diffs: list[FieldDiff] = []
    for key, want_v in (("name", vm.name), ("cores", str(vm.cores)), ("memory", str(vm.memory))):
        have_v = config.get(key)
        if have_v is None and key == "cores":
            have_v = "1"
        if str(have_v) != want_v:
            diffs.append(FieldDiff(key, have_v, want_v, True))
    ci = vm.cloudinit
    scalar = {
        "ciuser": ci.user, "nameserver": ci.nameserver, "searchdomain": ci.searchdomain,
        "ciupgrade": "1" if ci.upgrade else "0",
    }
    for key, want_s in scalar.items():
        have_s = config.get(key)
        if key == "ciupgrade" and have_s is None:
            have_s = "1"  # PVE's default
        if (None if have_s in (None, "") else str(have_s)) != want_s:
            diffs.append(FieldDiff(key, have_s, want_s, True))
    if decode_sshkeys(str(config.get("sshkeys", ""))) != list(ci.ssh_keys):
        diffs.append(FieldDiff("sshkeys", decode_sshkeys(str(config.get("sshkeys", ""))), list(ci.ssh_keys), True))
    have_ip = parse_props(str(config.get("ipconfig0", "")))
    if have_ip != parse_props(ipconfig_value(vm)):
        diffs.append(FieldDiff("ipconfig0", config.get("ipconfig0"), ipconfig_value(vm), True))
    have_tags, want_tags = parse_tags(config.get("tags")), parse_tags(vm.all_tags)
    if have_tags != want_tags:
        diffs.append(FieldDiff("tags", have_tags, want_tags, True))
    if vm.cpu is not None:
        have_cpu = parse_props(str(config.get("cpu") or ""), "cputype").get("cputype")
        if have_cpu != vm.cpu:
            diffs.append(FieldDiff("cpu", have_cpu, vm.cpu, True))
    want_ci = cicustom_value(vm, hv)
    have_ci = config.get("cicustom") or None
    if (parse_props(str(have_ci)) if have_ci else None) != (parse_props(want_ci) if want_ci else None):
        diffs.append(FieldDiff("cicustom", have_ci, want_ci, True))
    return diffs


def _boot_size_diffs(vm: Vm, config: Mapping[str, Any]) -> list[FieldDiff]:
    """A boot disk smaller than the inventory's is grown (safe); a larger one is reported, never shrunk."""
    disk = boot_disk(config)
    want_bytes = vm.disk_gb * 1024**3
    if disk is not None and disk[1] < want_bytes:
        return [FieldDiff(f"{disk[0]}.size", _gib(disk[1]), f"{vm.disk_gb}G", True)]
    if disk is not None and disk[1] > want_bytes:
        return [FieldDiff(f"{disk[0]}.size", _gib(disk[1]), f"{vm.disk_gb}G (shrink: never done)", False)]
    return []


def _lineage_diffs(vm: Vm, template: TemplateInfo | None, config: Mapping[str, Any]) -> list[FieldDiff]:
    """The template the marker names (and the firmware it recorded), else the description and its seal."""
    marker = Marker.parse(config.get("description"), vm.vmid)
    same = template is not None and (marker.template, marker.template_vmid) == (template.name, template.vmid)
    if template is not None and same:
        diffs = firmware_diffs(template, config)
    elif template is not None:
        have_t = f"{marker.template} ({marker.template_vmid})" if marker.template else None
        return [FieldDiff("template", have_t, f"{template.name} ({template.vmid})", False)]
    else:
        diffs = []
    if user_description(config.get("description")) != vm.description.strip() or not marker.sealed:
        diffs.append(FieldDiff("description", "(differs)", "(inventory description + sealed marker)", True))
    return diffs


def firmware_diffs(template: TemplateInfo, config: Mapping[str, Any]) -> list[FieldDiff]:
    """How a clone's firmware differs from what its template's description records (nothing for templates
    published before it was recorded). A clone inherits bios, machine, efidisk0 and tpmstate0; none of them
    is safe to change in place (new EFI vars lose the enrolled keys and boot entries, a TPM's state and
    version are for good), so every difference is reported, never corrected."""
    want = Platform.parse(template.firmware)
    if want is None:
        return []
    diffs: list[FieldDiff] = []
    have_bios = str(config.get("bios") or "seabios")
    want_bios = "ovmf" if want.firmware == "uefi" else "seabios"
    if have_bios != want_bios:
        diffs.append(FieldDiff("bios", have_bios, want_bios, False))
    try:
        have_machine = MachineSpec.parse(config.get("machine")).family
    except ValueError:
        have_machine = str(config.get("machine"))
    if have_machine != want.machine:
        diffs.append(FieldDiff("machine", have_machine, want.machine, False))
    if want.firmware == "uefi":
        diffs += _drive_diff("efidisk0", config, _efi_key, ("4m", want.pre_enrolled_keys))
    diffs += _drive_diff("tpmstate0", config, _tpm_key, "v2.0" if want.tpm else None)
    return diffs


def _efi_key(value: str) -> object:
    efi = EfiDisk.parse(value)
    return (efi.efitype, efi.pre_enrolled_keys)


def _tpm_key(value: str) -> object:
    return TpmState.parse(value).version


def _drive_diff(key: str, config: Mapping[str, Any], read: Any, want: object) -> list[FieldDiff]:
    raw = config.get(key)
    try:
        have = read(str(raw)) if raw else None
    except ValueError:
        have = f"unreadable: {raw}"
    return [] if have == want else [FieldDiff(key, have, want, False)]


def _gib(n: int) -> str:
    return f"{n / 1024**3:g}G"


def compare_disks(vm: Vm, hv: Hypervisor, config: Mapping[str, Any]) -> list[FieldDiff]:
    """The inventory's data disks against the VM's drives: a missing disk is created, a small one grown, options
    set (safe); a larger disk, one on another storage, a slot holding something else, and a data disk the inventory
    no longer lists are reported, never shrunk, moved or removed."""
    diffs: list[FieldDiff] = []
    boot = boot_disk(config)
    wanted = {d.slot for d in vm.disks}
    for disk in vm.disks:
        have = config.get(disk.slot)
        want = new_disk_value(disk, hv)
        if not have:
            diffs.append(FieldDiff(disk.slot, None, want, True))
            continue
        if is_cdrom(have) or (boot is not None and boot[0] == disk.slot):
            diffs.append(FieldDiff(disk.slot, have, f"{want} (the slot holds another drive: not replaced)", False))
            continue
        props = parse_props(str(have), "file")
        storage, want_storage = props["file"].split(":", 1)[0], disk.storage or hv.storage.images
        if storage != want_storage:
            diffs.append(FieldDiff(f"{disk.slot}.storage", storage, f"{want_storage} (moving a disk: never done)",
                                   False))
        try:
            size = parse_size(props.get("size", "0"))
        except ValueError:
            size = 0
        if size < disk.size_gb * 1024**3:
            diffs.append(FieldDiff(f"{disk.slot}.size", _gib(size), f"{disk.size_gb}G", True))
        elif size > disk.size_gb * 1024**3:
            diffs.append(FieldDiff(f"{disk.slot}.size", _gib(size), f"{disk.size_gb}G (shrink: never done)", False))
        want_opts = disk_options(disk)
        for flag in DISK_FLAGS:
            if _flag_on(props.get(flag)) != (flag in want_opts):
                diffs.append(FieldDiff(f"{disk.slot}.{flag}", props.get(flag), want_opts.get(flag), True))
    for key in sorted(config):
        if (DATA_DISK_KEYS.match(key) and key not in wanted and (boot is None or key != boot[0])
                and not is_cdrom(config[key])):
            diffs.append(FieldDiff(key, config[key], "(not in the inventory: kept, never removed by deploy)", False))
    return diffs
