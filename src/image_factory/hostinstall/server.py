"""The answer server: Proxmox's installer POSTs its system information, the server answers with the answer.toml of
the one hypervisor whose inventory MACs the machine carries.

The installer's side (pve-installer 9.1.7, proxmox-fetch-answer/src/fetch_plugins/http.rs and
proxmox-installer-common/src/http.rs): a POST of JSON (``$schema.version`` "1.0", product, iso, dmi,
network_interfaces[{link, mac}]) with ``Content-Type: application/json``, over TLS pinned to the SHA-256 fingerprint
of the server's certificate; any non-2xx status fails the installation with that status. It sends no credentials of
its own, so the token travels in the answer URL (``?token=``), which is baked into the ISO; a Bearer header is
accepted too (for curl). Neither the token nor the query string is ever logged.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import socket as socket_module
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socket import socket
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from image_factory.errors import FactoryError
from image_factory.files import write_atomic
from image_factory.hostinstall.model import RenderedAnswer
from image_factory.site.inventory import normalize_mac

ANSWER_PATH = "/answer"
MAX_BODY = 1024 * 1024
SCHEMA_MAJOR = "1"  # HttpFetchInfoSchema::SCHEMA_VERSION "1.0": a new major is a breaking change
MIN_TOKEN_LENGTH = 16
REQUEST_TIMEOUT = 30.0


class AnswerServerError(FactoryError):
    """The answer server cannot start (certificate, token, bind address)."""


@dataclass(frozen=True)
class Asker:
    """Who asked, as the installer describes the machine (attacker-controlled: only ever logged, sanitised)."""

    macs: tuple[str, ...]
    serial: str
    product: str


@dataclass(frozen=True)
class Reply:
    status: HTTPStatus
    body: str
    hypervisor: str = ""


# ------------------------------------------------------------------------------------------ decide


def asker_of(body: bytes) -> Asker:
    """The MACs, DMI serial and product name from the installer's POSTed system information."""
    try:
        info = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the body is not JSON") from None
    if not isinstance(info, dict):
        raise ValueError("the body is not a JSON object")
    version = str(_get(info, "$schema", "version") or "")
    if version.split(".")[0] != SCHEMA_MAJOR:
        raise ValueError(f"unsupported system-information schema version {version[:16]!r} (expected {SCHEMA_MAJOR}.x)")
    nics = info.get("network_interfaces")
    if not isinstance(nics, list) or not nics:
        raise ValueError("network_interfaces is missing or empty")
    macs = []
    for nic in nics:
        mac = normalize_mac(nic.get("mac", "")) if isinstance(nic, dict) and isinstance(nic.get("mac"), str) else ""
        if len(mac) != 17:
            raise ValueError("a network_interfaces entry has no MAC")
        macs.append(mac)
    return Asker(tuple(macs), _printable(_get(info, "dmi", "system", "serial")),
                 _printable(_get(info, "dmi", "system", "name")))


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _printable(value: Any, limit: int = 64) -> str:
    text = value if isinstance(value, str) else ""
    return "".join(ch if ch.isprintable() else "?" for ch in text[:limit]) or "-"


def choose(answers: list[RenderedAnswer], asker: Asker) -> Reply:
    """Exactly one hypervisor whose inventory MACs the machine carries, or a refusal naming why."""
    posted = set(asker.macs)
    matches = [a for a in answers if posted & set(a.macs)]
    if not matches:
        return Reply(HTTPStatus.NOT_FOUND, "no hypervisor of the inventory has any of this machine's MACs\n")
    if len(matches) > 1:
        names = ", ".join(a.hypervisor for a in matches)
        return Reply(HTTPStatus.CONFLICT, f"this machine's MACs match more than one hypervisor ({names})\n")
    return Reply(HTTPStatus.OK, matches[0].toml, matches[0].hypervisor)


def token_matches(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


# --------------------------------------------------------------------------------------- certificate


def certificate_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the DER certificate as the installer's --cert-fingerprint takes it (colon-separated hex,
    the form `openssl x509 -fingerprint -sha256` prints)."""
    der = ssl.PEM_cert_to_DER_cert(cert_pem.decode("ascii"))
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def ensure_certificate(cert: Path, key: Path, names: list[str]) -> bool:
    """Make a self-signed certificate for ``names`` unless both files exist (an ISO pins the fingerprint: it is
    reused, never silently replaced). True when made."""
    if cert.exists() and key.exists():
        return False
    if cert.exists() or key.exists():
        raise AnswerServerError(f"only one of {cert} and {key} exists; remove it or give both (--cert/--key)")
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    write_atomic(key, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()).decode(), mode=0o600)
    write_atomic(cert, certificate.public_bytes(serialization.Encoding.PEM).decode(), mode=0o644)
    return True


# ------------------------------------------------------------------------------------------- serve


class _Handler(BaseHTTPRequestHandler):
    server: AnswerServer
    timeout = REQUEST_TIMEOUT
    server_version = "deevnet-answer-server"
    sys_version = ""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        if url.path != ANSWER_PATH:
            self._reply(Reply(HTTPStatus.NOT_FOUND, f"POST the system information to {ANSWER_PATH}\n"), None)
            return
        given = parse_qs(url.query).get("token", [None])[0]
        bearer = self.headers.get("Authorization", "")
        if given is None and bearer.startswith("Bearer "):
            given = bearer.removeprefix("Bearer ").strip()
        if given is None:
            self._reply(Reply(HTTPStatus.UNAUTHORIZED, "no token: the answer URL needs ?token=\n"), None)
            return
        if not token_matches(self.server.token, given):
            self._reply(Reply(HTTPStatus.FORBIDDEN, "wrong token\n"), None)
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY:
            self._reply(Reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length.isdigit() else HTTPStatus.LENGTH_REQUIRED,
                              f"a body of at most {MAX_BODY} bytes with Content-Length\n"), None)
            return
        try:
            asker = asker_of(self.rfile.read(int(length)))
        except ValueError as exc:
            self._reply(Reply(HTTPStatus.BAD_REQUEST, f"not the installer's system information: {exc}\n"), None)
            return
        self._reply(choose(self.server.answers, asker), asker)

    def do_GET(self) -> None:  # noqa: N802
        self._reply(Reply(HTTPStatus.METHOD_NOT_ALLOWED, "the installer POSTs its system information\n"), None)

    def _reply(self, reply: Reply, asker: Asker | None) -> None:
        body = reply.body.encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)
        who = self.client_address[0]
        if asker is None:
            self.server.log(f"{who}: {int(reply.status)} {reply.status.phrase} ({reply.body.strip()})")
            return
        outcome = f"answer for {reply.hypervisor}" if reply.hypervisor else reply.body.strip()
        self.server.log(f"{who}: serial {asker.serial}, product {asker.product}, MACs {', '.join(asker.macs)}: "
                        f"{int(reply.status)} {outcome}")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """http.server logs the request line, which holds the token: the handler logs instead."""


class AnswerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, bind: tuple[str, int], answers: list[RenderedAnswer], token: str, cert: Path, key: Path,
                 log: Callable[[str], None]):
        if len(token) < MIN_TOKEN_LENGTH:
            raise AnswerServerError(f"the answer-server token is shorter than {MIN_TOKEN_LENGTH} characters; "
                                    "make one with: openssl rand -hex 32")
        self.answers, self.token, self.log = answers, token, log
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            self.tls.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise AnswerServerError(f"cannot load the certificate {cert} with key {key}: {exc}") from None
        if ":" in bind[0]:
            self.address_family = socket_module.AF_INET6
        try:
            super().__init__(bind, _Handler)
        except OSError as exc:
            raise AnswerServerError(f"cannot listen on {bind[0]}:{bind[1]}: {exc.strerror}") from None

    def get_request(self) -> tuple[socket, Any]:
        sock, address = self.socket.accept()
        sock.settimeout(REQUEST_TIMEOUT)
        # The TLS handshake runs in the request's thread (first read), not in the accept loop.
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.log(f"{client_address[0]}: connection failed (TLS handshake or a client that went away)")

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="answer-server", daemon=True)
        thread.start()
        return thread
