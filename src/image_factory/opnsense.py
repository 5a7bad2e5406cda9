"""OPNsense's Dnsmasq DHCP host reservations kept in step with the inventory, through OPNsense's REST API.

Targets OPNsense 25.7 and later, where Dnsmasq is the default DHCP server (ISC DHCP is a plugin from 26.1).
The endpoints and the ``host`` fields are those of opnsense/core's Dnsmasq ``SettingsController`` and model
(``/api/dnsmasq/settings/{search,add,set,del}_host``, ``/api/dnsmasq/service/reconfigure``). The factory owns
the entries whose description starts with its marker; every other entry is foreign and never changed.
Gather (one search), decide (a pure function), act (adds, sets, deletes, then one reconfigure).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from .errors import FactoryError, RemoteError
from .mac import Reservation
from .pve import VerifiedTlsAdapter

MARKER = "[image-factory]"
# The fields the factory sets; the others keep the values OPNsense gives them (or an operator set).
FIELDS = ("host", "domain", "ip", "hwaddr", "descr")
TIMEOUT = 20.0


class OpnsenseError(FactoryError):
    """OPNsense refused a change or answered something this module does not understand."""


@dataclass(frozen=True)
class HostEntry:
    host: str
    domain: str
    ip: str  # "" for a MAC-only reservation (address from the range)
    hwaddr: str
    descr: str

    @classmethod
    def from_reservation(cls, r: Reservation) -> HostEntry:
        return cls(r.hostname, r.domain, r.address or "", r.mac.lower(),
                   f"{MARKER} {r.vm} nic{r.nic} {r.plane}/{r.role} on {r.hypervisor}")

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> HostEntry:
        def text(name: str) -> str:
            return str(row.get(name) or "")

        return cls(text("host"), text("domain"), text("ip"), text("hwaddr").lower(), text("descr"))

    def body(self) -> dict[str, dict[str, str]]:
        return {"host": {name: getattr(self, name) for name in FIELDS}}


@dataclass
class Change:
    action: str  # create | update | delete | unchanged | conflict
    mac: str
    uuid: str | None = None
    want: HostEntry | None = None
    diff: dict[str, tuple[str, str]] = field(default_factory=dict)
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "mac": self.mac, "uuid": self.uuid,
                "host": self.want.host if self.want else None,
                "diff": {k: {"from": a, "to": b} for k, (a, b) in self.diff.items()}, "why": self.why}


def ours(entry: HostEntry) -> bool:
    return entry.descr.startswith(MARKER)


def decide(desired: list[HostEntry], rows: list[dict[str, Any]]) -> list[Change]:
    """What converging needs, from the desired entries and OPNsense's rows (pure)."""
    mine: dict[str, tuple[str, HostEntry]] = {}
    foreign: dict[str, HostEntry] = {}
    for row in rows:
        have = HostEntry.from_row(row)
        for mac in filter(None, (m.strip() for m in have.hwaddr.split(","))):
            if ours(have):
                mine[mac] = (str(row.get("uuid")), have)
            else:
                foreign[mac] = have
    changes: list[Change] = []
    wanted = {d.hwaddr: d for d in desired}
    for mac, want in sorted(wanted.items()):
        if mac in foreign:
            changes.append(Change("conflict", mac, want=want, why=(
                f"a reservation the factory does not own holds {mac} ({foreign[mac].host or 'no host'}, "
                f"{foreign[mac].ip or 'no ip'}): left alone; remove it in OPNsense or change the inventory")))
        elif mac not in mine:
            changes.append(Change("create", mac, want=want))
        else:
            uuid, have = mine[mac]
            diff = {name: (getattr(have, name), getattr(want, name)) for name in FIELDS
                    if getattr(have, name) != getattr(want, name)}
            changes.append(Change("update" if diff else "unchanged", mac, uuid, want, diff))
    for mac, (uuid, have) in sorted(mine.items()):
        if mac not in wanted:
            changes.append(Change("delete", mac, uuid, why=f"{have.host}: no NIC of the inventory has this MAC"))
    return changes


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
            self.session.mount("https://", VerifiedTlsAdapter(ca_file=ca_file, fingerprint=fingerprint))

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
            raise OpnsenseError(f"{method} /api/{path}: HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise OpnsenseError(f"{method} /api/{path}: the answer is not JSON") from None

    def search_hosts(self) -> list[dict[str, Any]]:
        answer = self.call("POST", "dnsmasq/settings/search_host", {"current": 1, "rowCount": -1})
        rows = answer.get("rows") if isinstance(answer, dict) else None
        if not isinstance(rows, list):
            raise OpnsenseError(f"search_host: unexpected answer {str(answer)[:200]}")
        return rows

    def _saved(self, what: str, answer: Any) -> Any:
        if isinstance(answer, dict) and answer.get("result") in ("saved", "deleted"):
            return answer
        validations = answer.get("validations") if isinstance(answer, dict) else None
        raise OpnsenseError(f"{what}: OPNsense refused it: {validations or str(answer)[:200]}")

    def add_host(self, entry: HostEntry) -> str:
        return str(self._saved(f"add_host {entry.host}", self.call("POST", "dnsmasq/settings/add_host",
                                                                     entry.body())).get("uuid"))

    def set_host(self, uuid: str, entry: HostEntry) -> None:
        self._saved(f"set_host {entry.host}", self.call("POST", f"dnsmasq/settings/set_host/{uuid}", entry.body()))

    def del_host(self, uuid: str) -> None:
        self._saved(f"del_host {uuid}", self.call("POST", f"dnsmasq/settings/del_host/{uuid}"))

    def reconfigure(self) -> None:
        answer = self.call("POST", "dnsmasq/service/reconfigure")
        if not (isinstance(answer, dict) and answer.get("status") == "ok"):
            raise OpnsenseError(f"dnsmasq reconfigure: {str(answer)[:200]}")


@dataclass
class SyncReport:
    changes: list[Change]
    dry_run: bool
    reconfigured: bool = False

    @property
    def ok(self) -> bool:
        return not any(c.action == "conflict" for c in self.changes)

    @property
    def writes(self) -> int:
        return sum(c.action in ("create", "update", "delete") for c in self.changes)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "dry_run": self.dry_run, "reconfigured": self.reconfigured,
                "changes": [c.to_dict() for c in self.changes if c.action != "unchanged"],
                "unchanged": sum(c.action == "unchanged" for c in self.changes)}


def sync(client: OpnsenseClient, reservations: list[Reservation], *, dry_run: bool) -> SyncReport:
    """Converge OPNsense's Dnsmasq hosts to the reservations; a dry run only plans. Conflicts are reported and
    left alone; everything else is applied, then Dnsmasq is reconfigured once."""
    report = SyncReport(decide([HostEntry.from_reservation(r) for r in reservations], client.search_hosts()),
                        dry_run)
    if dry_run:
        return report
    for change in report.changes:
        if change.action == "create" and change.want:
            change.uuid = client.add_host(change.want)
        elif change.action == "update" and change.want and change.uuid:
            client.set_host(change.uuid, change.want)
        elif change.action == "delete" and change.uuid:
            client.del_host(change.uuid)
    if report.writes:
        client.reconfigure()
        report.reconfigured = True
    return report
