"""OPNsense's REST API: a session with the key and secret, TLS always verified; search, add, set, delete per
:class:`~image_factory.handoffs.opnsense.model.Kind`, reconfigure a service, and the pending markers."""

from __future__ import annotations

import html
import json
import ssl
from pathlib import Path
from typing import Any

import requests

from image_factory.errors import FactoryError, RemoteError
from image_factory.handoffs.opnsense.model import PENDING, Entry, Kind, body
from image_factory.tls import VerifiedTlsAdapter

TIMEOUT = 20.0


class OpnsenseError(FactoryError):
    """OPNsense refused a change or answered something this module does not understand."""


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
