"""A tenant's VMs as an OpenTofu/Terraform configuration (JSON syntax) for the bpg/proxmox provider.

The hand-off for teams that run their tenant's lifecycle declaratively: one directory per tenant, written from
the same deploy plan `invoke deploy.plan` shows (so the two cannot disagree), holding:

- the provider pinned (:data:`PROVIDER_VERSION`), one alias per hypervisor (``proxmox.<hypervisor>``); the API
  token comes from the provider's own environment variable (``PROXMOX_VE_API_TOKEN``), never from the file,
  and TLS is verified (``insecure = false``: the node's CA must be in the system's trust store);
- one ``proxmox_virtual_environment_vm`` per tenant VM, cloning the template the plan chose (the host's newest
  tested one, or the pinned one) by VMID, with the inventory's MACs, the tenant's VLAN, sizes and cloud-init;
  ``lifecycle.ignore_changes = ["clone"]``: a newer template must never replace a running VM;
- an ``import`` block for every VM the factory already made (``<node>/<vmid>``, the provider's import id), so
  adopting Tofu replaces nothing.

The attributes are those the provider documents for the pinned version (its VM resource page,
virtual_environment_vm.md in bpg/terraform-provider-proxmox); tests/data/ holds that schema for the resources
used, and the tests validate every export against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .deploy import DeployPlan, VmPlan
from .errors import Problem, ValidationFailed
from .files import write_atomic
from .inventory import Hypervisor, Site, StaticIp, Vm

PROVIDER_SOURCE = "bpg/proxmox"
PROVIDER_VERSION = "0.81.0"
RESOURCE = "proxmox_virtual_environment_vm"
BOOT_DISK = "scsi0"  # the factory's templates import their disk as scsi0 (publish)
# The plan's actions for a VM that exists on its host (made by the factory): Tofu imports it.
EXISTING = ("in-sync", "drift", "recreate")


def _ipv4(vm: Vm) -> dict[str, str]:
    ip = vm.cloudinit.ipconfig
    if isinstance(ip, StaticIp):
        return {"address": ip.ip, **({"gateway": ip.gw} if ip.gw else {})}
    return {"address": "dhcp"}


def vm_resource(vm: Vm, hv: Hypervisor, plan: VmPlan) -> dict[str, Any]:
    """One VM as the provider's resource: the same values deploy writes (deploy/desired.py)."""
    ci = vm.cloudinit
    initialization: dict[str, Any] = {
        "datastore_id": hv.storage.cloudinit,
        "ip_config": [{"ipv4": _ipv4(vm)}],
        "user_account": {"username": ci.user, "keys": list(ci.ssh_keys)},
    }
    dns = {k: v for k, v in (("domain", ci.searchdomain), ("servers", ci.nameserver.split() if ci.nameserver
                                                                       else None)) if v}
    if dns:
        initialization["dns"] = dns
    return {
        "provider": f"proxmox.{hv.name}",
        "node_name": hv.node,
        "vm_id": vm.vmid,
        "name": vm.name,
        "description": vm.description,
        "tags": sorted(vm.all_tags),
        "clone": {"vm_id": plan.template_vmid, "full": vm.clone_mode == "full"},
        "cpu": {"cores": vm.cores},
        "memory": {"dedicated": vm.memory},
        "disk": [{"interface": BOOT_DISK, "datastore_id": hv.storage.images, "size": vm.disk_gb}],
        "network_device": [
            {"bridge": nic.bridge or hv.bridge, "mac_address": nic.mac.upper(), "model": nic.model,
             "firewall": nic.firewall, **({"vlan_id": nic.vlan} if nic.vlan is not None else {})}
            for nic in vm.nics
        ],
        "initialization": initialization,
        "agent": {"enabled": True},
        "started": True,
        "lifecycle": {"ignore_changes": ["clone"]},
    }


def tenant_config(site: Site, plan: DeployPlan, tenant: str) -> dict[str, Any]:
    """The configuration of one tenant's VMs, from the deploy plan of (at least) those VMs."""
    if tenant not in site.tenants:
        have = ", ".join(sorted(site.tenants)) or "none"
        raise ValidationFailed([Problem(str(site.inventory_path), tenant, "tenant",
                                        f"no such tenant (have: {have})")])
    plans = {p.vm: p for p in plan.vms}
    vms = [vm for vm in site.vms.values() if vm.tenant == tenant]
    problems = [Problem(site.vm_sources.get(vm.name, str(site.inventory_path)), vm.name, "",
                        f"no template to clone: {plans[vm.name].reason if vm.name in plans else 'not planned'}")
                for vm in vms if vm.name not in plans or plans[vm.name].template_vmid is None]
    if problems:
        raise ValidationFailed(problems)
    hosts = {vm.name: site.hypervisor_for(vm) for vm in vms}
    resources = {vm.name: vm_resource(vm, hosts[vm.name], plans[vm.name]) for vm in vms}
    imports = [{"to": f"{RESOURCE}.{vm.name}", "id": f"{hosts[vm.name].node}/{vm.vmid}",
                "provider": f"proxmox.{hosts[vm.name].name}"}
               for vm in vms if plans[vm.name].action in EXISTING]
    config: dict[str, Any] = {
        "terraform": {"required_providers": {"proxmox": {"source": PROVIDER_SOURCE, "version": PROVIDER_VERSION}}},
        "provider": {"proxmox": [{"alias": hv.name, "endpoint": f"{hv.api_url}/", "insecure": False}
                                 for hv in site.hypervisors.values()]},
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


def write_tenant(site: Site, plan: DeployPlan, tenant: str, output: Path) -> TenantExport:
    """``<output>/<tenant>/main.tf.json``, replaced atomically."""
    config = tenant_config(site, plan, tenant)
    path = write_atomic(output / tenant / "main.tf.json", json.dumps(config, indent=2) + "\n")
    return TenantExport(path, len(config["resource"].get(RESOURCE, {})), len(config.get("import", [])))
