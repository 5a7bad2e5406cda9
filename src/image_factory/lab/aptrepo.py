"""A signed apt repository on loopback that a test controls: the lab's stand-in for a team's own package
repository (or a distribution suite) whose contents change between nights.

Packages are real ``.deb`` files made with ``dpkg-deb``; the suite has ``Packages``/``Packages.xz`` and an
``InRelease`` clearsigned by an OpenPGP key made on the spot (pysequoia), so apt in a build VM and the
factory's own epoch and pending-upgrade checks verify it exactly as they verify Debian's archive.
Also the signing helpers the unit tests use for Fedora's CHECKSUM files and Debian's suites.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.server
import lzma
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pysequoia

from image_factory.lab.loopback import serve_http


def generate_key(uid: str) -> Any:
    """A new OpenPGP key (with its secret half) for signing test data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pysequoia.Cert.generate(uid)


def public_key(cert: Any) -> Any:
    """The certificate without its secret key material, as a distribution publishes it."""
    return pysequoia.Cert.from_bytes(str(cert).encode())


def clearsign(cert: Any, text: str) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return bytes(pysequoia.sign(cert.secrets.signer(), text.encode(), mode=pysequoia.SignatureMode.CLEAR))


@contextmanager
def serve_files(files: dict[str, bytes], *, cert_and_key: tuple[str, str] | None = None) -> Iterator[str]:
    """Serve path -> body on 127.0.0.1 (404 otherwise; ``files`` may change while serving), over TLS when a
    certificate and key are given. Yields the base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = files.get(self.path.split("?", 1)[0])
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    with serve_http(Handler, cert_and_key=cert_and_key) as url:
        yield url


def build_deb(workdir: Path, name: str, version: str) -> bytes:
    """A real architecture-independent package holding /usr/share/<name>/version."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp) / "root"
        (root / "DEBIAN").mkdir(parents=True)
        (root / "DEBIAN" / "control").write_text(
            f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
            "Maintainer: Image factory lab <lab@example.invalid>\n"
            f"Description: {name}, a package the lab's tests publish new versions of\n", encoding="utf-8")
        (root / "usr/share" / name).mkdir(parents=True)
        (root / "usr/share" / name / "version").write_text(version + "\n", encoding="utf-8")
        out = Path(tmp) / "out.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(out)],
                       check=True, capture_output=True)
        return out.read_bytes()


@dataclass
class AptRepo:
    """One suite (``main``, amd64) served from memory at ``url`` while ``serve`` runs."""

    workdir: Path
    suite: str = "lab"
    key: Any = field(default_factory=lambda: generate_key("Image factory lab repository <lab@example.invalid>"))
    files: dict[str, bytes] = field(default_factory=dict)
    packages: dict[str, str] = field(default_factory=dict)  # name -> version
    url: str = ""
    _last_date: int = 0
    _serving: AbstractContextManager[str] | None = None

    @property
    def fingerprint(self) -> str:
        return str(self.key.fingerprint).lower()

    def write_public_key(self, path: Path) -> Path:
        path.write_text(str(public_key(self.key)), encoding="utf-8")
        return path

    def publish(self, packages: dict[str, str], *, date: float | None = None) -> None:
        """Serve exactly ``packages`` (name -> version), with a freshly signed InRelease (a new epoch even
        when the packages did not change)."""
        stanzas = []
        for name, version in sorted(packages.items()):
            deb = build_deb(self.workdir, name, version)
            filename = f"pool/main/{name}_{version}_all.deb"
            self.files[f"/{filename}"] = deb
            control = subprocess.run(["dpkg-deb", "-f", "/dev/stdin"], input=deb, capture_output=True,
                                     check=True).stdout.decode().strip()
            stanzas.append(f"{control}\nFilename: {filename}\nSize: {len(deb)}\n"
                           f"SHA256: {hashlib.sha256(deb).hexdigest()}\n")
        index = "\n".join(stanzas).encode()
        xz = lzma.compress(index)
        base = f"dists/{self.suite}/main/binary-amd64"
        self.files[f"/{base}/Packages"] = index
        self.files[f"/{base}/Packages.xz"] = xz
        # Each publication is a new epoch: its Date moves on by at least a second (the field's resolution).
        stamp = max(int(date if date is not None else time.time()), self._last_date + 1)
        self._last_date = stamp
        when = email.utils.formatdate(stamp, usegmt=True).replace("GMT", "UTC")
        release = (f"Origin: image-factory-lab\nLabel: image-factory-lab\nSuite: {self.suite}\n"
                   f"Codename: {self.suite}\nDate: {when}\nArchitectures: amd64\nComponents: main\nSHA256:\n"
                   f" {hashlib.sha256(index).hexdigest()} {len(index)} main/binary-amd64/Packages\n"
                   f" {hashlib.sha256(xz).hexdigest()} {len(xz)} main/binary-amd64/Packages.xz\n")
        self.files[f"/dists/{self.suite}/InRelease"] = clearsign(self.key, release)
        self.packages = dict(packages)

    def serve(self) -> str:
        self._serving = serve_files(self.files)
        self.url = self._serving.__enter__()
        return self.url

    def close(self) -> None:
        if self._serving is not None:
            self._serving.__exit__(None, None, None)
            self._serving = None
