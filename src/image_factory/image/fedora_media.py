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
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
import yaml
from ruamel.yaml import YAML

from image_factory.errors import FactoryError
from image_factory.image.signatures import SignatureError, clearsigned_bytes, load_pinned_key
from image_factory.site.inventory import Image
from image_factory.tls import ssl_reason

if TYPE_CHECKING:
    from pysequoia import Cert

RELEASES_URL = "https://fedoraproject.org/releases.json"
KEYS_DIR = "packer/keys"
ARCH = "x86_64"
MAX_RELEASES_JSON = 16 * 1024 * 1024
MAX_CHECKSUM = 1024 * 1024
MAX_JSON_DEPTH = 8  # releases.json is an array of flat objects: depth 2
MAX_REDIRECTS = 5
FETCH_TIMEOUT = 30.0  # connect, and each read
FETCH_DEADLINE = 120.0  # the whole fetch, redirects and body included: a server trickling bytes cannot hold it
FEDORA_DOMAIN = "fedoraproject.org"
LIVE_PREFIX = "https://download.fedoraproject.org/pub/fedora/linux/"
ARCHIVE_PREFIX = "https://archives.fedoraproject.org/pub/archive/fedora/linux/"
CHECKSUM_LINE = re.compile(r"^SHA256 \((?P<name>[^()/\s]+)\) = (?P<hex>[0-9a-f]{64})$")
COMPOSE_RE = re.compile(r"-(?P<release>\d+)-(?P<compose>\d+\.\d+)[.-]")
HTTPS_RE = re.compile(r"^https://", re.IGNORECASE)
SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # https:, ftp:, s3: (s3::https://), git: ...



class Fetch(Protocol):
    def __call__(self, url: str, limit: int, *, mirrors: bool = False) -> bytes: ...


class MediaError(FactoryError):
    """releases.json or the catalogue does not give what a refresh needs."""

    exit_code = 2


def https_url(url: str, what: str) -> str:
    """``url`` with its scheme written ``https`` (any case is https); anything else is refused."""
    if not HTTPS_RE.match(url):
        scheme = SCHEME_RE.match(url)
        how = f"{scheme[0].rstrip(':')}:" if scheme else "a local path"
        raise MediaError(f"{what}: {url} is {how}, not https; refusing it (only https is fetched)")
    return "https://" + url[len("https://"):]


def host_of(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:  # an unclosed IPv6 bracket, a bad port
        return ""


def fedora_host(host: str) -> bool:
    return host == FEDORA_DOMAIN or host.endswith("." + FEDORA_DOMAIN)


def redirect_problem(asked: str, target: str, *, mirrors: bool) -> str | None:
    """Why a redirect from ``asked`` to ``target`` is refused, or None. Only https, only to Fedora's hosts or
    the host first asked; a signed file (``mirrors``) may also come from an https mirror that serves the
    same file name, since only its signature counts (download.fedoraproject.org sends every file to one)."""
    if not HTTPS_RE.match(target):
        return f"redirected to {target}, which is not https"
    host = host_of(target)
    if not host:
        return f"redirected to {target}, which is not a URL with a host"
    if fedora_host(host) or host == host_of(asked):
        return None
    if mirrors and urlsplit(target).path.rpartition("/")[2] == urlsplit(asked).path.rpartition("/")[2]:
        return None
    return f"redirected to {target}, which is not one of Fedora's hosts ({FEDORA_DOMAIN})"


def http_fetch(url: str, limit: int, *, mirrors: bool = False, deadline: float | None = None) -> bytes:
    """GET over verified TLS (requests' CA bundle): https only, redirects checked hop by hop
    (``redirect_problem``), at most ``limit`` bytes, all of it within ``deadline`` (FETCH_DEADLINE) seconds."""
    asked = https_url(url, url)
    deadline = FETCH_DEADLINE if deadline is None else deadline
    done = threading.Event()
    cancelled = threading.Event()
    outcome: list[bytes | BaseException] = []

    def work() -> None:
        try:
            outcome.append(_fetch(asked, limit, mirrors, time.monotonic() + deadline, cancelled))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=work, name=f"fetch {asked}", daemon=True).start()
    if not done.wait(deadline):
        cancelled.set()
        raise MediaError(f"{asked}: not complete within {deadline:g} s (a server trickling it, or a very slow "
                         "link); refusing it")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _fetch(asked: str, limit: int, mirrors: bool, end: float, cancelled: threading.Event) -> bytes:
    url = asked
    with requests.Session() as session:
        for _ in range(MAX_REDIRECTS + 1):
            left = max(0.1, end - time.monotonic())
            try:
                with session.get(url, timeout=(min(FETCH_TIMEOUT, left), min(FETCH_TIMEOUT, left)), stream=True,
                                 allow_redirects=False, headers={"Accept-Encoding": "identity"}) as resp:
                    if resp.is_redirect:
                        target = urljoin(url, resp.headers.get("location", ""))
                        if why := redirect_problem(asked, target, mirrors=mirrors):
                            raise MediaError(f"{asked}: {why}; refusing it")
                        url = target
                        continue
                    if resp.status_code != 200:
                        via = f" (from {url})" if url != asked else ""
                        raise MediaError(f"{asked}: HTTP {resp.status_code}{via}")
                    declared = resp.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > limit:
                        raise MediaError(f"{asked}: {declared} bytes, larger than the {limit} allowed; refusing it")
                    body = bytearray()
                    while chunk := resp.raw.read1(65536, decode_content=False):
                        if cancelled.is_set():
                            raise MediaError(f"{asked}: cancelled at its deadline")
                        body += chunk
                        if len(body) > limit:
                            raise MediaError(f"{asked}: larger than the {limit} bytes allowed; refusing it")
                    return bytes(body)
            except requests.exceptions.SSLError as exc:
                raise MediaError(f"{asked}: TLS verification failed: {ssl_reason(exc)}") from None
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                raise MediaError(f"{asked}: cannot fetch it (offline?): {ssl_reason(exc)}") from None
            except ValueError as exc:  # requests reads a redirect's Location before handing the answer back
                raise MediaError(f"{asked}: sent to a URL that cannot be used ({exc}); refusing it") from None
    raise MediaError(f"{asked}: more than {MAX_REDIRECTS} redirects; refusing it")


def parse_releases(data: bytes, what: str) -> Any:
    """releases.json's JSON, refused clearly when it is not JSON or nested deeper than ``MAX_JSON_DEPTH``."""
    text = data.decode("utf-8", errors="replace")
    depth = deepest = 0
    for bracket in re.findall(r"[][{}]", re.sub(r'"(?:[^"\\]|\\.)*"', "", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif bracket in "]}":
            depth -= 1
    if deepest > MAX_JSON_DEPTH:
        raise MediaError(f"{what}: JSON nested {deepest} deep, more than the {MAX_JSON_DEPTH} a release list "
                         "needs; refusing it")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MediaError(f"{what}: not JSON: {str(exc)[:200]}") from None


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
    sums: dict[str, str] = {}
    for m in filter(None, map(CHECKSUM_LINE.match, signed.splitlines())):
        if m["name"] in sums:
            raise SignatureError(f"{what}: the signed part lists {m['name']} more than once; refusing the file")
        sums[m["name"]] = m["hex"]
    if file_name not in sums:
        raise SignatureError(f"{what}: the signed part lists no SHA256 for {file_name} "
                             f"(it lists {', '.join(sorted(sums)) or 'nothing'})")
    return sums[file_name]


def verified_checksum(root: Path, release: int, checksum_url: str, file_name: str, fetch: Fetch = http_fetch) -> str:
    """``sha256:<hex>`` of ``file_name`` from ``checksum_url``, verified against the release key."""
    url = https_url(checksum_url, f"the CHECKSUM of {file_name}")
    cert = release_key(root, release)
    body = fetch(url, MAX_CHECKSUM, mirrors=True)
    return "sha256:" + signed_sha256(body, file_name, cert, what=url)


def remote_checksum_file(checksum: str, *, source_is_local: bool, what: str) -> str | None:
    """The https URL of a ``file:`` checksum that must be fetched and verified, or None when there is none to
    fetch (``sha256:``, or a local sums file beside a local source, which the build hashes itself). Any other
    scheme (``HTTPS://`` counts as https; ``http://``, ``ftp://``, ``s3::``...) or a local file beside a
    download is refused: Packer would read it unverified."""
    if not checksum.startswith("file:"):
        return None
    target = checksum[len("file:"):]
    if not SCHEME_RE.match(target):
        if source_is_local:
            return None
        raise MediaError(f"{what}: {checksum}: a downloaded image's checksum file must be its signed https "
                         "CHECKSUM; a local file is not verified against any key")
    return https_url(target, what)


def archived(url: str) -> str:
    """Where a release's media live once it has reached its end of life."""
    if HTTPS_RE.match(url) and ("https://" + url[len("https://"):]).startswith(LIVE_PREFIX):
        return ARCHIVE_PREFIX + url[len(LIVE_PREFIX):]
    return url


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


def link_problem(link: str, release: int, releases_host: str) -> str | None:
    """Why a releases.json link is not a file of Fedora ``release``'s own release directory, or None. An older
    release-candidate compose is signed by the same key: only ``/releases/<release>/`` is accepted."""
    if not HTTPS_RE.match(link):
        return "not https"
    host = host_of(link)
    if not host:
        return "not a URL with a host"
    parts = urlsplit(link)
    if not (fedora_host(host) or host == releases_host):
        return f"not on Fedora's hosts ({FEDORA_DOMAIN})"
    if parts.query or parts.fragment or "%" in parts.path or "\\" in parts.path:
        return "a query, fragment or escaped path"
    segments = parts.path.split("/")
    if "." in segments or ".." in segments:
        return "a path with . or .. in it"
    if f"/releases/{release}/" not in parts.path:
        return f"outside /releases/{release}/ (a pre-release or another release's compose)"
    if f"-{release}-" not in segments[-1]:
        return f"a file name that does not name Fedora {release}"
    return None


def pick_media(releases: Any, release: int, releases_url: str = RELEASES_URL,
               modes: tuple[str, ...] = tuple(MEDIA_RULES)) -> dict[str, Medium]:
    if not isinstance(releases, list):
        raise MediaError(f"{releases_url}: expected a JSON array of artifacts")
    found: dict[str, Medium] = {}
    for mode, rule in MEDIA_RULES.items():
        if mode not in modes:
            continue
        entries = [e for e in releases if isinstance(e, dict) and str(e.get("version")) == str(release)
                   and e.get("arch") == ARCH and rule(e)]
        if len(entries) != 1:
            what = "no" if not entries else f"{len(entries)}"
            raise MediaError(f"{releases_url}: {what} {mode} artifact(s) for Fedora {release} {ARCH} "
                             "(need exactly one)")
        link = str(entries[0]["link"])
        if why := link_problem(link, release, host_of(releases_url)):
            raise MediaError(f"{releases_url}: the {mode} link {link} is {why}; refusing it")
        link = "https://" + link[len("https://"):]
        found[mode] = Medium(mode, link, checksum_url_for(link, CHECKSUM_VARIANT[mode]),
                             str(entries[0].get("sha256", "")))
    return found


def edited_in_place(before: str, data: Any, updates: dict[str, dict[str, str]], catalogue: Path) -> str:
    """``before`` with the ``source`` values of ``updates`` (entry -> key -> value) rewritten where they stand,
    every other byte as it was (a re-dump would re-indent other entries), and the result proven: it loads to
    exactly the data before with these values changed."""
    lines = before.splitlines(keepends=True)
    spots: list[tuple[int, int, str, str]] = []
    for name, values in updates.items():
        source = data["images"][name].get("source")
        if source is None or any(key not in source for key in values):
            raise MediaError(f"{catalogue}: {name}: source: needs url and checksum to refresh")
        spots += [(*source.lc.value(key), value, f"{name}: source.{key}") for key, value in values.items()]
    for line, col, value, where in sorted(spots, reverse=True):  # right to left: earlier columns stay valid
        lines[line] = _replace_scalar(lines[line], col, value, f"{catalogue}: {where}")
    after = "".join(lines)
    expected = yaml.safe_load(before)
    for name, values in updates.items():
        expected["images"][name]["source"].update(values)
    if yaml.safe_load(after) != expected:
        raise MediaError(f"{catalogue}: editing the source values in place did not give the intended catalogue "
                         "(an unusual layout?); nothing written. Set url and checksum by hand")
    return after


def _replace_scalar(line: str, col: int, value: str, where: str) -> str:
    """``line`` with the scalar starting at ``col`` replaced by ``value``, quoted as it was."""
    rest = line[col:]
    quote = rest[:1]
    if quote in ("'", '"'):
        end = rest.find(quote, 1)
        if end < 0 or quote in value or "\\" in value:
            raise MediaError(f"{where}: cannot rewrite this quoted value in place; set it by hand")
        return line[:col] + quote + value + quote + rest[end + 1:]
    m = re.match(r"[^\s,{}\[\]#]*", rest)
    assert m is not None
    return line[:col] + value + rest[m.end():]


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
    releases_url = https_url(releases_url, "releases.json")
    releases = parse_releases(fetch(releases_url, MAX_RELEASES_JSON), releases_url)
    media = pick_media(releases, release, releases_url, modes)
    cert = release_key(root, release)
    checksums: dict[str, str] = {}
    for mode, medium in media.items():
        body = fetch(medium.checksum_url, MAX_CHECKSUM, mirrors=True)
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
    media, checksums = current_media(root, release, releases_url=releases_url, fetch=fetch)

    before = catalogue.read_text(encoding="utf-8")
    data = YAML().load(before)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, dict):
        raise MediaError(f"{catalogue}: no images: mapping to refresh")
    entries = {name: str(body.get("mode")) for name, body in images.items()
               if isinstance(body, dict) and body.get("family") == "fedora"
               and str(body.get("release")) == str(release)}
    if not entries:
        raise MediaError(f"{catalogue}: no fedora entry with release {release}; add fedora-{release} (cloud) and "
                         f"fedora-{release}-iso (iso) with their eol: date first, then refresh")
    updates = {name: {"url": media[mode].link, "checksum": f"sha256:{checksums[mode]}"}
               for name, mode in entries.items() if mode in media}
    after = edited_in_place(before, data, updates, catalogue)
    diff = "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), str(catalogue),
                                        str(catalogue) + " (refreshed)"))
    result = RefreshResult(release, media, checksums, entries, diff)
    if diff and not dry_run:
        tmp = catalogue.with_name(f".{catalogue.name}.refresh")
        tmp.write_text(after, encoding="utf-8")
        tmp.replace(catalogue)
        result.written = True
    return result
