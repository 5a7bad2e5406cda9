"""Serving a request handler on 127.0.0.1 for the lab's stand-ins (apt repository, OPNsense API)."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextmanager
def serve_http(handler: type[BaseHTTPRequestHandler], *, cert_and_key: tuple[str, str] | None = None) -> Iterator[str]:
    """``handler`` on an ephemeral loopback port, over TLS when a certificate and key are given; yields the
    base URL and stops the server afterwards."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    scheme = "http"
    if cert_and_key is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*cert_and_key)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"{scheme}://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
