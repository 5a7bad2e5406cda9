"""Which MACs the hypervisors carry right now, and which inventory MACs another VM already uses.

PVE only avoids MAC collisions within one host, and a hand-made VM may carry any MAC: before deploy
writes a MAC, and in preflight and ``mac.check --live``, every VM of every hypervisor is read
(templates and foreign VMs included) and an inventory MAC found on any VM but its own is a collision.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from image_factory.fanout import per_host
from image_factory.pve.client import ApiError, PveClient
from image_factory.pve.codec import NetSpec
from image_factory.site.inventory import Hypervisor, Site, Vm


@dataclass(frozen=True)
class MacUse:
    """A MAC one NIC of one VM on one host carries right now."""

    host: str
    vmid: int
    name: str
    nic: str

    def __str__(self) -> str:
        return f"{self.host} VMID {self.vmid} ({self.name or 'unnamed'}) {self.nic}"


def net_macs(config: Mapping[str, Any]) -> dict[str, str]:
    """netN -> MAC (lowercase) of a VM config; devices that do not parse are skipped."""
    out = {}
    for key, value in config.items():
        if re.fullmatch(r"net\d+", key):
            try:
                mac = NetSpec.parse(str(value)).mac
            except ValueError:
                continue
            if mac:
                out[key] = mac
    return out


def host_mac_uses(client: PveClient, host: str, entries: Iterable[Mapping[str, Any]] | None = None
                  ) -> dict[str, list[MacUse]]:
    """Every MAC on the host (templates and foreign VMs included), with where it is. ``entries``: the
    host's VM listing when the caller has just read it."""
    uses: dict[str, list[MacUse]] = {}
    for entry in client.list_vms() if entries is None else entries:
        vmid = int(entry["vmid"])
        try:
            cfg = client.vm_config(vmid)
        except ApiError as exc:
            if exc.status == 404 or "does not exist" in exc.pve_message:
                continue  # destroyed between the listing and the read
            raise
        for nic, mac in net_macs(cfg).items():
            uses.setdefault(mac, []).append(MacUse(host, vmid, str(cfg.get("name") or entry.get("name") or ""), nic))
    return uses


def mac_collisions(vm: Vm, hosts: Collection[str], macs: Mapping[str, list[MacUse]]) -> list[tuple[int, MacUse]]:
    """(nic index, other use) for every inventory MAC of ``vm`` that another VM already carries; ``hosts`` are
    those the VM may be on (its VMID there is the VM itself)."""
    return [(i, use) for i, mac in enumerate(vm.macs) for use in macs.get(mac, [])
            if not (use.vmid == vm.vmid and use.host in hosts)]


def site_collisions(site: Site, macs: Mapping[str, list[MacUse]], vms: Iterable[Vm] | None = None) -> list[str]:
    """Every inventory MAC that another VM carries, as "<vm> nics[i] <mac> is already used by <where>"."""
    return [f"{vm.name} nics[{i}] {vm.macs[i]} is already used by {use}"
            for vm in (vms if vms is not None else site.vms.values())
            for i, use in mac_collisions(vm, [h.name for h in site.candidates(vm)], macs)]


def read_all(site: Site, client_factory: Callable[[Hypervisor], PveClient] | None = None
             ) -> tuple[dict[str, list[MacUse]], dict[str, str]]:
    """MAC uses of every hypervisor (read in parallel), and the hosts that could not be read, with why."""
    factory = client_factory or PveClient
    macs: dict[str, list[MacUse]] = {}
    found = per_host(site.hypervisors, lambda hv: host_mac_uses(factory(hv), hv.name), name="macs")
    for per_mac in found.results.values():
        for mac, uses in per_mac.items():
            macs.setdefault(mac, []).extend(uses)
    return macs, found.failures
