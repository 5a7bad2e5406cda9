"""One opnsense.sync run: gather (one search per kind), decide (:mod:`.decide`), act (mark the services pending,
write in order, reconfigure every service written to even after a failed write, clear its marker)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, cast

from image_factory.errors import FactoryError
from image_factory.handoffs.dhcp import Reservation
from image_factory.handoffs.opnsense.client import OpnsenseClient
from image_factory.handoffs.opnsense.decide import (
    NEW_TAG,
    SyncReport,
    ipv6_notes,
    pending_markers,
    plan,
    tag_refs,
    write_order,
)
from image_factory.handoffs.opnsense.model import (
    HOSTS,
    KINDS,
    OPTIONS,
    RANGES,
    TAGS,
    VLANS,
    Entry,
    HostEntry,
    OptionEntry,
    RangeEntry,
    TagEntry,
    VlanEntry,
)
from image_factory.site.inventory import Tenant


def sync(client: OpnsenseClient, reservations: list[Reservation], *, dry_run: bool,
         tenants: Mapping[str, Tenant] | None = None, vlan_parent: str | None = None) -> SyncReport:
    """Converge OPNsense's tenant VLAN devices (on ``vlan_parent``, the trunk to the tenant bridge), Dnsmasq
    ranges (one per tenant) and host reservations; a dry run only plans.

    A conflict (a foreign object in the way, or a write OPNsense would refuse) refuses the whole run before its
    first write. Otherwise the writes are made, and every service they touched, or an earlier run left
    unapplied, is reconfigured, also when a write failed part-way (the report then carries both).
    """
    tenants = tenants or {}
    rows = {TAGS.name: client.search(TAGS)}
    markers = pending_markers(rows[TAGS.name])
    refs = tag_refs(tenants, rows[TAGS.name])
    # the kinds this run manages are the kinds it has a desired list for: VLAN devices only with their parent
    desired: dict[str, list[Entry]] = {
        TAGS.name: [TagEntry.from_tenant(t) for t in tenants.values()],
        RANGES.name: [RangeEntry.from_tenant(t, refs[t.name]) for t in tenants.values()],
        OPTIONS.name: [OptionEntry.from_tenant(t, refs[t.name]) for t in tenants.values()],
        HOSTS.name: [HostEntry.from_reservation(r, refs.get(r.tenant or "", ""))
                     for r in reservations],
    }
    if vlan_parent:
        desired[VLANS.name] = [VlanEntry.from_tenant(t, vlan_parent) for t in tenants.values()]
    kinds = [k for k in KINDS if k.name in desired]
    rows.update((kind.name, client.search(kind)) for kind in kinds if kind.name not in rows)
    report = plan(kinds, desired, rows, sorted(markers))
    report.dry_run = dry_run
    report.notes += ipv6_notes(desired[HOSTS.name], rows[RANGES.name])
    if tenants and not vlan_parent:
        report.notes.append("tenant VLAN devices not managed: give --vlan-parent (the trunk to the tenant bridge)")
    if dry_run or report.refused:
        return report
    _apply(client, report, markers)
    return report


def _resolved(entry: Entry, made: Mapping[str, str]) -> Entry:
    """``entry`` with every placeholder for a tag this run made replaced by the tag's uuid."""
    updates = {attr: made[value] for attr in ("set_tag", "tag") if (value := str(getattr(entry, attr, ""))) in made}
    return cast(Entry, dataclasses.replace(cast(Any, entry), **updates)) if updates else entry


def _apply(client: OpnsenseClient, report: SyncReport, markers: dict[str, str]) -> None:
    """Write, then reconfigure every service written to (even after a failed write) and clear its marker."""
    by_name = {kind.name: kind for kind in KINDS}
    made: dict[str, str] = {}  # placeholder -> the uuid of the tag this run made
    try:
        for path in report.to_reconfigure:
            if path not in markers:
                markers[path] = client.mark_pending(path)  # before its first write: a crash leaves it marked
        for change in write_order(report.changes):
            kind = by_name[change.kind]
            if change.want:
                change.want = _resolved(change.want, made)
            if change.action == "create" and change.want:
                change.uuid = client.add(kind, change.want)
                if isinstance(change.want, TagEntry):
                    made[NEW_TAG.format(change.key)] = change.uuid
            elif change.action == "update" and change.want and change.uuid:
                client.set(kind, change.uuid, change.want)
            elif change.action == "delete" and change.uuid:
                client.delete(kind, change.uuid)
    except FactoryError as exc:
        report.failed = str(exc)
    for path in report.to_reconfigure:
        if path not in markers:
            continue  # never marked: nothing was written for it
        try:
            client.reconfigure(path)
        except FactoryError as exc:
            report.reconfigure_failed[path] = f"{exc} (still marked pending: the next run reconfigures it)"
            continue
        report.reconfigured.append(path)
        try:
            client.clear_pending(markers[path])
        except FactoryError as exc:
            report.notes.append(f"{path} was applied, but its pending marker stays ({exc}): the next run "
                                "reconfigures it once more")
