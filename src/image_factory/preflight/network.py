"""The network check: every bridge the inventory names exists on the node and carries the VLANs its NICs use."""

from __future__ import annotations

from typing import Any

from image_factory.preflight.model import Outcome, bridges_for, failed, passed
from image_factory.preflight.probe import HostProbe
from image_factory.pve.codec import DEFAULT_BRIDGE_VIDS, format_vids, parse_vids
from image_factory.site.inventory import Hypervisor, Site


def vlan_users(site: Site, hv: Hypervisor) -> dict[str, dict[int, list[str]]]:
    """bridge -> VLAN tag -> the NICs (``vm nicN``) of this host's VMs that use it."""
    out: dict[str, dict[int, list[str]]] = {}
    for vm in site.vms_on(hv.name):
        for n, nic in enumerate(vm.nics):
            if nic.vlan is not None:
                out.setdefault(nic.bridge or hv.bridge, {}).setdefault(nic.vlan, []).append(f"{vm.name} nic{n}")
    return out


def vlan_problems(bridge: str, iface: dict[str, Any], users: dict[int, list[str]]) -> list[str]:
    """Why ``bridge`` cannot carry the tagged NICs (none if it can): not VLAN-aware, or a VLAN outside its vids."""
    def who(tag: int) -> str:
        return f"vlan {tag} ({', '.join(users[tag])})"

    if str(iface.get("type", "")).lower() == "ovsbridge":
        return []  # an OVS bridge trunks every VLAN
    if str(iface.get("bridge_vlan_aware") or "0") not in ("1", "yes", "on"):
        return [f"bridge {bridge} is not VLAN-aware, but {', '.join(who(t) for t in sorted(users))} use VLAN tags"]
    vids = str(iface.get("bridge_vids") or DEFAULT_BRIDGE_VIDS)
    try:
        ranges = parse_vids(vids)
    except ValueError as exc:
        return [f"bridge {bridge}: bridge_vids {vids!r} does not parse ({exc})"]
    outside = [t for t in sorted(users) if not any(a <= t <= b for a, b in ranges)]
    return [f"bridge {bridge} carries VLANs {vids}, not {', '.join(who(t) for t in outside)}"] if outside else []


def check_bridge(probe: HostProbe) -> Outcome:
    """Every bridge this host's templates and VMs use exists (a Linux or OVS bridge) and carries their VLANs."""
    hv, site = probe.hv, probe.site
    bridges = {str(i.get("iface")): i for i in probe.networks
               if str(i.get("type", "")).lower() in ("bridge", "ovsbridge")}
    missing = [b for b in bridges_for(site, hv) if b not in bridges]
    have = ", ".join(sorted(bridges)) or "none"
    if missing:
        return failed(f"bridge {', '.join(missing)} does not exist on {hv.node} (has: {have})",
            f"create it on {hv.node} (/etc/network/interfaces, then ifreload -a) or fix pve.bridge / "
            f"vm.nics[].bridge in the inventory",
        )
    users = vlan_users(site, hv)
    problems = [p for bridge, tagged in sorted(users.items()) for p in vlan_problems(bridge, bridges[bridge], tagged)]
    if problems:
        return failed("; ".join(problems),
                      f"on {hv.node}: make the bridge VLAN-aware and list the VLANs in its bridge-vids "
                      "(/etc/network/interfaces, then ifreload -a), or fix vm.nics[].vlan in the inventory")
    tags = sorted({tag for tagged in users.values() for tag in tagged})
    return passed(", ".join(bridges_for(site, hv)) + " present"
                  + (f"; VLANs {format_vids([(t, t) for t in tags])} carried" if tags else ""))
