"""The validated site: its hypervisors, VMs, images, tenants and each plane's placement policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from image_factory.errors import Problem, ValidationFailed
from image_factory.site.formats import PLANES, Placement
from image_factory.site.hypervisors import Hypervisor
from image_factory.site.images import Image
from image_factory.site.tenants import Tenant
from image_factory.site.vms import Vm


@dataclass(frozen=True)
class Site:
    inventory_path: Path
    images_path: Path
    hypervisors: dict[str, Hypervisor]
    vms: dict[str, Vm]
    images: dict[str, Image]
    vm_sources: dict[str, str] = field(default_factory=dict)
    tenants: dict[str, Tenant] = field(default_factory=dict)
    placement: dict[str, Placement] = field(default_factory=dict)  # plane -> policy; absent: pinned

    def policy(self, plane: str) -> Placement:
        return self.placement.get(plane, "pinned")

    def candidates(self, vm: Vm) -> list[Hypervisor]:
        """The hypervisors the VM may run on, in inventory order: the one it names, or every host of its plane
        whose vm_vmids hold its VMID (load() has proven there is at least one)."""
        return hosts_for(vm, self.hypervisors)

    def hypervisor_for(self, vm: Vm) -> Hypervisor:
        """The hypervisor of a VM whose host the inventory fixes (it names one, or its plane has one host for
        its VMID); a VM the plane's policy places has its host in the deploy plan (deploy.decide.place_vms)."""
        hosts = self.candidates(vm)
        if len(hosts) != 1:
            raise ValidationFailed([Problem(self.vm_sources.get(vm.name, str(self.inventory_path)), vm.name,
                                            "vm.hypervisor", f"is placed by the {vm.plane} plane's policy "
                                            f"{self.policy(vm.plane)} over {', '.join(h.name for h in hosts)}: "
                                            "its host is decided when it is deployed (invoke deploy.plan)")])
        return hosts[0]

    def placed_by_policy(self, vm: Vm) -> bool:
        return len(self.candidates(vm)) > 1

    def vms_on(self, hypervisor: str) -> list[Vm]:
        """The VMs that run, or may be placed, on the hypervisor."""
        return [vm for vm in self.vms.values() if any(h.name == hypervisor for h in self.candidates(vm))]

    @property
    def clusters(self) -> dict[str, list[Hypervisor]]:
        """Each cluster entry's hypervisors (one per node of its pve.nodes), in inventory order."""
        found: dict[str, list[Hypervisor]] = {}
        for hv in self.hypervisors.values():
            if hv.cluster is not None:
                found.setdefault(hv.cluster, []).append(hv)
        return found

    def select_hypervisors(self, names: list[str] | tuple[str, ...] | None) -> list[Hypervisor]:
        """The named hypervisors (a cluster entry's name: each of its nodes), or all of them."""
        if not names:
            return list(self.hypervisors.values())
        clusters = self.clusters
        unknown = [n for n in names if n not in self.hypervisors and n not in clusters]
        if unknown:
            have = ", ".join([*self.hypervisors, *clusters])
            raise ValidationFailed(
                Problem(str(self.inventory_path), n, "", f"no such hypervisor (have: {have})") for n in unknown
            )
        chosen = [h for n in names for h in ([self.hypervisors[n]] if n in self.hypervisors else clusters[n])]
        return list({h.name: h for h in chosen}.values())

    def image(self, name: str) -> Image:
        if name not in self.images:
            raise ValidationFailed(
                [Problem(str(self.images_path), name, "", f"no such image (have: {', '.join(self.images)})")]
            )
        return self.images[name]

    def summary(self) -> dict[str, Any]:
        per_host: dict[str, dict[str, list[str]]] = {
            h: {"mgmt": [], "tenant": []} for h in self.hypervisors
        }
        for vm in self.vms.values():
            hosts = self.candidates(vm)
            for hv in hosts:
                per_host[hv.name][vm.plane].append(vm.name if len(hosts) == 1 else f"{vm.name}?")
        return {
            "inventory": str(self.inventory_path),
            "images_file": str(self.images_path),
            "hypervisors": {
                h.name: {"role": h.role, "node": h.node, "api": h.api_url, "vms": per_host[h.name],
                         **({"cluster": h.cluster} if h.cluster else {})}
                for h in self.hypervisors.values()
            },
            "vms": {p: sorted(v.name for v in self.vms.values() if v.plane == p) for p in PLANES},
            "placement": {p: self.policy(p) for p in PLANES},
            "images": {
                i.name: {"family": i.family, "release": i.release, "mode": i.mode} for i in self.images.values()
            },
        }


def hosts_for(vm: Vm, hypervisors: dict[str, Hypervisor]) -> list[Hypervisor]:
    """The hypervisors the VM may run on: the one it names (a cluster entry's name: each of its nodes), or each of
    its plane's whose vm_vmids hold its VMID."""
    if vm.hypervisor is not None:
        if vm.hypervisor in hypervisors:
            return [hypervisors[vm.hypervisor]]
        return [h for h in hypervisors.values() if h.cluster == vm.hypervisor]
    return [h for h in hypervisors.values() if h.role == vm.plane and vm.vmid in h.vm_vmids]
