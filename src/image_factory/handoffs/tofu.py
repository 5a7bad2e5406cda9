"""A tenant's VMs as an OpenTofu/Terraform configuration (JSON syntax) for the bpg/proxmox provider.

The hand-off for teams that run their tenant's lifecycle declaratively: one directory per tenant, written from
the same deploy plan `invoke deploy.plan` shows (so the two cannot disagree), holding:

- the provider pinned to a tested minor release (:data:`PROVIDER_CONSTRAINT`), one alias per hypervisor that
  holds the tenant's VMs (``proxmox.<hypervisor>``), each with its own token variable: the token id is the
  inventory's, the secret comes from ``TF_VAR_<hypervisor>_api_token_secret``, never from the file; TLS is
  verified (``insecure = false``: the provider has no CA-file or fingerprint option, so the node's CA must be in
  the system's trust store, docs/tenants.md);
- one ``proxmox_virtual_environment_vm`` per tenant VM, cloning the template the plan chose (the host's newest
  tested one, or the pinned one) by VMID, with the inventory's MACs, the tenant's VLAN, sizes and cloud-init, and
  every hardware attribute the provider would otherwise default (:data:`HARDWARE`), taken from the config the VM
  has (a VM the factory made) or will inherit (the template's); ``lifecycle.ignore_changes = ["clone"]``: a newer
  template must never replace a running VM;
- an ``import`` block for every VM the factory already made (``<node>/<vmid>``, the provider's import id), so
  adopting Tofu replaces nothing and, the attributes being what the provider reads back, updates nothing but the
  description (the factory's marker goes: the VM is Tofu's from then on) and the provider's own
  ``reboot_after_update`` (false: a later change that needs a restart fails instead of restarting a tenant VM).

The attribute names, and what the provider reads back for a key PVE leaves unset, are those of the resource's
source at the pinned version (proxmoxtf/resource/vm/vm.go in bpg/terraform-provider-proxmox); tests/data/ holds
the schema derived from that source and the script that derives it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from image_factory.errors import FactoryError, Problem, RemoteError, ValidationFailed
from image_factory.handoffs.output import write_output
from image_factory.pve.client import PveClient
from image_factory.pve.codec import drive_volume, parse_props, volume_storage
from image_factory.site.inventory import Hypervisor, Site, StaticIp, StaticIp6, Vm

PROVIDER_SOURCE = "bpg/proxmox"
PROVIDER_VERSION = "0.111.1"  # the release the read-back rules below were checked against
PROVIDER_CONSTRAINT = f"~> {PROVIDER_VERSION}"  # its patch releases, never the next minor
RESOURCE = "proxmox_virtual_environment_vm"
BOOT_DISK = "scsi0"  # the factory's templates import their disk as scsi0 (publish)
# The plan's actions for a VM that exists on its host (made by the factory): Tofu imports it.
EXISTING = ("in-sync", "drift", "recreate")
SERIAL_PORTS = 4

Config = Mapping[str, Any]


class PlannedVm(Protocol):
    """What the hand-off reads of one VM's deploy plan: its host and VMID, the template it clones, the plan's action
    and whether deploy refuses it. deploy's VmPlan has this shape; the hand-off sits below deploy (a stage) and takes
    the plan through this protocol rather than importing it."""

    @property
    def vm(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def vmid(self) -> int: ...

    @property
    def action(self) -> str: ...

    @property
    def reason(self) -> str: ...

    @property
    def template_vmid(self) -> int | None: ...

    @property
    def template_node(self) -> str: ...  # "" unless a cluster's template on another node is cloned

    @property
    def blocked(self) -> bool: ...


class Plan(Protocol):
    """A deploy plan as the hand-off reads it (deploy's DeployPlan): one PlannedVm per VM it covers."""

    @property
    def vms(self) -> Sequence[PlannedVm]: ...


def _storage(drive: object) -> str:
    """The storage of a drive value's volume (``file=`` may stand anywhere in it: PVE keeps what it was given)."""
    return volume_storage(drive_volume(drive) or "") or ""


def _flag(value: object, default: bool) -> bool:
    return default if value in (None, "") else str(value) == "1"


def _unless_default(block: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any] | None:
    """The provider leaves a block out of the state of an imported VM when every value it reads is its default:
    writing it then would plan an update (cpu, memory, agent, vga: vmReadCustom's "differs from dv*" rule)."""
    return None if all(block.get(k) == v for k, v in defaults.items()) else block


# What the provider reads back from a VM's config, per attribute: the value a key PVE leaves unset reads as is
# the one in vmReadCustom/vmReadPrimitiveValues at PROVIDER_VERSION (not always PVE's own default: an unset
# `cpu` reads as qemu64, an unset `onboot` as false).
def _keyboard(cfg: Config, vm: Vm) -> Any:
    return cfg.get("keyboard") or "en-us"


def _on_boot(cfg: Config, vm: Vm) -> Any:
    return _flag(cfg.get("onboot"), False)


def _bios(cfg: Config, vm: Vm) -> Any:
    return cfg.get("bios") or "seabios"


def _machine(cfg: Config, vm: Vm) -> Any:
    return cfg.get("machine") or ""


def _scsi_hardware(cfg: Config, vm: Vm) -> Any:
    return cfg.get("scsihw") or "lsi"  # PVE's default; the provider keeps no value of its own for an unset one


def _operating_system(cfg: Config, vm: Vm) -> Any:
    # An unset ostype reads as "", which no argument can say: PVE's default is written instead (the factory's
    # templates always set it).
    return {"type": cfg.get("ostype") or "other"}


def _agent(cfg: Config, vm: Vm) -> Any:
    if not cfg.get("agent"):
        return None
    props = parse_props(str(cfg["agent"]), "enabled")
    return _unless_default(
        {"enabled": _flag(props.get("enabled"), False), "trim": _flag(props.get("fstrim_cloned_disks"), False),
         "type": props.get("type") or "virtio"},
        {"enabled": False, "trim": False, "type": "virtio"})


def _cpu(cfg: Config, vm: Vm) -> Any:
    cputype = vm.cpu or parse_props(str(cfg.get("cpu") or ""), "cputype").get("cputype") or "qemu64"
    block: dict[str, Any] = {"cores": vm.cores, "sockets": int(cfg.get("sockets") or 1), "type": cputype}
    if cfg.get("cpuunits"):  # the provider reads an unset one as 0, which it refuses as an argument: left out
        block["units"] = int(cfg["cpuunits"])
    return _unless_default(block, {"cores": 1, "sockets": 1, "type": "qemu64", "units": None})


def _memory(cfg: Config, vm: Vm) -> Any:
    return _unless_default({"dedicated": vm.memory, "floating": int(cfg.get("balloon") or 0)},
                           {"dedicated": 512, "floating": 0})


def _serial_device(cfg: Config, vm: Vm) -> Any:
    ports = [cfg.get(f"serial{i}") for i in range(SERIAL_PORTS)]
    last = max((i for i, p in enumerate(ports) if p), default=-1)
    return [{"device": str(p or "")} for p in ports[:last + 1]] or None


def _vga(cfg: Config, vm: Vm) -> Any:
    if not cfg.get("vga"):
        return None
    props = parse_props(str(cfg["vga"]), "type")
    return _unless_default(
        {"type": props.get("type") or "std", "memory": int(props.get("memory") or 16),
         "clipboard": props.get("clipboard", "")},
        {"type": "std", "memory": 16, "clipboard": ""})


def _efi_disk(cfg: Config, vm: Vm) -> Any:
    if not cfg.get("efidisk0"):
        return None
    props = parse_props(str(cfg["efidisk0"]), "file")
    block: dict[str, Any] = {"datastore_id": _storage(cfg["efidisk0"]), "type": props.get("efitype") or "2m",
                             "pre_enrolled_keys": _flag(props.get("pre-enrolled-keys"), False)}
    if props.get("format"):
        block["file_format"] = props["format"]
    # Left out only where the provider leaves it out too (its defaults, on LVM-thin where the format is raw);
    # anywhere else it is in the state, and an EFI disk missing from the configuration would be removed.
    return _unless_default(block, {"datastore_id": "local-lvm", "type": "2m", "pre_enrolled_keys": False})


def _tpm_state(cfg: Config, vm: Vm) -> Any:
    if not cfg.get("tpmstate0"):
        return None
    props = parse_props(str(cfg["tpmstate0"]), "file")
    return _unless_default({"datastore_id": _storage(cfg["tpmstate0"]), "version": props.get("version") or "v2.0"},
                           {"datastore_id": "local-lvm", "version": "v2.0"})


# provider attribute -> its value for a VM whose config (its own, or the template's it will inherit) is given;
# None: the attribute stays out (the provider reads nothing for it either).
HARDWARE: dict[str, Callable[[Config, Vm], Any]] = {
    "keyboard_layout": _keyboard,
    "on_boot": _on_boot,
    "bios": _bios,
    "machine": _machine,
    "scsi_hardware": _scsi_hardware,
    "operating_system": _operating_system,
    "agent": _agent,
    "cpu": _cpu,
    "memory": _memory,
    "serial_device": _serial_device,
    "vga": _vga,
    "efi_disk": _efi_disk,
    "tpm_state": _tpm_state,
}


def hardware(cfg: Config, vm: Vm) -> dict[str, Any]:
    """The hardware attributes of a VM with config ``cfg`` (cores and memory from the inventory, as deploy
    writes them)."""
    values = {name: read(cfg, vm) for name, read in HARDWARE.items()}
    return {name: value for name, value in values.items() if value is not None}


def _ipv4(vm: Vm) -> dict[str, str]:
    ip = vm.cloudinit.ipconfig
    if isinstance(ip, StaticIp):
        return {"address": ip.ip, **({"gateway": ip.gw} if ip.gw else {})}
    return {"address": "dhcp"}


def _ip_config(vm: Vm) -> dict[str, Any]:
    """NIC 0's ipconfig: the provider passes an ipv6 address through as ip6= (so auto and dhcp as PVE takes them)."""
    ip6 = vm.cloudinit.ip6
    block: dict[str, Any] = {"ipv4": _ipv4(vm)}
    if isinstance(ip6, StaticIp6):
        block["ipv6"] = {"address": ip6.ip, **({"gateway": ip6.gw} if ip6.gw else {})}
    elif ip6 is not None:
        block["ipv6"] = {"address": ip6}
    return block


def _data_disks(vm: Vm, hv: Hypervisor) -> list[dict[str, Any]]:
    """The inventory's data disks as the provider reads them back (discard "ignore" and false flags when unset)."""
    return [{"interface": d.slot, "datastore_id": d.storage or hv.storage.images, "size": d.size_gb,
             "discard": "on" if d.discard else "ignore", "iothread": d.iothread, "ssd": d.ssd} for d in vm.disks]


def _ident(name: str) -> str:
    """A hypervisor's name as a Terraform identifier (provider alias, variable name)."""
    ident = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    return ident if re.match(r"[A-Za-z_]", ident) else f"_{ident}"


def token_variable(hv: Hypervisor) -> str:
    return f"{_ident(hv.name).replace('-', '_')}_api_token_secret"


def vm_resource(vm: Vm, hv: Hypervisor, plan: PlannedVm, base: Config) -> dict[str, Any]:
    """One VM as the provider's resource: the same values deploy writes (deploy/desired.py) on the hardware
    ``base`` holds (the VM's own config, or its template's). The MAC in deploy's case (upper, NetSpec.format):
    PVE keeps the case it is given and the provider compares the strings."""
    ci = vm.cloudinit
    # the template's cloud-init drive: ide2, or a SCSI slot on a q35 template (publish.CLOUDINIT_SCSI)
    ci_drive = next((k for k, v in sorted(base.items()) if re.fullmatch(r"(ide|scsi|sata)\d+", k)
                     and "cloudinit" in str(v)), "ide2")
    initialization: dict[str, Any] = {
        "datastore_id": (_storage(base[ci_drive]) if base.get(ci_drive) else "") or hv.storage.cloudinit,
        **({"interface": ci_drive} if ci_drive != "ide2" else {}),
        "ip_config": [_ip_config(vm)],
        "user_account": {"username": ci.user, "keys": list(ci.ssh_keys)},
        "upgrade": ci.upgrade,
    }
    dns = {k: v for k, v in (("domain", ci.searchdomain), ("servers", ci.nameserver.split() if ci.nameserver
                                                                       else None)) if v}
    if dns:
        initialization["dns"] = dns
    if ci.vendor is not None and hv.storage.snippets:
        # the snippet deploy uploads (by SSH: PVE's upload API refuses snippets); Tofu only points at it
        initialization["vendor_data_file_id"] = ci.vendor.volume(hv.storage.snippets)
    return {
        "provider": f"proxmox.{_ident(hv.name)}",
        "node_name": hv.node,
        "vm_id": vm.vmid,
        "name": vm.name,
        "description": vm.description,
        "tags": sorted(vm.all_tags),
        "clone": {"vm_id": plan.template_vmid, "full": vm.clone_mode == "full",
                  **({"node_name": plan.template_node} if plan.template_node else {})},
        **hardware(base, vm),
        "disk": [{"interface": BOOT_DISK, "datastore_id": hv.storage.images, "size": vm.disk_gb},
                 *_data_disks(vm, hv)],
        "network_device": [
            {"bridge": nic.bridge or hv.bridge, "mac_address": nic.mac.upper(), "model": nic.model,
             "firewall": nic.firewall, **({"vlan_id": nic.vlan} if nic.vlan is not None else {})}
            for nic in vm.nics
        ],
        "initialization": initialization,
        "started": True,
        "reboot_after_update": False,
        "lifecycle": {"ignore_changes": ["clone"]},
    }


def _tenant_vms(site: Site, tenant: str) -> list[Vm]:
    if tenant not in site.tenants:
        have = ", ".join(sorted(site.tenants)) or "none"
        raise ValidationFailed([Problem(str(site.inventory_path), tenant, "tenant",
                                        f"no such tenant (have: {have})")])
    return [vm for vm in site.vms.values() if vm.tenant == tenant]


def _source(site: Site, vm: Vm) -> str:
    return site.vm_sources.get(vm.name, str(site.inventory_path))


def _unexportable(plan: PlannedVm | None) -> str:
    """Why a VM cannot be handed to Tofu ("" if it can): no template to clone, or a plan deploy refuses (a MAC
    another VM carries would be cloned onto a second VM; unsafe drift would be changed in place by the first apply
    after the import)."""
    if plan is None or plan.template_vmid is None:
        return f"no template to clone: {plan.reason if plan else 'not planned'}"
    if plan.blocked:
        return (f"deploy refuses it ({plan.reason}): settle it first (invoke deploy.plan shows it), then export; "
                "Tofu would make the same change without deploy's checks")
    return ""


def _check_planned(site: Site, plans: Mapping[str, PlannedVm], vms: list[Vm]) -> None:
    problems = [Problem(_source(site, vm), vm.name, "", why)
                for vm in vms if (why := _unexportable(plans.get(vm.name)))]
    if problems:
        raise ValidationFailed(problems)


def base_vmid(plan: PlannedVm) -> int:
    """Where a VM's hardware is read: the VM itself once the factory made it, else the template it clones."""
    if plan.action in EXISTING or plan.template_vmid is None:
        return plan.vmid
    return plan.template_vmid


def read_bases(site: Site, plan: Plan, tenant: str,
               client_factory: Callable[[Hypervisor], PveClient] = PveClient) -> dict[str, dict[str, Any]]:
    """Each tenant VM's base config (:func:`base_vmid`), read from its host; reads only."""
    vms = _tenant_vms(site, tenant)
    plans = {p.vm: p for p in plan.vms}
    _check_planned(site, plans, vms)
    clients: dict[str, PveClient] = {}
    bases: dict[str, dict[str, Any]] = {}
    for vm in vms:
        hv = site.hypervisors[plans[vm.name].host]
        client = clients.setdefault(hv.name, client_factory(hv))
        vmid = base_vmid(plans[vm.name])
        holder = plans[vm.name].template_node if vmid != plans[vm.name].vmid else ""
        try:
            bases[vm.name] = dict((client.on(holder) if holder else client).vm_config(vmid))
        except RemoteError as exc:
            raise FactoryError(f"{vm.name}: cannot read the config of VM {vmid} on {hv.name}: {exc}") from exc
    return bases


def tenant_config(site: Site, plan: Plan, tenant: str, bases: Mapping[str, Config]) -> dict[str, Any]:
    """The configuration of one tenant's VMs, from the deploy plan of (at least) those VMs and each VM's base
    config (:func:`read_bases`)."""
    vms = _tenant_vms(site, tenant)
    plans = {p.vm: p for p in plan.vms}
    _check_planned(site, plans, vms)
    missing = [Problem(_source(site, vm), vm.name, "", f"the config of VM {base_vmid(plans[vm.name])} was not read")
               for vm in vms if vm.name not in bases]
    if missing:
        raise ValidationFailed(missing)
    hosts = {vm.name: site.hypervisors[plans[vm.name].host] for vm in vms}
    used = {hv.name: hv for hv in hosts.values()} or {
        hv.name: hv for hv in site.hypervisors.values() if hv.role == "tenant"}
    resources = {vm.name: vm_resource(vm, hosts[vm.name], plans[vm.name], bases[vm.name]) for vm in vms}
    imports = [{"to": f"{RESOURCE}.{vm.name}", "id": f"{hosts[vm.name].node}/{vm.vmid}",
                "provider": f"proxmox.{_ident(hosts[vm.name].name)}"}
               for vm in vms if plans[vm.name].action in EXISTING]
    config: dict[str, Any] = {
        "terraform": {"required_providers": {"proxmox": {"source": PROVIDER_SOURCE,
                                                         "version": PROVIDER_CONSTRAINT}}},
        "variable": {token_variable(hv): {
            "type": "string", "sensitive": True,
            "description": f"the secret of API token {hv.token_id} on {hv.name} "
                           f"(TF_VAR_{token_variable(hv)})"} for hv in used.values()},
        "provider": {"proxmox": [{"alias": _ident(hv.name), "endpoint": f"{hv.api_url}/", "insecure": False,
                                  "api_token": f"{hv.token_id}=${{var.{token_variable(hv)}}}"}
                                 for hv in used.values()]},
        "resource": {RESOURCE: resources} if resources else {},
    }
    if imports:
        config["import"] = imports
    return config


@dataclass(frozen=True)
class TenantExport:
    path: Path
    vms: int
    imports: int  # VMs the factory already made: Tofu adopts them instead of creating them


def write_tenant(site: Site, plan: Plan, tenant: str, output: Path, bases: Mapping[str, Config]
                 ) -> TenantExport:
    """``<output>/<tenant>/main.tf.json``, replaced atomically."""
    config = tenant_config(site, plan, tenant, bases)
    path = write_output(json.dumps(config, indent=2) + "\n", output / tenant / "main.tf.json")
    return TenantExport(path, len(config["resource"].get(RESOURCE, {})), len(config.get("import", [])))
