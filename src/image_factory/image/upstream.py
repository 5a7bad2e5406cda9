"""Debian archives as an image uses them: signed suite state, the packages they offer, and what a built
image still lacks from them.

A suite's ``InRelease`` is clearsigned by the archive's key (vendored in ``packer/keys`` and pinned by
fingerprint, checked by ``signatures``); only its signed bytes are read, and every index fetched after it
must match the sha256 the signed part names. Nothing here trusts the mirror or the network.

Used by the image test's ``updates`` suite: the packages installed in the booted image are compared with
the newest each suite of the image's own ``sources.list`` offers, so a template that missed an update
never publishes.
"""

from __future__ import annotations

import hashlib
import lzma
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import requests
from debian.deb822 import Release
from debian.debian_support import Version
from defusedxml import ElementTree

from image_factory.errors import FactoryError
from image_factory.image.signatures import SignatureError, clearsigned_bytes, load_key_file, load_pinned_key

if TYPE_CHECKING:
    from pysequoia import Cert

    from image_factory.site.inventory import Repository

FETCH_TIMEOUT = 20.0
EPOCH_TIMEOUT = 5.0  # per repository, fetched in parallel: a no-op night must stay short
FEDORA_METALINK = "https://mirrors.fedoraproject.org/metalink?repo={repo}&arch=x86_64"
_METALINK_NS = {"m": "http://www.metalinker.org/", "mm0": "http://fedorahosted.org/mirrormanager"}
# Which vendored key signs which Debian suites: the security archive has its own key per release.
DEBIAN_KEYS = {
    13: {"archive": "debian-13-archive.asc", "security": "debian-13-security.asc"},
}


class UpstreamError(FactoryError):
    """An archive could not be read, or what it served does not match its signed index."""


@dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str
    components: tuple[str, ...]

    @property
    def is_security(self) -> bool:
        return self.suite.endswith("-security") or "debian-security" in self.uri


@dataclass(frozen=True)
class SuiteState:
    """One suite's signed ``InRelease``: its date and digest (the suite's epoch) and the indexes it names."""

    source: AptSource
    url: str
    date: str
    sha256: str
    signed: bytes

    def index_sha256(self, path: str) -> tuple[str, int] | None:
        """The signed sha256 and size of an index file (``main/binary-amd64/Packages.xz``)."""
        release = Release(self.signed.decode("utf-8", "replace"))
        for entry in release.get("SHA256", []):
            if entry["name"] == path:
                return str(entry["sha256"]), int(entry["size"])
        return None


class Pending(NamedTuple):
    """A package the image holds at ``installed`` while ``suite`` offers ``offered``."""

    package: str
    installed: str
    offered: str
    suite: str


def parse_sources(sources_list: str, deb822: Iterable[str] = ()) -> list[AptSource]:
    """The ``deb`` lines of a sources.list and the ``Types: deb`` stanzas of .sources files."""
    out: list[AptSource] = []
    for line in sources_list.splitlines():
        parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(parts) >= 4 and parts[0] == "deb":
            out.append(AptSource(parts[1].rstrip("/"), parts[2], tuple(parts[3:])))
    for text in deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.lstrip().startswith("#"):
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    out.append(AptSource(uri.rstrip("/"), suite, tuple(fields.get("components", "").split())))
    return out


def _get(session: requests.Session, url: str, timeout: float) -> bytes:
    try:
        response = session.get(url, timeout=timeout)
    except requests.RequestException as exc:
        raise UpstreamError(f"{url}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if response.status_code != 200:
        raise UpstreamError(f"{url}: HTTP {response.status_code}")
    return response.content


def fetch_suite(source: AptSource, keys_dir: Path, release: int, *, session: requests.Session | None = None,
                timeout: float = FETCH_TIMEOUT, cert: Cert | None = None) -> SuiteState:
    """The suite's InRelease, verified against ``cert`` (an extra repository's own key) or else the
    release's pinned key for it (archive or security)."""
    if cert is None:
        names = DEBIAN_KEYS.get(release)
        if names is None:
            raise UpstreamError(f"no Debian archive keys vendored for release {release} (have: "
                                f"{', '.join(str(r) for r in DEBIAN_KEYS)}); vendor them in {keys_dir}")
        cert = load_pinned_key(keys_dir, names["security" if source.is_security else "archive"])
    url = f"{source.uri}/dists/{source.suite}/InRelease"
    data = _get(session or requests.Session(), url, timeout)
    signed = clearsigned_bytes(data, cert, what=url)
    date = str(Release(signed.decode("utf-8", "replace")).get("Date", ""))
    return SuiteState(source, url, date, hashlib.sha256(signed).hexdigest(), signed)


def offered_versions(state: SuiteState, arch: str, *, session: requests.Session | None = None,
                     timeout: float = FETCH_TIMEOUT) -> dict[str, Version]:
    """Package -> newest version the suite offers for ``arch`` (and ``all``), from its signed indexes."""
    newest: dict[str, Version] = {}
    for component in state.source.components:
        path = f"{component}/binary-{arch}/Packages.xz"
        signed = state.index_sha256(path)
        if signed is None:
            raise UpstreamError(f"{state.url} names no {path}")
        url = f"{state.source.uri}/dists/{state.source.suite}/{path}"
        data = _get(session or requests.Session(), url, timeout)
        digest = hashlib.sha256(data).hexdigest()
        if digest != signed[0] or len(data) != signed[1]:
            raise SignatureError(f"{url}: sha256 {digest[:16]}… ({len(data)} bytes) is not the {signed[0][:16]}… "
                                 f"({signed[1]} bytes) its signed InRelease names; refusing it")
        try:
            text = lzma.decompress(data).decode("utf-8", "replace")
        except lzma.LZMAError as exc:
            raise UpstreamError(f"{url}: not xz data ({exc})") from None
        for name, version in _package_versions(text):
            v = Version(version)
            if name not in newest or v > newest[name]:
                newest[name] = v
    return newest


_STANZA_FIELD = re.compile(r"^(Package|Version): *(\S+)", re.MULTILINE)


def _package_versions(text: str) -> Iterable[tuple[str, str]]:
    """(Package, Version) of each stanza of a Packages index: a field scan, about ten times faster than a
    deb822 parse of the release suite's ~70,000 stanzas (the image test runs it on every build)."""
    name: str | None = None
    for field_name, value in _STANZA_FIELD.findall(text):
        if field_name == "Package":
            name = value
        elif name is not None:
            yield name, value
            name = None


def pending_upgrades(installed: Iterable[tuple[str, str]], offers: dict[str, dict[str, Version]]) -> list[Pending]:
    """Installed (name, version) pairs a suite offers a newer version of; ``offers`` is suite -> versions."""
    pending: list[Pending] = []
    for name, version in installed:
        have = Version(version)
        best: tuple[Version, str] | None = None
        for suite, versions in offers.items():
            offered = versions.get(name)
            if offered is not None and offered > have and (best is None or offered > best[0]):
                best = (offered, suite)
        if best is not None:
            pending.append(Pending(name, version, str(best[0]), best[1]))
    return sorted(pending, key=lambda p: p.package)


# ------------------------------------------------------------------------------------------- epochs


def fedora_repo_epoch(repo: str, *, session: requests.Session | None = None, timeout: float = EPOCH_TIMEOUT,
                      url_template: str = FEDORA_METALINK) -> str:
    """The repository's current ``repomd.xml`` as Fedora's own metalink names it (timestamp and sha256; a
    few KB from fedoraproject.org over verified TLS, not a mirror)."""
    url = url_template.format(repo=repo)
    data = _get(session or requests.Session(), url, timeout)
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise UpstreamError(f"{url}: not a metalink document ({exc})") from None
    for node in root.iter("{http://www.metalinker.org/}file"):
        if node.get("name") != "repomd.xml":
            continue
        stamp = node.findtext("mm0:timestamp", default="", namespaces=_METALINK_NS)
        digest = node.findtext("m:verification/m:hash[@type='sha256']", default="", namespaces=_METALINK_NS)
        if stamp and re.fullmatch(r"[0-9a-f]{64}", digest or ""):
            return f"repomd {stamp} sha256:{digest}"
    raise UpstreamError(f"{url}: no repomd.xml timestamp and sha256 in the metalink (repo {repo!r} unknown?)")


def repository_cert(repo: Repository, resolve: Callable[[str], Path]) -> Cert | None:
    """An extra repository's own key (checked against its pinned fingerprint); None for the release's suites."""
    if repo.key is None or repo.fingerprint is None:
        return None
    return load_key_file(resolve(repo.key), repo.fingerprint, pinned_in=f"the catalogue entry of {repo.name}")


def repository_source(repo: Repository) -> AptSource:
    assert repo.uri and repo.suite
    return AptSource(repo.uri.rstrip("/"), repo.suite, tuple(repo.components))


def debian_suite_epoch(repo: Repository, keys_dir: Path, release: int, *, session: requests.Session | None = None,
                       timeout: float = EPOCH_TIMEOUT, resolve: Callable[[str], Path] = Path) -> str:
    """The suite's signed InRelease: its Date and the sha256 of its signed bytes."""
    state = fetch_suite(repository_source(repo), keys_dir, release, session=session, timeout=timeout,
                        cert=repository_cert(repo, resolve))
    return suite_epoch(state)


def suite_epoch(state: SuiteState) -> str:
    """How a build records a suite's state (its manifest's ``upstream:<uri> <suite>`` input)."""
    return f"InRelease {state.date} sha256:{state.sha256}"


def repository_epochs(repos: list[Repository], keys_dir: Path, release: int, *, timeout: float = EPOCH_TIMEOUT,
                      resolve: Callable[[str], Path] = Path) -> tuple[dict[str, str], dict[str, str]]:
    """(name -> epoch, name -> why it could not be read), every repository fetched at once."""
    def one(repo: Repository) -> str:
        if repo.kind == "debian":
            return debian_suite_epoch(repo, keys_dir, release, timeout=timeout, resolve=resolve)
        assert repo.repo
        return fedora_repo_epoch(repo.repo, timeout=timeout)

    epochs: dict[str, str] = {}
    failures: dict[str, str] = {}
    if not repos:
        return epochs, failures
    with ThreadPoolExecutor(max_workers=min(8, len(repos))) as pool:
        futures = {repo.name: pool.submit(one, repo) for repo in repos}
        for name, future in futures.items():
            try:
                epochs[name] = future.result()
            except FactoryError as exc:
                failures[name] = str(exc)
    return epochs, failures


def security_updates(changes: dict[str, Any], repos: list[Repository], keys_dir: Path, release: int, *,
                     arch: str = "amd64", resolve: Callable[[str], Path] = Path) -> list[str]:
    """Of a build's package changes (contents.PackageDiff.to_dict), the versions a security suite of the
    image's repositories ships: the security fixes this build brought ("openssl 3.5.1-1+deb13u1 (trixie-security)")."""
    new = {c["name"]: c["to"] for c in changes.get("changed", [])}
    new.update(entry.split(" ", 1) for entry in changes.get("added", []) if " " in entry)
    found: list[str] = []
    for repo in repos:
        if repo.kind != "debian" or not new:
            continue
        source = repository_source(repo)
        if not source.is_security:
            continue
        offers = offered_versions(fetch_suite(source, keys_dir, release, cert=repository_cert(repo, resolve)), arch)
        found += [f"{name} {version} ({source.suite})" for name, version in sorted(new.items())
                  if name in offers and str(offers[name]) == version]
    return found
