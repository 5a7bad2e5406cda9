"""OPNsense's Dnsmasq DHCP host reservations kept in step with the inventory, through OPNsense's REST API.

Targets OPNsense 25.7 and later, where Dnsmasq is the default DHCP server (ISC DHCP is a plugin from 26.1).
The endpoints and the ``host`` fields are those of opnsense/core's Dnsmasq ``SettingsController`` and model
(``/api/dnsmasq/settings/{search,add,set,del}_host``, ``/api/dnsmasq/service/reconfigure``). The factory owns
the entries whose description starts with its marker; every other entry is foreign and never changed. A host's
``ip`` lists the NIC's IPv4 and IPv6 address: dnsmasq matches DHCPv6 clients by MAC too (docs/opnsense.md).
Gather (one search per kind), decide (a pure function that also replays OPNsense's own refusals over every row,
so a run that would be refused part-way writes nothing), act (deletes, sets, adds, then one reconfigure per
service, also after a failed write). A service with saved but unapplied changes is marked in OPNsense itself
(an unused Dnsmasq tag, ``PENDING``) from before the first write until its reconfigure succeeded, so any later
run, from any machine, reconfigures what an interrupted one saved.

model: the entries and kinds the factory keeps; client: the REST API; decide: what converging needs, without
I/O; sync: one run (gather, decide, act). Callers use the names below.
"""

from image_factory.handoffs.opnsense.client import TIMEOUT, OpnsenseClient, OpnsenseError
from image_factory.handoffs.opnsense.decide import (
    NEW_TAG,
    WRITES,
    Change,
    SyncReport,
    decide,
    ipv6_notes,
    pending_markers,
    plan,
    tag_refs,
    write_order,
)
from image_factory.handoffs.opnsense.model import (
    DOMAIN_NAME_OPTION,
    HOSTS,
    KINDS,
    MARKER,
    OPTIONS,
    PENDING,
    RANGES,
    TAGS,
    VLANS,
    Entry,
    HostEntry,
    Kind,
    OptionEntry,
    RangeEntry,
    TagEntry,
    VlanEntry,
    body,
)
from image_factory.handoffs.opnsense.sync import sync

__all__ = [
    "DOMAIN_NAME_OPTION", "HOSTS", "KINDS", "MARKER", "NEW_TAG", "OPTIONS", "PENDING", "RANGES", "TAGS", "TIMEOUT",
    "VLANS", "WRITES", "Change", "Entry", "HostEntry", "Kind", "OpnsenseClient", "OpnsenseError", "OptionEntry",
    "RangeEntry", "SyncReport", "TagEntry", "VlanEntry", "body", "decide", "ipv6_notes", "pending_markers", "plan",
    "sync", "tag_refs", "write_order",
]
