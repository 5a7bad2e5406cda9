"""A loopback OPNsense API for the Dnsmasq DHCP hosts: the request and answer shapes of opnsense/core's
Dnsmasq SettingsController and ServiceController (OPNsense 25.7+), and nothing else.

HTTPS with a certificate of its own, HTTP basic auth with one key and secret, JSON bodies. ``add_host`` and
``set_host`` take ``{"host": {...}}`` with the model's field names only and validate MACs, addresses and host
names as the model does (a refusal is ``{"result": "failed", "validations": {"host.<field>": ...}}``); the
search answers ``{"rows", "rowCount", "total", "current"}``; anything else is a 404.
"""

from __future__ import annotations

import base64
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

from .loopback import serve_http

# The hosts item of OPNsense core's models/OPNsense/Dnsmasq/Dnsmasq.xml, in its order.
HOST_FIELDS = ("host", "domain", "local", "ip", "cnames", "client_id", "hwaddr", "lease_time", "ignore",
               "set_tag", "descr", "comments", "aliases")
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
HOST_RE = re.compile(r"^(\*|[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)$")


@dataclass
class FakeOpnsense:
    key: str
    secret: str
    hosts: dict[str, dict[str, str]] = field(default_factory=dict)  # uuid -> fields
    reconfigures: int = 0
    writes: int = 0
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_foreign(self, **fields: str) -> str:
        uid = str(uuidlib.uuid4())
        self.hosts[uid] = {name: fields.get(name, "") for name in HOST_FIELDS}
        return uid

    def _validate(self, body: Any) -> tuple[dict[str, str] | None, dict[str, str]]:
        if not isinstance(body, dict) or set(body) != {"host"} or not isinstance(body["host"], dict):
            return None, {"host": "expected {\"host\": {...}}"}
        given = body["host"]
        problems = {f"host.{name}": "unknown field" for name in given if name not in HOST_FIELDS}
        for mac in filter(None, str(given.get("hwaddr", "")).split(",")):
            if not MAC_RE.match(mac.strip()):
                problems["host.hwaddr"] = "Invalid MAC address."
        for ip in filter(None, str(given.get("ip", "")).split(",")):
            try:
                ipaddress.ip_address(ip.strip())
            except ValueError:
                problems["host.ip"] = "Please specify a valid IP address."
        if given.get("host") and not HOST_RE.match(str(given["host"])):
            problems["host.host"] = "A valid hostname is required."
        return {name: str(given.get(name, "")) for name in HOST_FIELDS}, problems

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        self.requests.append(f"{method} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] != ["api", "dnsmasq"] or len(parts) < 4:
            return 404, {"errorMessage": "Endpoint not found"}
        controller, action, arg = parts[2], parts[3], (parts[4] if len(parts) > 4 else None)
        with self.lock:
            if (controller, action) == ("service", "reconfigure") and method == "POST":
                self.reconfigures += 1
                return 200, {"status": "ok"}
            if controller != "settings":
                return 404, {"errorMessage": "Endpoint not found"}
            if action == "search_host" and method in ("GET", "POST"):
                rows = [{"uuid": uid, **fields} for uid, fields in self.hosts.items()]
                return 200, {"rows": rows, "rowCount": len(rows), "total": len(rows), "current": 1}
            if method != "POST":
                return 405, {"errorMessage": "Method not allowed"}
            if action == "add_host" and arg is None:
                fields, problems = self._validate(body)
                if problems or fields is None:
                    return 200, {"result": "failed", "validations": problems}
                uid = str(uuidlib.uuid4())
                self.hosts[uid] = fields
                self.writes += 1
                return 200, {"result": "saved", "uuid": uid}
            if action == "set_host" and arg is not None:
                if arg not in self.hosts:
                    return 200, {"result": "failed"}
                fields, problems = self._validate(body)
                if problems or fields is None:
                    return 200, {"result": "failed", "validations": problems}
                self.hosts[arg].update({k: v for k, v in fields.items() if k in body["host"]})
                self.writes += 1
                return 200, {"result": "saved"}
            if action == "del_host" and arg is not None:
                if self.hosts.pop(arg, None) is None:
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
