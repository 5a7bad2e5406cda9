"""A loopback OPNsense API for Dnsmasq DHCP hosts and ranges and for VLAN devices: the request and answer shapes
of opnsense/core's Dnsmasq SettingsController and ServiceController and Interfaces VlanSettingsController
(OPNsense 25.7+; ``search_item``, ``add_item``, ``set_item``, ``del_item``, ``reconfigure``, body ``{"vlan": {...}}``,
``vlanif`` generated on add), and nothing else.

HTTPS with a certificate of its own, HTTP basic auth with one key and secret, JSON bodies. ``add_<noun>`` and
``set_<noun>`` (noun ``host`` or ``range``) take ``{"<noun>": {...}}`` with the model's field names only and
validate MACs, addresses, host names, masks and the range's required start and domain type as the model does
(a refusal is ``{"result": "failed", "validations": {"<noun>.<field>": ...}}``), and refuse a DHCP host (one with
a MAC) with two IPv4 addresses or one whose address (but a partial IPv6 "::n") another DHCP host holds (Dnsmasq.php
``performValidation``); the searches answer
``{"rows", "rowCount", "total", "current"}``; anything else is a 404. Tags (``{search,add,del}_tag``, body
``{"tag": {"tag"}}``, names unique) and options (``{search,add,set,del}_option``) are kept as the model keeps
them: a host's, range's or option's tag must exist, and a tag in use is not deleted (its safe delete).

VLAN devices can be assigned as interfaces (``assign``): the search then shows ``vlanif`` as
"vlan01 [<description>]" and a delete answers HTTP 500 with ``errorMessage``, as VlanSettingsController and api.php
do. Every exception answer carries ``errorMessage``. ``served`` is what each reconfigure applied, and
``down_after_writes`` makes the fake answer 503 to everything once that many writes were saved (a run cut off);
``faults`` answers one request as given (an unexpected failure part-way).
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import re
import threading
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from image_factory.lab.loopback import serve_http

# The hosts item of OPNsense core's models/OPNsense/Dnsmasq/Dnsmasq.xml, in its order.
HOST_FIELDS = ("host", "domain", "local", "ip", "cnames", "client_id", "hwaddr", "lease_time", "ignore",
               "set_tag", "descr", "comments", "aliases")
# The dhcp_ranges item of the same model, in its order.
RANGE_FIELDS = ("interface", "set_tag", "start_addr", "end_addr", "subnet_mask", "constructor", "mode", "prefix_len",
                "lease_time", "domain_type", "domain", "nosync", "ra_mode", "ra_priority", "ra_mtu", "ra_interval",
                "ra_router_lifetime", "description")
# The vlan item of OPNsense core's models/OPNsense/Interfaces/Vlan.xml (vlanif is generated on add: vlan0<n>).
VLAN_FIELDS = ("if", "tag", "pcp", "proto", "descr", "vlanif")
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
HOST_RE = re.compile(r"^(\*|[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)$")


TAG_FIELDS = ("tag",)
# The dhcp_options item of the same model, in its order.
OPTION_FIELDS = ("type", "option", "option6", "interface", "tag", "set_tag", "value", "force", "description")
# Fields that name dhcp_tags items by uuid (ModelRelationField): per noun, the field and whether it takes a list.
TAG_REFERENCES = {"host": (("set_tag", False),), "range": (("set_tag", False),),
                  "option": (("tag", True), ("set_tag", False))}


def _option_problems(given: dict[str, Any]) -> dict[str, str]:
    problems = {}
    if str(given.get("type", "set")) not in ("set", "match"):
        problems["option.type"] = "Option not in list."
    if not given.get("option") and not given.get("option6"):
        problems["option.option"] = "Either 'Option' or 'Option6' is required."
    elif given.get("option") and not str(given["option"]).isdigit():
        problems["option.option"] = "Option not in list."
    return problems


def _tag_problems(given: dict[str, Any]) -> dict[str, str]:
    tag = str(given.get("tag", ""))
    return {} if re.match(r"^.{1,255}$", tag) else {"tag.tag": "Description should be a string between 1 and 255 "
                                                              "characters."}


def _host_problems(given: dict[str, Any]) -> dict[str, str]:
    problems = {}
    for mac in filter(None, str(given.get("hwaddr", "")).split(",")):
        if not MAC_RE.match(mac.strip()):
            problems["host.hwaddr"] = "Invalid MAC address."
    ips = [ip.strip() for ip in str(given.get("ip", "")).split(",") if ip.strip()]
    if not all(_is_ip(ip) for ip in ips):
        problems["host.ip"] = "Please specify a valid IP address."
    elif (given.get("hwaddr") or given.get("client_id")) and sum(":" not in ip for ip in ips) > 1:
        problems["host.ip"] = "For IPv4 dhcp reservations, only a single address is allowed."  # Dnsmasq.php
    if given.get("host") and not HOST_RE.match(str(given["host"])):
        problems["host.host"] = "A valid hostname is required."
    return problems


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip())
    except ValueError:
        return False
    return True


def _range_problems(given: dict[str, Any]) -> dict[str, str]:
    problems = {}
    if not given.get("start_addr"):
        problems["range.start_addr"] = "A value is required."
    for name in ("start_addr", "end_addr"):
        if given.get(name) and not _is_ip(str(given[name])):
            problems[f"range.{name}"] = "Please specify a valid IP address."
    if given.get("subnet_mask"):
        try:
            ipaddress.IPv4Network(f"0.0.0.0/{given['subnet_mask']}")
        except ValueError:
            problems["range.subnet_mask"] = "Please enter a valid IPv4 subnet mask like 255.255.255.0."
    if str(given.get("domain_type", "range")) not in ("interface", "range"):
        problems["range.domain_type"] = "Option not in list."
    return problems


def _vlan_problems(given: dict[str, Any]) -> dict[str, str]:
    problems = {}
    if not given.get("if"):
        problems["vlan.if"] = "A value is required."
    tag = str(given.get("tag", ""))
    if not tag.isdigit() or not 1 <= int(tag) <= 4094:
        problems["vlan.tag"] = "Value should be between 1 and 4094."
    return problems


NOUNS = {"host": (HOST_FIELDS, _host_problems), "range": (RANGE_FIELDS, _range_problems),
         "tag": (TAG_FIELDS, _tag_problems), "option": (OPTION_FIELDS, _option_problems)}
ASSIGNED = "This VLAN cannot be deleted because it is assigned as an interface."


def _addresses(fields: dict[str, str]) -> set[str]:
    """A DHCP host's addresses that no other DHCP host may hold: a partial IPv6 one ("::56") may repeat."""
    return {ip.strip() for ip in fields.get("ip", "").split(",") if ip.strip() and not ip.strip().startswith("::")}


def _is_dhcp(fields: dict[str, str]) -> bool:
    return bool(fields.get("hwaddr") or fields.get("client_id"))



@dataclass
class FakeOpnsense:
    key: str
    secret: str
    hosts: dict[str, dict[str, str]] = field(default_factory=dict)  # uuid -> fields
    ranges: dict[str, dict[str, str]] = field(default_factory=dict)
    vlans: dict[str, dict[str, str]] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    options: dict[str, dict[str, str]] = field(default_factory=dict)
    assigned: dict[str, str] = field(default_factory=dict)  # vlanif -> the interface's description
    served: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # what the last reconfigures applied
    down_after_writes: int | None = None
    faults: dict[str, tuple[int, Any]] = field(default_factory=dict)  # "POST /api/..." -> one answer, used once
    reconfigures: int = 0
    vlan_reconfigures: int = 0
    writes: int = 0
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _items(self, noun: str) -> dict[str, dict[str, str]]:
        return {"host": self.hosts, "range": self.ranges, "vlan": self.vlans, "tag": self.tags,
                "option": self.options}[noun]

    def _unknown_tags(self, key: str, fields: dict[str, str]) -> dict[str, str]:
        """A ModelRelationField takes only uuids of existing dhcp_tags items."""
        problems = {}
        for name, many in TAG_REFERENCES.get(key, ()):
            refs = [r for r in (fields.get(name, "").split(",") if many else [fields.get(name, "")]) if r]
            if any(r not in self.tags for r in refs):
                problems[f"{key}.{name}"] = "Option not in list."
        return problems

    def _tag_users(self, uid: str) -> list[str]:
        """Items that refer to tag ``uid`` (the safe delete of the Dnsmasq settings controller refuses those)."""
        return [f"{key} {item_uid}" for key, refs in TAG_REFERENCES.items()
                for item_uid, item in self._items(key).items()
                if any(uid in item.get(name, "").split(",") for name, _ in refs)]

    def assign(self, uuid: str, description: str) -> None:
        """Assign a VLAN device as an interface (Interfaces: Assignments)."""
        self.assigned[self.vlans[uuid]["vlanif"]] = description

    def _taken(self, fields: dict[str, str], uid: str | None) -> dict[str, str]:
        """Dnsmasq.php: a DHCP host's address may not be another DHCP host's."""
        if not _is_dhcp(fields):
            return {}
        for other_uid, other in self.hosts.items():
            if other_uid != uid and _is_dhcp(other) and (same := sorted(_addresses(fields) & _addresses(other))):
                return {"host.ip": f"'{same[0]}' is already used in another DHCP host entry."}
        return {}

    def _unique_tag(self, fields: dict[str, str], uid: str | None) -> dict[str, str]:
        taken = any(u != uid and t["tag"] == fields["tag"] for u, t in self.tags.items())
        return {"tag.tag": "Tag names should be unique."} if taken else {}

    def _row(self, key: str, fields: dict[str, str]) -> dict[str, str]:
        if key == "vlan" and fields.get("vlanif") in self.assigned:  # as searchItemAction shows it
            return {**fields, "vlanif": f"{fields['vlanif']} [{self.assigned[fields['vlanif']]}]"}
        return fields

    def add_foreign(self, noun: str = "host", **fields: str) -> str:
        uid = str(uuidlib.uuid4())
        names = VLAN_FIELDS if noun == "vlan" else NOUNS[noun][0]
        self._items(noun)[uid] = {name: fields.get(name, "") for name in names}
        return uid

    def _validate(self, key: str, body: Any, uid: str | None) -> tuple[dict[str, str] | None, dict[str, str]]:
        if not isinstance(body, dict) or set(body) != {key} or not isinstance(body[key], dict):
            return None, {key: f"expected {{\"{key}\": {{...}}}}"}
        names, check = (VLAN_FIELDS, _vlan_problems) if key == "vlan" else NOUNS[key]
        given = body[key]
        problems = {f"{key}.{name}": "unknown field" for name in given if name not in names}
        problems.update(check(given))
        fields = {name: str(given.get(name, "")) for name in names}
        if uid is not None:  # a set keeps the fields it does not name
            fields = {**self._items(key).get(uid, {}), **{k: v for k, v in fields.items() if k in given}}
        if key == "host":
            problems.update(self._taken(fields, uid))
        elif key == "tag":
            problems.update(self._unique_tag(fields, uid))
        problems.update(self._unknown_tags(key, fields))
        return fields, problems

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        self.requests.append(f"{method} {path}")
        parts = path.strip("/").split("/")
        if len(parts) < 4 or parts[0] != "api":
            return 404, {"errorMessage": "Endpoint not found"}
        controller, action, arg = "/".join(parts[1:3]), parts[3], (parts[4] if len(parts) > 4 else None)
        verb, _, noun = action.partition("_")
        with self.lock:
            if self.down_after_writes is not None and self.writes >= self.down_after_writes:
                return 503, {"errorMessage": "Service Unavailable"}
            fault = next((k for k in self.faults if f"{method} {path}".startswith(k)), None)
            if fault is not None:
                return self.faults.pop(fault)
            if method == "POST" and (controller, action) == ("dnsmasq/service", "reconfigure"):
                self.reconfigures += 1
                self.served.update(hosts=copy.deepcopy(self.hosts), ranges=copy.deepcopy(self.ranges),
                                   options=copy.deepcopy(self.options))
                return 200, {"status": "ok"}
            if method == "POST" and (controller, action) == ("interfaces/vlan_settings", "reconfigure"):
                self.vlan_reconfigures += 1
                self.served.update(vlans=copy.deepcopy(self.vlans))
                return 200, {"status": "ok"}
            if controller == "dnsmasq/settings" and noun in NOUNS:
                key = noun
            elif controller == "interfaces/vlan_settings" and noun == "item":
                key = "vlan"
            else:
                return 404, {"errorMessage": "Endpoint not found"}
            return self._crud(method, verb, key, arg, body)

    def _crud(self, method: str, verb: str, key: str, arg: str | None, body: Any) -> tuple[int, Any]:
        items = self._items(key)
        if verb == "search" and method in ("GET", "POST"):
            rows = [{"uuid": uid, **self._row(key, fields)} for uid, fields in items.items()]
            return 200, {"rows": rows, "rowCount": len(rows), "total": len(rows), "current": 1}
        if method != "POST":
            return 405, {"errorMessage": "Method not allowed"}
        if verb == "add" and arg is None:
            fields, problems = self._validate(key, body, None)
            if problems or fields is None:
                return 200, {"result": "failed", "validations": problems}
            if key == "vlan":
                fields["vlanif"] = f"vlan0{len(self.vlans) + 1}"
            uid = str(uuidlib.uuid4())
            items[uid] = fields
            self.writes += 1
            return 200, {"result": "saved", "uuid": uid}
        if verb == "set" and arg is not None:
            if arg not in items:
                return 200, {"result": "failed"}
            fields, problems = self._validate(key, body, arg)
            if problems or fields is None:
                return 200, {"result": "failed", "validations": problems}
            items[arg].update({k: v for k, v in fields.items() if k in body[key]})
            self.writes += 1
            return 200, {"result": "saved"}
        if verb == "del" and arg is not None:
            if key == "vlan" and self.vlans.get(arg, {}).get("vlanif") in self.assigned:
                return 500, {"errorMessage": ASSIGNED, "errorTitle": "", "errorLevel": "error"}  # a UserException
            if key == "tag" and (users := self._tag_users(arg)):
                return 500, {"errorMessage": f"Item in use by {', '.join(users)}", "errorTitle": "Item in use by"}
            if items.pop(arg, None) is None:
                return 200, {"result": "not found"}
            self.writes += 1
            return 200, {"result": "deleted"}
        return 404, {"errorMessage": "Endpoint not found"}


@contextmanager
def serve(fake: FakeOpnsense, cert_and_key: tuple[str, str]) -> Iterator[str]:
    """The fake on 127.0.0.1 over HTTPS; yields its base URL."""
    expected = "Basic " + base64.b64encode(f"{fake.key}:{fake.secret}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            if self.headers.get("Authorization") != expected:
                self._send(401, {"status": 401, "message": "Authentication Failed"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                self._send(400, {"errorMessage": "Invalid JSON"})
                return
            self._send(*fake.handle(method, self.path, body))

        def _send(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._answer("GET")

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self._answer("POST")

        def log_message(self, *args: Any) -> None:
            pass

    with serve_http(Handler, cert_and_key=cert_and_key) as url:
        yield url
