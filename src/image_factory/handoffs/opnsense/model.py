"""What the factory keeps in OPNsense: one entry type per model item (hosts, ranges, tags, options, VLAN devices),
each :class:`Kind` with its API controller and the fields the factory owns, and the markers that say an object
is the factory's (its description starts with :data:`MARKER`) or a service has unapplied changes (:data:`PENDING`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from image_factory.handoffs.dhcp import DHCP_MARKER, Reservation, host_marker, tenant_marker, tenant_tag
from image_factory.site.inventory import Tenant

MARKER = DHCP_MARKER


def row_text(row: dict[str, Any], name: str) -> str:
    return str(row.get(name) or "")


@dataclass(frozen=True)
class HostEntry:
    """A Dnsmasq DHCP host reservation (model item ``hosts``); the factory's are keyed by MAC."""

    host: str
    domain: str
    # the model's list of addresses: at most one IPv4 and any IPv6 ones ("" for a MAC-only reservation, its
    # address from the range); dnsmasq.conf's template writes them as dhcp-host=<mac>,<ipv4>,[<ipv6>],...
    ip: str
    hwaddr: str
    descr: str
    set_tag: str = ""  # the tenant's tag (uuid): its domain-name option reaches a fixed address too

    def __post_init__(self) -> None:
        object.__setattr__(self, "hwaddr", self.hwaddr.lower())  # OPNsense may answer in either case
        object.__setattr__(self, "ip", ",".join(ip for ip in (ip.strip() for ip in self.ip.split(",")) if ip))

    @classmethod
    def from_reservation(cls, r: Reservation, tag_ref: str = "") -> HostEntry:
        """NIC ``r`` keyed by its MAC, with its IPv4 and IPv6 address: for DHCPv6 too dnsmasq identifies a
        directly connected client by its MAC (dnsmasq(8), --dhcp-host), whatever DUID the guest sends."""
        ips = ",".join(ip for ip in (r.address, r.address6) if ip)
        return cls(r.hostname, r.domain, ips, r.mac.lower(), host_marker(r), tag_ref)

    @property
    def keys(self) -> list[str]:
        return [m for m in (m.strip() for m in self.hwaddr.split(",")) if m]

    @property
    def name(self) -> str:
        return self.host

    @property
    def ours(self) -> bool:
        return self.descr.startswith(MARKER)

    @property
    def ips(self) -> list[str]:
        return [ip for ip in (ip.strip() for ip in self.ip.split(",")) if ip]

    @property
    def fqdn(self) -> str:
        return f"{self.host}.{self.domain}".lower() if self.domain else self.host.lower()

    def clash(self, other: HostEntry) -> str:
        """Why a foreign entry stands in this one's way ("" if it does not): it holds one of its MACs or its name.
        (An address another DHCP host holds is OPNsense's own refusal: see ``_replay_host_writes``.)"""
        shared = sorted(set(self.keys) & set(other.keys))
        if shared:
            return (f"a reservation the factory does not own holds {', '.join(shared)} ({other.host or 'no host'}, "
                    f"{other.ip or 'no ip'}): left alone; remove it in OPNsense or change the inventory")
        if self.host and other.host and other.fqdn == self.fqdn:
            return (f"an entry the factory does not own already has the name {self.fqdn} ({other.ip or 'no ip'}, "
                    f"{other.hwaddr or 'no MAC'}): DNS would answer both; remove it in OPNsense or rename the VM")
        return ""


class _TenantKeyed:
    """An object the factory keys by the tenant its description names ("[image-factory] tenant <name>: ...")."""

    descr: str

    @property
    def keys(self) -> list[str]:
        rest = self.descr.removeprefix(f"{MARKER} tenant ")
        return [rest.split(":", 1)[0]] if self.ours and rest != self.descr else []

    @property
    def ours(self) -> bool:
        return self.descr.startswith(MARKER)


@dataclass(frozen=True)
class RangeEntry(_TenantKeyed):
    """A tenant's Dnsmasq DHCP range (model item ``dhcp_ranges``), keyed by the tenant named in its description.

    No interface is set: Dnsmasq serves a range on the interface whose subnet holds it, and the tenant's VLAN
    interface is assigned in OPNsense (docs/opnsense.md). ``domain_type: range`` names the domain for addresses
    inside the range only (dnsmasq's ``domain=<domain>,<first>,<last>``); the tenant's tag (``set_tag``) and its
    domain-name option (``OptionEntry``) give it to the tenant's fixed reservations too.
    """

    start_addr: str
    end_addr: str
    subnet_mask: str
    domain_type: str
    domain: str
    descr: str  # the model's ``description``
    set_tag: str = ""

    @classmethod
    def from_tenant(cls, t: Tenant, tag_ref: str = "") -> RangeEntry:
        return cls(t.dhcp_range.first, t.dhcp_range.last, str(t.network.netmask), "range", t.domain,
                   tenant_marker(t), tag_ref)

    @property
    def name(self) -> str:
        return f"{self.start_addr}-{self.end_addr}"

    def _span(self) -> tuple[int, int] | None:
        try:
            first = int(ipaddress.IPv4Address(self.start_addr))
            return first, int(ipaddress.IPv4Address(self.end_addr or self.start_addr))
        except ValueError:
            return None

    def clash(self, other: RangeEntry) -> str:
        """Why a foreign range stands in this one's way ("" if it does not): their addresses overlap, or it serves
        this range's domain by interface (OPNsense refuses one domain with both types, Dnsmasq.php)."""
        if other.domain and other.domain.lower() == self.domain.lower() and other.domain_type != self.domain_type:
            return (f"a range the factory does not own ({other.name}, {other.descr or 'no description'}) serves "
                    f"domain {other.domain} by {other.domain_type or 'no type'}: OPNsense refuses one domain with "
                    "both types; change that range or the tenant's domain")
        mine, theirs = self._span(), other._span()
        if mine is None or theirs is None or mine[1] < theirs[0] or theirs[1] < mine[0]:
            return ""
        return (f"a range the factory does not own ({other.name}, {other.descr or 'no description'}) "
                f"overlaps tenant range {self.name}: left alone; remove it in OPNsense or change the tenant")


@dataclass(frozen=True)
class TagEntry(_TenantKeyed):
    """A tenant's Dnsmasq tag (model item ``dhcp_tags``, its only field ``tag`` is its name), keyed by the tenant
    its name holds. Its range and its hosts set it; its domain-name option matches it."""

    descr: str  # the model's ``tag``

    @classmethod
    def from_tenant(cls, t: Tenant) -> TagEntry:
        return cls(tenant_tag(t))

    @property
    def name(self) -> str:
        return self.descr

    def clash(self, other: TagEntry) -> str:
        return ""  # names are unique in the model, and only the factory's start with its marker


@dataclass(frozen=True)
class OptionEntry(_TenantKeyed):
    """A tenant's DHCP option 15 (domain-name) for clients with its tag (model item ``dhcp_options``, type set):
    dnsmasq sends it instead of the global domain to every host and lease of the tenant."""

    type: str
    option: str
    tag: str
    value: str
    descr: str  # the model's ``description``

    @classmethod
    def from_tenant(cls, t: Tenant, tag_ref: str) -> OptionEntry:
        return cls("set", DOMAIN_NAME_OPTION, tag_ref, t.domain, f"{tenant_marker(t)}: domain-name {t.domain}")

    @property
    def name(self) -> str:
        return f"option {self.option} {self.value}"

    def clash(self, other: OptionEntry) -> str:
        return ""  # a foreign option for the tenant's tag cannot exist before the factory made the tag


@dataclass(frozen=True)
class VlanEntry(_TenantKeyed):
    """A tenant's VLAN device on the trunk to the tenant bridge (model OPNsense.Interfaces.Vlan, item ``vlan``),
    keyed by the tenant named in its description. Assigning it as an interface with the tenant's gateway
    address stays a manual step (docs/opnsense.md): an assigned VLAN is never deleted (OPNsense refuses)."""

    parent: str  # the model's ``if``
    tag: str
    descr: str

    @classmethod
    def from_tenant(cls, t: Tenant, parent: str) -> VlanEntry:
        return cls(parent, str(t.vlan), f"{MARKER} tenant {t.name}: {t.subnet}, gateway {t.gateway}")

    @property
    def name(self) -> str:
        return f"{self.parent} vlan {self.tag}"

    def clash(self, other: VlanEntry) -> str:
        """A foreign device with this tag on the same parent stands in the way."""
        if (other.parent, other.tag) != (self.parent, self.tag):
            return ""
        return (f"a VLAN device the factory does not own ({other.name}, {other.descr or 'no description'}) has "
                f"this tag: left alone; remove it in OPNsense or change the tenant's vlan")


Entry = HostEntry | RangeEntry | VlanEntry | TagEntry | OptionEntry
DOMAIN_NAME_OPTION = "15"  # RFC 2132 option 15, as OPNsense's option list keys it (dnsmasq_dhcp_options.py)


@dataclass(frozen=True)
class Kind:
    """One kind of object the factory keeps: its name, its API controller and noun (``<api>/search_<noun>``,
    ``add_<noun>``, ``set_<noun>/<uuid>``, ``del_<noun>/<uuid>``), the key of its request body, the model fields
    the factory sets (model name -> entry attribute; the others keep OPNsense's or an operator's values), how a
    row reads, and the service to reconfigure after a change."""

    name: str
    api: str
    noun: str
    body_key: str
    fields: dict[str, str]
    entry: Callable[..., Entry]
    reconfigure: str
    undeletable: Callable[[dict[str, Any]], str] = lambda _row: ""  # why OPNsense refuses to delete a row

    def from_row(self, row: dict[str, Any]) -> Entry:
        return self.entry(**{attr: row_text(row, model) for model, attr in self.fields.items()})


def _same(*names: str) -> dict[str, str]:
    return {name: name for name in names}


HOSTS = Kind("host", "dnsmasq/settings", "host", "host",
             _same("host", "domain", "ip", "hwaddr", "descr", "set_tag"), HostEntry, "dnsmasq/service/reconfigure")
RANGES = Kind("range", "dnsmasq/settings", "range", "range",
              {**_same("start_addr", "end_addr", "subnet_mask", "domain_type", "domain"), "description": "descr",
               "set_tag": "set_tag"},
              RangeEntry, "dnsmasq/service/reconfigure")
TAGS = Kind("tag", "dnsmasq/settings", "tag", "tag", {"tag": "descr"}, TagEntry, "dnsmasq/service/reconfigure")
OPTIONS = Kind("option", "dnsmasq/settings", "option", "option",
               {**_same("type", "option", "tag", "value"), "description": "descr"}, OptionEntry,
               "dnsmasq/service/reconfigure")


def _assigned(row: dict[str, Any]) -> str:
    """An assigned device: VlanSettingsController's search shows its ``vlanif`` as "vlan01 [<interface>]", and
    its delete refuses it ("This VLAN cannot be deleted because it is assigned as an interface.")."""
    found = re.match(r"^\S+ \[(.+)\]$", row_text(row, "vlanif"))
    return (f"cannot delete: assigned to {found[1]} (Interfaces: Assignments: remove the assignment, then re-run)"
            if found else "")


VLANS = Kind("vlan", "interfaces/vlan_settings", "item", "vlan", {"if": "parent", "tag": "tag", "descr": "descr"},
             VlanEntry, "interfaces/vlan_settings/reconfigure", _assigned)
# In the order they are made (and the reverse of the order they are removed): a range needs its VLAN's interface,
# ranges, options and hosts reference their tenant's tag, hosts live in the ranges.
KINDS = (VLANS, TAGS, RANGES, OPTIONS, HOSTS)


def body(kind: Kind, entry: Entry) -> dict[str, dict[str, str]]:
    return {kind.body_key: {model: getattr(entry, attr) for model, attr in kind.fields.items()}}


# The marker of a service with saved but unapplied changes: a Dnsmasq tag (model item ``dhcp_tags``) named after
# the service's reconfigure path. Dnsmasq's template renders a tag only where a range, host or option references
# it, so the marker never changes what dnsmasq serves.
PENDING = f"{MARKER} unapplied: "
