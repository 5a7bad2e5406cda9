"""pve.py: the parts that need no server (error texts)."""

from __future__ import annotations

import pytest

from image_factory.pve import _ssl_reason

pytestmark = pytest.mark.unit

WRAP = "HTTPSConnectionPool(host='127.0.0.1', port=8006): Max retries exceeded with url: /api2/json/version ({})"


@pytest.mark.parametrize(("inner", "reason"), [
    ("Caused by SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
     "self-signed certificate in certificate chain (_ssl.c:1006)'))",
     "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate in certificate chain"),
    ("Caused by SSLError(SSLError('Fingerprints did not match. Expected \"3f9a61\", got \"0b1c2d\"'))",
     'Fingerprints did not match. Expected "3f9a61", got "0b1c2d"'),
    ("Caused by SSLError(CertificateError(\"hostname 'pve-mgmt' doesn't match 'pve1.example'\"))",
     "hostname 'pve-mgmt' doesn't match 'pve1.example'"),
    ("Caused by NewConnectionError('<urllib3.connection.HTTPSConnection object at 0x7f>: Failed to establish a new "
     "connection: [Errno 111] Connection refused')",
     "Failed to establish a new connection: [Errno 111] Connection refused"),
])
def test_tls_and_connection_reasons_are_whole_sentences(inner: str, reason: str) -> None:
    got = _ssl_reason(Exception(WRAP.format(inner)))
    assert got.startswith(reason), got
    assert got == reason


def test_unknown_long_text_is_cut_at_a_word_boundary() -> None:
    text = "word " * 100
    got = _ssl_reason(Exception(text))
    assert got.endswith(" ...") and all(w in ("word", "...") for w in got.split())
