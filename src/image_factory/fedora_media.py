"""Fedora's install media: which files a release has, and their sha256 from a signed CHECKSUM only.

- ``releases.json`` (a flat array, one object per artifact: version, arch, variant, subvariant, link,
  sha256, size) is unsigned: it is used to find files, never as the trust anchor.
- Each compose's CHECKSUM file (``Fedora-Cloud-44-1.7-x86_64-CHECKSUM`` beside the image) is
  clearsigned by the release's primary key, vendored in ``packer/keys/`` and pinned by fingerprint.
  The sha256 comes from the signed bytes only (signatures.py).
- ``image.refresh`` writes URL + ``sha256:<hex>`` into the catalogue (comments kept); a build whose
  catalogue still names a remote ``file:`` CHECKSUM verifies it the same way before Packer sees a
  plain ``sha256:``.
- A build of an entry not pinned yet (``checksum: refresh``) resolves its medium the same way at build
  time (:func:`resolve_medium`) and records URL and sha256 in the manifest; ``image.refresh`` pins in git.
- Releases past their end of life move from download.fedoraproject.org to archives.fedoraproject.org.
"""

from __future__ import annotations

import difflib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FactoryError
from .inventory import Image
from .signatures import SignatureError, clearsigned_bytes, load_pinned_key

if TYPE_CHECKING:
    from pysequoia import Cert

RELEASES_URL = "https://fedoraproject.org/releases.json"
KEYS_DIR = "packer/keys"
ARCH = "x86_64"
MAX_RELEASES_JSON = 16 * 1024 * 1024
MAX_CHECKSUM = 1024 * 1024
FETCH_TIMEOUT = 30.0
LIVE_PREFIX = "https://download.fedoraproject.org/pub/fedora/linux/"
ARCHIVE_PREFIX = "https://archives.fedoraproject.org/pub/archive/fedora/linux/"
CHECKSUM_LINE = re.compile(r"^SHA256 \((?P<name>[^()/\s]+)\) = (?P<hex>[0-9a-f]{64})$")
COMPOSE_RE = re.compile(r"-(?P<release>\d+)-(?P<compose>\d+\.\d+)[.-]")

Fetch = Callable[[str, int], bytes]


class MediaError(FactoryError):
    """releases.json or the catalogue does not give what a refresh needs."""

    exit_code = 2


def http_fetch(url: str, limit: int) -> bytes:
    """GET with TLS verified (requests' default CA bundle), a timeout and a size limit."""
    import requests

    try:
        with requests.get(url, timeout=FETCH_TIMEOUT, stream=True) as resp:
            if resp.status_code != 200:
                raise MediaError(f"{url}: HTTP {resp.status_code}")
            body = bytearray()
            for chunk in resp.iter_content(65536):
                body += chunk
                if len(body) > limit:
                    raise MediaError(f"{url}: larger than {limit} bytes; refusing it")
            return bytes(body)
    except requests.exceptions.SSLError as exc:
        from .pve import _ssl_reason

        raise MediaError(f"{url}: TLS verification failed: {_ssl_reason(exc)}") from None
    except requests.exceptions.RequestException as exc:
        from .pve import _ssl_reason

        raise MediaError(f"{url}: cannot fetch it (offline?): {_ssl_reason(exc)}") from None


def release_key_name(release: int) -> str:
    return f"RPM-GPG-KEY-fedora-{release}-primary"


def release_key(root: Path, release: int) -> Cert:
    return load_pinned_key(root / KEYS_DIR, release_key_name(release))


def checksum_url_for(link: str, variant: str) -> str:
    """The compose's CHECKSUM beside the file: Fedora-<variant>-<release>-<compose>-x86_64-CHECKSUM."""
    base, _, name = link.rpartition("/")
    m = COMPOSE_RE.search(name)
    if not m:
        raise MediaError(f"{link}: cannot tell the release and compose from the file name")
    return f"{base}/Fedora-{variant}-{m['release']}-{m['compose']}-{ARCH}-CHECKSUM"


def signed_sha256(checksum: bytes, file_name: str, cert: Cert, *, what: str) -> str:
    """The sha256 the signed part of a Fedora CHECKSUM gives for ``file_name``."""
    signed = clearsigned_bytes(checksum, cert, what=what).decode("utf-8", errors="replace")
    sums = {m["name"]: m["hex"] for m in map(CHECKSUM_LINE.match, signed.splitlines()) if m}
    if file_name not in sums:
        raise SignatureError(f"{what}: the signed part lists no SHA256 for {file_name} "
                             f"(it lists {', '.join(sorted(sums)) or 'nothing'})")
    return sums[file_name]


def verified_checksum(root: Path, release: int, checksum_url: str, file_name: str, fetch: Fetch = http_fetch) -> str:
    """``sha256:<hex>`` of ``file_name`` from ``checksum_url``, verified against the release key."""
    cert = release_key(root, release)
    body = fetch(checksum_url, MAX_CHECKSUM)
    return "sha256:" + signed_sha256(body, file_name, cert, what=checksum_url)


def archived(url: str) -> str:
    """Where a release's media live once it has reached its end of life."""
    return ARCHIVE_PREFIX + url[len(LIVE_PREFIX):] if url.startswith(LIVE_PREFIX) else url


def located(image: Image, url: str, today: date | None = None) -> str:
    """The URL a Fedora medium has today: the archive once the release is past its end of life."""
    if image.family == "fedora" and image.eol is not None and (today or date.today()) > image.eol:
        return archived(url)
    return url


# ------------------------------------------------------------------------------------------ refresh


@dataclass(frozen=True)
class Medium:
    mode: str  # cloud | iso
    link: str
    checksum_url: str
    releases_sha256: str

    @property
    def file_name(self) -> str:
        return self.link.rpartition("/")[2]


MEDIA_RULES: dict[str, Callable[[dict[str, Any]], bool]] = {
    # Cloud_Base only: the Cloud_Base_UKI variant boots a unified kernel image, not the template's GRUB path.
    "cloud": lambda e: e.get("variant") == "Cloud" and e.get("subvariant") == "Cloud_Base"
    and str(e.get("link", "")).endswith(".qcow2") and "UKI" not in str(e.get("link", "")),
    "iso": lambda e: e.get("variant") == "Everything" and str(e.get("link", "")).endswith(".iso")
    and "netinst" in str(e.get("link", "")),
}
CHECKSUM_VARIANT = {"cloud": "Cloud", "iso": "Everything"}


def pick_media(releases: Any, release: int, modes: tuple[str, ...] = tuple(MEDIA_RULES)) -> dict[str, Medium]:
    if not isinstance(releases, list):
        raise MediaError("releases.json: expected a JSON array of artifacts")
    found: dict[str, Medium] = {}
    for mode, rule in MEDIA_RULES.items():
        if mode not in modes:
            continue
        entries = [e for e in releases if isinstance(e, dict) and str(e.get("version")) == str(release)
                   and e.get("arch") == ARCH and rule(e)]
        if len(entries) != 1:
            what = "no" if not entries else f"{len(entries)}"
            raise MediaError(f"releases.json: {what} {mode} artifact(s) for Fedora {release} {ARCH} (need exactly one)")
        link = str(entries[0]["link"])
        if not link.startswith("https://") or f"-{release}-" not in link.rpartition("/")[2]:
            raise MediaError(f"releases.json: {link} is not an https link to a Fedora {release} file")
        found[mode] = Medium(mode, link, checksum_url_for(link, CHECKSUM_VARIANT[mode]),
                             str(entries[0].get("sha256", "")))
    return found


@dataclass
class RefreshResult:
    release: int
    media: dict[str, Medium]
    checksums: dict[str, str]
    entries: dict[str, str]  # catalogue entry -> mode
    diff: str
    written: bool = False
    notes: list[str] = field(default_factory=list)


def current_media(
    root: Path, release: int, modes: tuple[str, ...] = tuple(MEDIA_RULES), *, releases_url: str = RELEASES_URL,
    fetch: Fetch = http_fetch,
) -> tuple[dict[str, Medium], dict[str, str]]:
    """The release's current media (found through the unsigned releases.json) and, per mode, the sha256 the
    compose's CHECKSUM gives under the release key's signature: image.refresh and a build of an entry not
    pinned yet both take this one path."""
    try:
        releases = json.loads(fetch(releases_url, MAX_RELEASES_JSON))
    except ValueError as exc:
        raise MediaError(f"{releases_url}: not JSON: {exc}") from None
    media = pick_media(releases, release, modes)
    cert = release_key(root, release)
    checksums: dict[str, str] = {}
    for mode, medium in media.items():
        body = fetch(medium.checksum_url, MAX_CHECKSUM)
        checksums[mode] = signed_sha256(body, medium.file_name, cert, what=medium.checksum_url)
        if medium.releases_sha256 and medium.releases_sha256 != checksums[mode]:
            raise SignatureError(f"{medium.file_name}: releases.json says sha256 {medium.releases_sha256}, the signed "
                                 f"CHECKSUM says {checksums[mode]}; refusing both")
    return media, checksums


@dataclass(frozen=True)
class Resolved:
    """A catalogue entry's medium as a build resolved it: what the manifest and the report record."""

    url: str
    sha256: str
    checksum_url: str
    signed_by: str

    def as_record(self) -> dict[str, str]:
        return {"url": self.url, "sha256": self.sha256, "checksum_url": self.checksum_url,
                "signed_by": self.signed_by, "resolved": "at build time (checksum: refresh)"}


def resolve_medium(root: Path, image: Image, *, releases_url: str = RELEASES_URL,
                   fetch: Fetch = http_fetch) -> Resolved:
    """The current medium for an entry with ``checksum: refresh``, inside the entry's media directory."""
    if image.family != "fedora":
        raise MediaError(f"{image.name}: checksum: refresh is resolved for Fedora media only; pin url and "
                         "sha256 in the catalogue")
    media, checksums = current_media(root, image.release, (image.mode,), releases_url=releases_url, fetch=fetch)
    medium = media[image.mode]
    if not medium.link.startswith(image.source.url):
        raise MediaError(f"{releases_url}: the {image.mode} medium of Fedora {image.release} is {medium.link}, "
                         f"outside {image.name}'s media directory {image.source.url}; refusing it")
    return Resolved(medium.link, checksums[image.mode], medium.checksum_url, release_key_name(image.release))


def refresh_catalogue(catalogue: Path, root: Path, release: int, *, releases_url: str = RELEASES_URL,
                      dry_run: bool = False, fetch: Fetch = http_fetch) -> RefreshResult:
    """Point the catalogue's Fedora ``release`` entries at the current media with signed sha256 checksums."""
    from ruamel.yaml import YAML

    media, checksums = current_media(root, release, releases_url=releases_url, fetch=fetch)

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    before = catalogue.read_text(encoding="utf-8")
    data = yaml.load(before)
    images = data.get("images") or {}
    entries = {name: str(body.get("mode")) for name, body in images.items()
               if body.get("family") == "fedora" and int(body.get("release", 0)) == release}
    if not entries:
        raise MediaError(f"{catalogue}: no fedora entry with release {release}; add fedora-{release} (cloud) and "
                         f"fedora-{release}-iso (iso) with their eol: date first, then refresh")
    for name, mode in entries.items():
        if mode not in media:
            continue
        source = images[name].setdefault("source", {})
        source["url"] = media[mode].link
        source["checksum"] = f"sha256:{checksums[mode]}"
    out = io.StringIO()
    yaml.dump(data, out)
    after = out.getvalue()
    diff = "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), str(catalogue),
                                        str(catalogue) + " (refreshed)"))
    result = RefreshResult(release, media, checksums, entries, diff)
    if diff and not dry_run:
        tmp = catalogue.with_name(f".{catalogue.name}.refresh")
        tmp.write_text(after, encoding="utf-8")
        tmp.replace(catalogue)
        result.written = True
    return result
