"""TLS for the factory's HTTPS clients (PVE, OPNsense, Fedora's mirrors): a verified context and the reason a
handshake failed, said in one sentence."""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Any

from requests.adapters import HTTPAdapter


class VerifiedTlsAdapter(HTTPAdapter):
    """Replaces requests' certificate plumbing with our own context (CA file or fingerprint pin)."""

    def __init__(self, ca_file: Path | None = None, fingerprint: str | None = None, **kwargs: Any):
        if ca_file is None and fingerprint is None:
            raise ValueError("TLS needs a CA file or a pinned fingerprint")
        self._fingerprint = fingerprint.replace(":", "").lower() if fingerprint else None
        if ca_file is not None:
            ctx = ssl.create_default_context(cafile=str(ca_file))
            ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
        else:
            # The pin replaces chain validation: the exact certificate is compared by urllib3
            # (assert_fingerprint) right after the handshake, before the request is written. No CA store
            # is loaded for it (create_default_context's would cost 20 ms of CPU per client, unused).
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._ctx = ctx
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kw: Any) -> None:
        kw["ssl_context"] = self._ctx
        if self._fingerprint:
            kw["assert_fingerprint"] = self._fingerprint
        super().init_poolmanager(connections, maxsize, block, **kw)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        conn.cert_reqs = "CERT_REQUIRED" if self._fingerprint is None else "CERT_NONE"
        conn.ca_certs = None
        conn.ca_cert_dir = None
        if self._fingerprint:
            conn.assert_fingerprint = self._fingerprint

    def build_connection_pool_key_attributes(self, request: Any, verify: Any, cert: Any = None) -> Any:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        for key in ("ca_certs", "ca_cert_dir", "cert_reqs"):
            pool_kwargs.pop(key, None)  # type: ignore[misc]
        return host_params, pool_kwargs


_TLS_REASON_RE = re.compile(
    r"\[SSL: [A-Z0-9_]+\] [^()'\"]+?(?= \(_ssl\.c|['\")]|$)"  # OpenSSL's own sentence
    r"|Fingerprints did not match\. Expected \"[0-9a-f]+\", got \"[0-9a-f]+\""  # urllib3's pin check
    r"|hostname '[^']+' doesn't match '[^']+'"
    r"|Failed to establish a new connection: \[Errno -?\d+\] [^)'\"]+"
    r"|Connection refused|Connection reset by peer|timed out",
)


def ssl_reason(exc: Exception) -> str:
    """The sentence that says why (OpenSSL's, urllib3's), whole: never a cut through a word."""
    text = str(exc)
    m = _TLS_REASON_RE.search(text)
    if m:
        return m[0].strip()
    if len(text) <= 300:
        return text
    return text[:300].rsplit(" ", 1)[0] + " ..."
