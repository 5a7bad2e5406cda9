"""OPNsense's Dnsmasq DHCP host reservations kept in step with the inventory, through OPNsense's REST API.

Targets OPNsense 25.7 and later, where Dnsmasq is the default DHCP server (ISC DHCP is a plugin from 26.1).
The endpoints and the ``host`` fields are those of opnsense/core's Dnsmasq ``SettingsController`` and model
(``/api/dnsmasq/settings/{search,add,set,del}_host``, ``/api/dnsmasq/service/reconfigure``). The factory owns
the entries whose description starts with its marker; every other entry is foreign and never changed.
Gather (one search per kind), decide (a pure function that also replays OPNsense's own refusals over every row,
so a run that would be refused part-way writes nothing), act (deletes, sets, adds, then one reconfigure per
service, also after a failed write). A service with saved but unapplied changes is marked in OPNsense itself
(an unused Dnsmasq tag, ``PENDING``) from before the first write until its reconfigure succeeded, so any later
run, from any machine, reconfigures what an interrupted one saved.
"""

from __future__ import annotations

import dataclasses
import html
import ipaddress
import json
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import requests

from image_factory.errors import FactoryError, RemoteError
from image_factory.handoffs.dhcp import DHCP_MARKER, Reservation, host_marker, tenant_marker, tenant_tag
from image_factory.reports import Report
from image_factory.site.inventory import Tenant
from image_factory.tls import VerifiedTlsAdapter

MARKER = DHCP_MARKER
TIMEOUT = 20.0


class OpnsenseError(FactoryError):
    """OPNsense refused a change or answered something this module does not understand."""


def _text(row: dict[str, Any], name: str) -> str:
    return str(row.get(name) or "")


@dataclass(frozen=True)
class HostEntry:
    """A Dnsmasq DHCP host reservation (model item ``hosts``); the factory's are keyed by MAC."""

    host: str
    domain: str
    ip: str  # "" for a MAC-only reservation (address from the range)
    hwaddr: str
    descr: str
    set_tag: str = ""  # the tenant's tag (uuid): its domain-name option reaches a fixed address too

    def __post_init__(self) -> None:
        object.__setattr__(self, "hwaddr", self.hwaddr.lower())  # OPNsense may answer in either case

    @classmethod
    def from_reservation(cls, r: Reservation, tag_ref: str = "") -> HostEntry:
        return cls(r.hostname, r.domain, r.address or "", r.mac.lower(), host_marker(r), tag_ref)

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
        return self.entry(**{attr: _text(row, model) for model, attr in self.fields.items()})


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
    found = re.match(r"^\S+ \[(.+)\]$", _text(row, "vlanif"))
    return (f"cannot delete: assigned to {found[1]} (Interfaces: Assignments: remove the assignment, then re-run)"
            if found else "")


VLANS = Kind("vlan", "interfaces/vlan_settings", "item", "vlan", {"if": "parent", "tag": "tag", "descr": "descr"},
             VlanEntry, "interfaces/vlan_settings/reconfigure", _assigned)
# In the order they are made (and the reverse of the order they are removed): a range needs its VLAN's interface,
# ranges, options and hosts reference their tenant's tag, hosts live in the ranges.
KINDS = (VLANS, TAGS, RANGES, OPTIONS, HOSTS)


def body(kind: Kind, entry: Entry) -> dict[str, dict[str, str]]:
    return {kind.body_key: {model: getattr(entry, attr) for model, attr in kind.fields.items()}}


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
    with a MAC) may not take an address another DHCP host holds (Dnsmasq.php performValidation, checked for the
    host being saved). A write it would refuse becomes a conflict, so the run refuses before its first write."""
    held: dict[str, tuple[list[str], str, bool]] = {}  # uuid -> (addresses, who, the factory's)
    for row in rows:
        have = HOSTS.from_row(row)
        assert isinstance(have, HostEntry)
        if have.keys or _text(row, "client_id"):  # a DHCP host; host overrides may share addresses
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
                 if uid != slot and ip in ips]
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


class OpnsenseClient:
    """OPNsense's API with its key and secret (HTTP basic), TLS always verified (CA file, pin, or system CAs)."""

    def __init__(self, url: str, key: str, secret: str, *, ca_file: Path | None = None,
                 fingerprint: str | None = None, timeout: float = TIMEOUT):
        if not url.startswith("https://"):
            raise OpnsenseError(f"{url}: the OPNsense API is reached over https only")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.auth = (key, secret)
        if ca_file is not None or fingerprint is not None:
            try:
                adapter = VerifiedTlsAdapter(ca_file=ca_file, fingerprint=fingerprint)
            except (OSError, ssl.SSLError) as exc:  # missing, unreadable, or no PEM certificate in it
                raise OpnsenseError(f"CA file {ca_file}: cannot be loaded: {exc.strerror or exc}") from None
            self.session.mount("https://", adapter)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = f"{self.url}/api/{path}"
        try:
            response = self.session.request(method, url, json=body, timeout=self.timeout)
        except requests.exceptions.SSLError as exc:
            raise RemoteError("opnsense", f"TLS verification of {self.url} failed: {str(exc)[:200]}") from None
        except requests.RequestException as exc:
            raise RemoteError("opnsense", f"cannot reach {self.url}: {type(exc).__name__}") from None
        if response.status_code in (401, 403):
            raise OpnsenseError(f"{method} /api/{path}: HTTP {response.status_code}: the API key is wrong or lacks "
                                "the privilege 'Services: Dnsmasq DNS/DHCP: Settings'")
        if response.status_code != 200:
            raise OpnsenseError(f"{method} /api/{path}: HTTP {response.status_code}{_error_message(response)}")
        try:
            return response.json()
        except ValueError:
            raise OpnsenseError(f"{method} /api/{path}: the answer is not JSON") from None

    def search(self, kind: Kind) -> list[dict[str, Any]]:
        answer = self.call("POST", f"{kind.api}/search_{kind.noun}", {"current": 1, "rowCount": -1})
        rows = answer.get("rows") if isinstance(answer, dict) else None
        if not isinstance(rows, list):
            raise OpnsenseError(f"{kind.api}/search_{kind.noun}: unexpected answer {str(answer)[:200]}")
        return rows

    def _saved(self, what: str, answer: Any) -> Any:
        if isinstance(answer, dict) and answer.get("result") in ("saved", "deleted"):
            return answer
        validations = answer.get("validations") if isinstance(answer, dict) else None
        message = answer.get("errorMessage") if isinstance(answer, dict) else None
        raise OpnsenseError(f"{what}: OPNsense refused it: {validations or message or str(answer)[:200]}")

    def add(self, kind: Kind, entry: Entry) -> str:
        what = f"add {kind.name} {entry.name}"
        return str(self._saved(what, self.call("POST", f"{kind.api}/add_{kind.noun}", body(kind, entry))).get("uuid"))

    def set(self, kind: Kind, uuid: str, entry: Entry) -> None:
        self._saved(f"set {kind.name} {entry.name}",
                    self.call("POST", f"{kind.api}/set_{kind.noun}/{uuid}", body(kind, entry)))

    def delete(self, kind: Kind, uuid: str) -> None:
        self._saved(f"delete {kind.name} {uuid}", self.call("POST", f"{kind.api}/del_{kind.noun}/{uuid}"))

    def reconfigure(self, path: str) -> None:
        answer = self.call("POST", path)
        if not (isinstance(answer, dict) and answer.get("status") == "ok"):
            raise OpnsenseError(f"{path}: {str(answer)[:200]}")

    def mark_pending(self, path: str) -> str:
        return str(self._saved(f"mark {path} pending", self.call(
            "POST", "dnsmasq/settings/add_tag", {"tag": {"tag": PENDING + path}})).get("uuid"))

    def clear_pending(self, uuid: str) -> None:
        self._saved(f"clear pending marker {uuid}", self.call("POST", f"dnsmasq/settings/del_tag/{uuid}"))


def _error_message(response: requests.Response) -> str:
    """OPNsense's own words for a failed call: api.php answers every exception with ``errorMessage``, its JSON
    passed through htmlspecialchars (so "&" arrives as "&amp;")."""
    try:
        body = json.loads(html.unescape(response.text))
    except ValueError:
        return ""
    message = body.get("errorMessage") if isinstance(body, dict) else None
    return f": {' '.join(str(message).split())[:300]}" if message else ""


# The marker of a service with saved but unapplied changes: a Dnsmasq tag (model item ``dhcp_tags``) named after
# the service's reconfigure path. Dnsmasq's template renders a tag only where a range, host or option references
# it, so the marker never changes what dnsmasq serves.
PENDING = f"{MARKER} unapplied: "


def pending_markers(tag_rows: list[dict[str, Any]]) -> dict[str, str]:
    """The services an earlier run saved changes for but did not apply: reconfigure path -> marker uuid."""
    return {_text(row, "tag").removeprefix(PENDING): str(row.get("uuid")) for row in tag_rows
            if _text(row, "tag").startswith(PENDING)}


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
    if tenants and not vlan_parent:
        report.notes.append("tenant VLAN devices not managed: give --vlan-parent (the trunk to the tenant bridge)")
    if dry_run or report.refused:
        return report
    _apply(client, report, markers)
    return report


NEW_TAG = "(new tag of tenant {})"  # stands for a tag's uuid until the run has made it


def tag_refs(tenants: Mapping[str, Tenant], tag_rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each tenant's tag as its range, option and hosts refer to it: the uuid OPNsense gave it, or a placeholder
    the run replaces once it made the tag."""
    have = {key: str(row.get("uuid")) for row in tag_rows for key in TAGS.from_row(row).keys}
    return {name: have.get(name, NEW_TAG.format(name)) for name in tenants}


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
