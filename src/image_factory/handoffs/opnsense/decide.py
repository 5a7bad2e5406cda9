"""What converging OPNsense needs, decided without I/O: per kind the creates, updates, deletes and conflicts against
OPNsense's rows, OPNsense's own refusals replayed over every row in write order (so a run it would refuse part-way
writes nothing), the order of the writes, and the report a run fills in."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from image_factory.handoffs.opnsense.model import (
    HOSTS,
    KINDS,
    PENDING,
    TAGS,
    VLANS,
    Entry,
    HostEntry,
    Kind,
    row_text,
)
from image_factory.reports import Report
from image_factory.site.inventory import Tenant

WRITES = ("create", "update", "delete")


@dataclass
class Change(Report):
    action: str  # create | update | delete | unchanged | conflict (refuses the run) | blocked (a delete left out)
    kind: str
    key: str  # the MAC of a host, the tenant of a range
    name: str = ""
    uuid: str | None = None
    want: Entry | None = field(default=None, repr=False)
    diff: dict[str, tuple[str, str]] = field(default_factory=dict)
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.pop("want")
        data["diff"] = {k: {"from": a, "to": b} for k, (a, b) in self.diff.items()}
        return data


def decide(kind: Kind, desired: list[Entry], rows: list[dict[str, Any]]) -> list[Change]:
    """What converging one kind needs, from the desired entries and OPNsense's rows (pure)."""
    mine: dict[str, tuple[str, Entry]] = {}
    rows_of: dict[str, dict[str, Any]] = {}
    foreign: list[Entry] = []
    for row in rows:
        have = kind.from_row(row)
        if have.ours:
            mine.update((key, (str(row.get("uuid")), have)) for key in have.keys)
            rows_of.update((key, row) for key in have.keys)
        else:
            foreign.append(have)
    changes: list[Change] = []
    wanted = {want.keys[0]: want for want in desired}
    for key, want in sorted(wanted.items()):
        clash = next((why for other in foreign if (why := want.clash(other))), "")  # type: ignore[arg-type]
        if clash:
            changes.append(Change("conflict", kind.name, key, want.name, want=want, why=clash))
        elif key not in mine:
            changes.append(Change("create", kind.name, key, want.name, want=want))
        else:
            uuid, have = mine[key]
            diff = {model: (getattr(have, attr), getattr(want, attr)) for model, attr in kind.fields.items()
                    if getattr(have, attr) != getattr(want, attr)}
            changes.append(Change("update" if diff else "unchanged", kind.name, key, want.name, uuid, want, diff))
    for key, (uuid, have) in sorted(mine.items()):
        if key not in wanted:
            refused = kind.undeletable(rows_of[key])
            changes.append(Change("blocked" if refused else "delete", kind.name, key, have.name, uuid,
                                  why=refused or f"{have.name}: no longer in the inventory"))
    return changes


def write_order(changes: list[Change]) -> list[Change]:
    """The writes in the order a run makes them: first the deletes of hosts, options and ranges, so an address is
    free before anything takes it; then updates and creates in KINDS order (within a kind updates first), so a tag
    exists before anything refers to it; last the deletes of tags and VLAN devices, once nothing refers to them."""
    rank = {kind.name: i for i, kind in enumerate(KINDS)}
    referred = {VLANS.name, TAGS.name}  # removed last, once nothing this run writes refers to them

    def position(c: Change) -> tuple[int, int, bool]:
        if c.action != "delete":
            return 1, rank[c.kind], c.action == "create"
        return (2 if c.kind in referred else 0), -rank[c.kind], False

    return sorted((c for c in changes if c.action in WRITES), key=position)


def _replay_host_writes(changes: list[Change], rows: list[dict[str, Any]]) -> None:
    """OPNsense's own rule, replayed over every row in write order before anything is written: a DHCP host (one
    with a MAC) may not take an address, IPv4 or IPv6, another DHCP host holds, except a partial IPv6 one ("::56",
    a constructed range's host part) (Dnsmasq.php performValidation, checked for the host being saved). A write
    it would refuse becomes a conflict, so the run refuses before its first write."""
    held: dict[str, tuple[list[str], str, bool]] = {}  # uuid -> (addresses, who, the factory's)
    for row in rows:
        have = HOSTS.from_row(row)
        assert isinstance(have, HostEntry)
        if have.keys or row_text(row, "client_id"):  # a DHCP host; host overrides may share addresses
            held[str(row.get("uuid"))] = (have.ips, f"{have.host or 'no host'} ({have.hwaddr or 'client id'})",
                                          have.ours)
    for n, change in enumerate(write_order(changes)):
        if change.kind != HOSTS.name:
            continue
        if change.action == "delete":
            held.pop(str(change.uuid), None)
            continue
        want = change.want
        assert isinstance(want, HostEntry)
        slot = str(change.uuid) if change.uuid else f"new-{n}"
        taken = [(ip, who, ours) for ip in want.ips for uid, (ips, who, ours) in held.items()
                 if uid != slot and ip in ips and not ip.startswith("::")]  # a partial IPv6 address may repeat
        if not taken:
            held[slot] = (want.ips, f"{want.host} ({want.hwaddr})", True)
            continue
        ip, who, ours = taken[0]
        change.action, change.diff = "conflict", {}
        change.why = (f"{ip} is still held by the factory's reservation {who} when this one is saved, and "
                      "OPNsense checks each saved host against the others: move one to a free address first "
                      "(two runs)" if ours else
                      f"a DHCP reservation the factory does not own holds {ip} ({who}): OPNsense refuses a second "
                      "one; remove it in OPNsense or change the inventory")


def plan(kinds: list[Kind], desired: Mapping[str, list[Entry]], rows: Mapping[str, list[dict[str, Any]]],
         pending: list[str]) -> SyncReport:
    """What converging needs (pure): each kind decided against OPNsense's rows, OPNsense's refusals replayed, and
    the services an earlier run saved but did not apply."""
    changes = [c for kind in kinds for c in decide(kind, desired[kind.name], rows[kind.name])]
    if HOSTS in kinds:
        _replay_host_writes(changes, rows[HOSTS.name])
    return SyncReport(changes, dry_run=True, pending=pending)


def _ipv6_networks(range_rows: list[dict[str, Any]]) -> list[ipaddress.IPv6Network] | None:
    """The subnets OPNsense's IPv6 Dnsmasq ranges serve (prefix_len defaults to 64, as in dnsmasq.conf's
    template); None where one is constructed from an interface (its start a partial "::..." address): its
    subnet is the interface's, which the API's range rows do not show."""
    nets = []
    for row in range_rows:
        start = row_text(row, "start_addr")
        if ":" not in start:
            continue
        if row_text(row, "constructor") or start.startswith("::"):
            return None
        try:
            nets.append(ipaddress.IPv6Network(f"{start}/{row_text(row, 'prefix_len') or 64}", strict=False))
        except ValueError:
            continue
    return nets


def ipv6_notes(hosts: list[Entry], range_rows: list[dict[str, Any]]) -> list[str]:
    """What a run says about its IPv6 reservations (pure): dnsmasq answers a DHCPv6 request for a fixed address
    only "in the same subnet as some valid dhcp-range" (dnsmasq(8), --dhcp-host), which the factory does not make
    (the site model has no IPv6 subnets); a guest with a static cloudinit.ip6 asks no DHCPv6 and needs none."""
    wanted = [(h.name, ip) for h in hosts if isinstance(h, HostEntry) for ip in h.ips if ":" in ip]
    nets = _ipv6_networks(range_rows)
    if not wanted or nets is None:
        return []
    outside = sorted(f"{name} {ip}" for name, ip in wanted if not any(ipaddress.IPv6Address(ip) in n for n in nets))
    if not outside:
        return []
    return [f"IPv6: no Dnsmasq IPv6 DHCP range covers {', '.join(outside)}: their names resolve (AAAA), but DHCPv6 "
            "does not hand them out until a range of that subnet exists (Services: Dnsmasq: DHCP ranges; mode "
            "static serves reservations only); a VM with a static cloudinit.ip6 needs none"]


def pending_markers(tag_rows: list[dict[str, Any]]) -> dict[str, str]:
    """The services an earlier run saved changes for but did not apply: reconfigure path -> marker uuid."""
    return {row_text(row, "tag").removeprefix(PENDING): str(row.get("uuid")) for row in tag_rows
            if row_text(row, "tag").startswith(PENDING)}


@dataclass
class SyncReport:
    changes: list[Change]
    dry_run: bool
    reconfigured: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # services an earlier run saved but did not apply
    failed: str = ""  # the write that failed, and OPNsense's words
    reconfigure_failed: dict[str, str] = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        """A conflict: the run writes nothing at all."""
        return any(c.action == "conflict" for c in self.changes)

    @property
    def ok(self) -> bool:
        return not (self.refused or self.failed or self.reconfigure_failed
                    or any(c.action == "blocked" for c in self.changes))

    @property
    def writes(self) -> int:
        return sum(c.action in WRITES for c in self.changes)

    @property
    def to_reconfigure(self) -> list[str]:
        """Every service this run saves changes for, then every one an earlier run left unapplied."""
        by_name = {kind.name: kind for kind in KINDS}
        touched = [by_name[c.kind].reconfigure for c in write_order(self.changes)]
        return list(dict.fromkeys([*touched, *self.pending]))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "dry_run": self.dry_run, "refused": self.refused, "failed": self.failed,
                "reconfigured": self.reconfigured, "reconfigure_failed": self.reconfigure_failed,
                "pending": self.pending, "notes": self.notes,
                "changes": [c.to_dict() for c in self.changes if c.action != "unchanged"],
                "unchanged": sum(c.action == "unchanged" for c in self.changes)}


NEW_TAG = "(new tag of tenant {})"  # stands for a tag's uuid until the run has made it


def tag_refs(tenants: Mapping[str, Tenant], tag_rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each tenant's tag as its range, option and hosts refer to it: the uuid OPNsense gave it, or a placeholder
    the run replaces once it made the tag."""
    have = {key: str(row.get("uuid")) for row in tag_rows for key in TAGS.from_row(row).keys}
    return {name: have.get(name, NEW_TAG.format(name)) for name in tenants}
