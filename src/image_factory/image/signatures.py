"""OpenPGP checks of what the factory downloads (pysequoia: Sequoia's verifier, not a gpgv wrapper).

The trust anchor is a public key vendored in the repository and pinned by fingerprint
(``packer/keys/fingerprints.yml``). A clearsigned file counts only when the pinned key made a valid
signature over it, and only its signed bytes are ever read: ``gpgv`` says "Good signature" on a
clearsigned file with forged lines added outside the signed block, so a file with anything outside
the block is refused outright.
"""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path

import yaml
from pysequoia import Cert, verify

from image_factory.errors import FactoryError

BEGIN = b"-----BEGIN PGP SIGNED MESSAGE-----"
END = b"-----END PGP SIGNATURE-----"
FINGERPRINTS_FILE = "fingerprints.yml"
_verified: dict[tuple[str, str], bytes] = {}  # (sha256 of the file, fingerprint) -> signed bytes
_verified_lock = threading.Lock()


class SignatureError(FactoryError):
    """A download is unsigned, badly signed, or signed by a key other than the pinned one."""

    exit_code = 3


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def pinned_fingerprint(keys_dir: Path, key_name: str) -> str:
    pins_file = keys_dir / FINGERPRINTS_FILE
    try:
        pins = yaml.safe_load(pins_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SignatureError(f"{pins_file}: cannot read the pinned fingerprints: {_first_line(exc)}") from None
    fingerprint = pins.get(key_name) if isinstance(pins, dict) else None
    if not fingerprint:
        raise SignatureError(f"{pins_file}: no pinned fingerprint for {key_name}; vendor the key and pin it first")
    return re.sub(r"\s", "", str(fingerprint)).lower()


def load_pinned_key(keys_dir: Path, key_name: str) -> Cert:
    """The vendored public key, refused unless its fingerprint is the pinned one."""
    return load_key_file(keys_dir / key_name, pinned_fingerprint(keys_dir, key_name),
                         pinned_in=keys_dir / FINGERPRINTS_FILE)


def load_key_file(path: Path, fingerprint: str, *, pinned_in: Path | str = "the catalogue") -> Cert:
    """A public key file, refused unless its fingerprint is ``fingerprint`` (hex, any case or spacing)."""
    want = fingerprint.replace(" ", "").lower()
    try:
        cert = Cert.from_file(str(path))
    except Exception as exc:  # pysequoia raises plain exceptions with a Rust backtrace appended
        raise SignatureError(f"{path}: not a readable OpenPGP public key: {_first_line(exc)}") from None
    if cert.fingerprint.lower() != want:
        raise SignatureError(f"{path}: fingerprint {cert.fingerprint.upper()} is not the pinned {want.upper()} "
                             f"({pinned_in})")
    return cert


def clearsigned_bytes(data: bytes, cert: Cert, *, what: str) -> bytes:
    """The signed bytes of a clearsigned file, if ``cert`` made a valid signature over them."""
    stripped = data.strip()
    if not stripped.startswith(BEGIN) or not stripped.endswith(END):
        if BEGIN in data:
            raise SignatureError(f"{what}: text outside the clearsigned block (forged or damaged lines added); "
                                 "refusing the whole file")
        raise SignatureError(f"{what}: not clearsigned (no OpenPGP signature); refusing it")
    if stripped.count(BEGIN) != 1 or stripped.count(END) != 1:
        raise SignatureError(f"{what}: more than one signed block; refusing the whole file")
    key = (hashlib.sha256(data).hexdigest(), cert.fingerprint.lower())
    with _verified_lock:
        if key in _verified:
            return _verified[key]
    try:
        result = verify(bytes=data, store=lambda _ids: [cert])
    except Exception as exc:
        raise SignatureError(f"{what}: signature check against {cert.fingerprint.upper()} failed: "
                             f"{_first_line(exc)}") from None
    signers = {str(getattr(sig, "certificate", "")).lower() for sig in result.valid_sigs}
    if cert.fingerprint.lower() not in signers:
        raise SignatureError(f"{what}: no valid signature by the pinned key {cert.fingerprint.upper()}")
    signed = bytes(result.bytes or b"")
    with _verified_lock:
        _verified[key] = signed
    return signed
