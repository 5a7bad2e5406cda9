"""Tenants: each its own VLAN, subnet, gateway, DHCP range and DNS domain, read from the tenant group's vars,
and a tenant VM put on its tenant's network."""

from __future__ import annotations

import functools
import ipaddress
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, StrictInt, ValidationError, field_validator

from image_factory.errors import Problem
from image_factory.site.formats import TENANT_NAME_RE, BridgeId, DnsName, Ipv4Address, Strict, matching
from image_factory.site.inventory_source import YamlIntForm
from image_factory.site.reading import pydantic_problems
from image_factory.site.vms import StaticIp, Vm

TENANTS_KEY = "tenants"


def host_address_in(ip: ipaddress.IPv4Address, net: ipaddress.IPv4Network) -> bool:
    """``ip`` is in ``net`` and is neither its network nor its broadcast address."""
    return ip in net and ip not in (net.network_address, net.broadcast_address)


class DhcpRange(Strict):
    first: Ipv4Address
    last: Ipv4Address


class Tenant(Strict):
    """One tenant: its own VLAN on the tenant bridge, subnet, gateway (OPNsense), DHCP range and DNS domain.

    ``id`` (1-15) is baked into its VMs' MACs (byte 2 = 0x20 + id, docs/mac-namespace.md): never renumber it.
    """

    name: Annotated[str, matching(TENANT_NAME_RE, "a tenant name ([a-z][a-z0-9-]*, at most 32)")]
    id: StrictInt = Field(ge=1, le=15)
    vlan: StrictInt = Field(ge=2, le=4094, description="VLAN id on the tenant bridge (1 is the untagged default)")

    @field_validator("id", "vlan", mode="before")
    @classmethod
    def _plain_integer(cls, v: Any) -> Any:
        # "1" or 1.0 would be tenant 1 here but could read otherwise elsewhere: one reading everywhere
        if isinstance(v, YamlIntForm):
            raise ValueError(f"{v.text} is not a plain integer: YAML 1.1 reads it as {int(v)}, YAML 1.2 and people "
                             "otherwise; write it in decimal without a leading zero")
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{v!r} is not a plain integer: write it unquoted and without a decimal point")
        return v
    subnet: str
    gateway: Ipv4Address
    dhcp_range: DhcpRange
    domain: DnsName
    bridge: BridgeId | None = Field(default=None, description="default: the tenant hypervisor's bridge")

    @field_validator("subnet")
    @classmethod
    def _network(cls, v: str) -> str:
        try:
            return str(ipaddress.IPv4Network(v, strict=True))
        except ValueError as exc:
            raise ValueError(f"{v!r} is not an IPv4 network in CIDR form with no host bits set ({exc})") from None

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for every address of the tenant that is outside its subnet or in the wrong place."""
        net, out = self.network, []
        usable = functools.partial(host_address_in, net=net)
        gw = ipaddress.IPv4Address(self.gateway)
        first, last = ipaddress.IPv4Address(self.dhcp_range.first), ipaddress.IPv4Address(self.dhcp_range.last)
        if not usable(gw):
            out.append(("gateway", f"{gw} is not a host address of the tenant's subnet {net}"))
        for key, ip in (("dhcp_range.first", first), ("dhcp_range.last", last)):
            if not usable(ip):
                out.append((key, f"{ip} is not a host address of the tenant's subnet {net}"))
        if first > last:
            out.append(("dhcp_range", f"first {first} is after last {last}"))
        elif first <= gw <= last:
            out.append(("dhcp_range", f"holds the gateway {gw}"))
        return out

    def fixed_address_problem(self, address: str) -> str:
        """Why a VM's fixed ``address`` cannot be used in this tenant ("" if it can)."""
        ip, net = ipaddress.IPv4Address(address), self.network
        if ip not in net:
            return f"{ip} is outside tenant {self.name}'s subnet {net}"
        if ip == net.network_address:
            return f"{ip} is tenant {self.name}'s network address"
        if ip == net.broadcast_address:
            return f"{ip} is tenant {self.name}'s broadcast address"
        if str(ip) == self.gateway:
            return f"{ip} is tenant {self.name}'s gateway (OPNsense): the VM would take the tenant's route"
        if ipaddress.IPv4Address(self.dhcp_range.first) <= ip <= ipaddress.IPv4Address(self.dhcp_range.last):
            return (f"{ip} is inside tenant {self.name}'s dynamic pool {self.dhcp_range.first}-{self.dhcp_range.last}: "
                    "a lease could hand it to another VM; use an address outside dhcp_range")
        return ""


def tenants_file(group_files: dict[str, dict[str, str]], inventory: Path | str) -> str:
    """The file the tenant group's ``tenants`` came from (group_vars/tenant.yml, or an inventory file)."""
    return group_files.get("tenant", {}).get(TENANTS_KEY, str(inventory))


def read_tenants(groups: dict[str, Any], inv_file: str, problems: list[Problem]) -> dict[str, Tenant]:
    """``tenants`` from the vars of group ``tenant``: name -> VLAN, subnet, gateway, DHCP range, DNS domain."""
    raw = (groups.get("tenant") or {}).get(TENANTS_KEY)
    if raw is None:
        return {}
    where = "group tenant"
    if not isinstance(raw, dict):
        problems.append(Problem(inv_file, where, f"vars.{TENANTS_KEY}",
                                "must map each tenant name to its id, vlan, subnet, gateway, dhcp_range and domain"))
        return {}
    tenants: dict[str, Tenant] = {}
    for name, body in raw.items():
        entry = f"tenant {name}"
        if not isinstance(body, dict):
            problems.append(Problem(inv_file, entry, "", "a tenant must be a mapping"))
            continue
        try:
            tenant = Tenant(name=str(name), **body)
        except ValidationError as exc:
            problems.extend(pydantic_problems(inv_file, entry, "", exc))
            continue
        problems.extend(Problem(inv_file, entry, key, message) for key, message in tenant.problems())
        tenants[tenant.name] = tenant
    seen = list(tenants.values())
    for i, a in enumerate(seen):
        for b in seen[i + 1:]:
            pair = f"tenants {a.name}, {b.name}"
            if a.id == b.id:
                problems.append(Problem(inv_file, pair, "id", f"both have id {a.id} (it is baked into their MACs)"))
            if a.vlan == b.vlan:
                problems.append(Problem(inv_file, pair, "vlan", f"both use VLAN {a.vlan}"))
            if a.network.overlaps(b.network):
                problems.append(Problem(inv_file, pair, "subnet", f"{a.subnet} and {b.subnet} overlap"))
            if a.domain.lower() == b.domain.lower():
                problems.append(Problem(inv_file, pair, "domain",
                                        f"both use domain {a.domain}: one tenant's names would answer for the other"))
    return tenants


def named_tenants(groups: dict[str, Any]) -> set[str]:
    """Every tenant name the inventory defines, valid or not."""
    raw = (groups.get("tenant") or {}).get(TENANTS_KEY)
    return {str(name) for name in raw} if isinstance(raw, dict) else set()


def on_tenant_network(vm: Vm, tenants: dict[str, Tenant], file: str,
                       named: set[str] | None = None) -> tuple[Vm, list[Problem]]:
    """The VM with its NICs on its tenant's VLAN and bridge, or the reasons it cannot be there."""
    if vm.tenant is None:
        return vm, []
    if vm.plane != "tenant":
        return vm, [Problem(file, vm.name, "vm.tenant", "only tenant-plane VMs belong to a tenant")]
    tenant = tenants.get(vm.tenant)
    if tenant is None and vm.tenant in (named or set()):
        return vm, []  # the tenant is defined but invalid: its own problems say why
    if tenant is None:
        have = ", ".join(sorted(tenants)) or f"none: define them under the tenant group's vars.{TENANTS_KEY}"
        return vm, [Problem(file, vm.name, "vm.tenant", f"no tenant {vm.tenant!r} (have: {have})")]
    problems: list[Problem] = []
    nics = []
    for i, nic in enumerate(vm.nics):
        if nic.vlan is not None and nic.vlan != tenant.vlan:
            problems.append(Problem(file, vm.name, f"vm.nics.{i}.vlan",
                                    f"{nic.vlan} is not tenant {tenant.name}'s VLAN {tenant.vlan}: a tenant VM's NICs "
                                    "are on its tenant's VLAN (leave vlan out)"))
        if nic.address and (why := tenant.fixed_address_problem(nic.address)):
            problems.append(Problem(file, vm.name, f"vm.nics.{i}.address", why))
        nics.append(nic.model_copy(update={"vlan": tenant.vlan, "bridge": nic.bridge or tenant.bridge}))
    ip = vm.cloudinit.ipconfig
    if isinstance(ip, StaticIp):
        iface = ipaddress.ip_interface(ip.ip)
        if iface.network != tenant.network:
            problems.append(Problem(file, vm.name, "vm.cloudinit.ipconfig.ip",
                                    f"{ip.ip} is not in tenant {tenant.name}'s subnet {tenant.subnet}"))
        elif vm.nics[0].address is None and (why := tenant.fixed_address_problem(str(iface.ip))):
            problems.append(Problem(file, vm.name, "vm.cloudinit.ipconfig.ip", why))
        if ip.gw and ip.gw != tenant.gateway:
            problems.append(Problem(file, vm.name, "vm.cloudinit.ipconfig.gw",
                                    f"{ip.gw} is not tenant {tenant.name}'s gateway {tenant.gateway}"))
    return vm.model_copy(update={"nics": nics}), problems
