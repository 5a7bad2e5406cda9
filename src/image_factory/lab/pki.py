"""The lab's keys and certificates, made like a PVE node's.

The CA mirrors ``/etc/pve/pve-root-ca.pem`` of a PVE installed before 2026: basicConstraints
CA:TRUE and *no* keyUsage extension (Python 3.13's VERIFY_X509_STRICT refuses such a CA, which
is exactly what the production client must cope with). The node certificate mirrors
``pve-ssl.pem``: signed by that CA, SANs for the node's address and name, serverAuth.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from image_factory.lab.config import write_private, write_public

_NOW = datetime.datetime.now


def _now() -> datetime.datetime:
    return _NOW(datetime.UTC)


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def ensure_ca(cert_path: Path, key_path: Path) -> None:
    """Make the lab CA unless both files exist."""
    if cert_path.exists() and key_path.exists():
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "Proxmox Virtual Environment"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "deevnet-image-factory lab"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PVE Cluster Manager CA"),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(days=1))
        .not_valid_after(_now() + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    write_private(key_path, _pem_key(key))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def ensure_node_cert(ca_cert: Path, ca_key: Path, cert_path: Path, key_path: Path, node: str, address: str) -> None:
    """Make the node's pve-ssl.pem/.key signed by the lab CA unless they exist for this address."""
    if cert_path.exists() and key_path.exists():
        existing = x509.load_pem_x509_certificate(cert_path.read_bytes())
        sans = existing.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if ipaddress.ip_address(address) in sans.get_values_for_type(x509.IPAddress):
            return
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = _load_key(ca_key)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, f"{node}.lab.invalid"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PVE Cluster Node"),
    ])
    sans = x509.SubjectAlternativeName([
        x509.IPAddress(ipaddress.ip_address(address)),
        x509.DNSName(node),
        x509.DNSName(f"{node}.lab.invalid"),
        x509.DNSName("localhost"),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(days=1))
        .not_valid_after(_now() + datetime.timedelta(days=700))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=True, key_encipherment=True, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(sans, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
        .sign(signer, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    write_private(key_path, _pem_key(key))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def cert_fingerprint(cert_path: Path) -> str:
    """SHA-256 fingerprint of a PEM certificate, as PVE shows it: 32 colon-separated upper-case hex bytes."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, 64, 2))


def ensure_ssh_key(private_path: Path, comment: str) -> str:
    """An ed25519 key pair in OpenSSH format (private 0600, public next to it); returns the public line."""
    pub_path = private_path.with_name(private_path.name + ".pub")
    if private_path.exists() and pub_path.exists():
        return pub_path.read_text().strip()
    key = ed25519.Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    write_private(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = f"{public.decode()} {comment}"
    write_public(pub_path, line + "\n")
    return line
