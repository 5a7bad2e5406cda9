"""image_factory.image.upstream against a loopback Debian archive signed by a key the test makes."""

from __future__ import annotations

import hashlib
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from image_factory.image import upstream
from image_factory.image.signatures import SignatureError, load_pinned_key
from image_factory.image.upstream import AptSource, UpstreamError
from image_factory.lab.aptrepo import AptRepo, clearsign, generate_key, public_key
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import Repository

pytestmark = pytest.mark.unit

@pytest.fixture
def archive(tmp_path: Path, loopback_http: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    files: dict[str, bytes] = {}
    with loopback_http(files) as base:
        yield f"{base}/debian", files


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Any, Any]:
    d = tmp_path / "keys"
    d.mkdir()
    archive_key, security_key = generate_key("archive <a@example>"), generate_key("security <s@example>")
    for name, cert in (("debian-13-archive.asc", archive_key), ("debian-13-security.asc", security_key)):
        (d / name).write_text(str(public_key(cert)))
    (d / "fingerprints.yml").write_text(
        f"debian-13-archive.asc: {archive_key.fingerprint}\ndebian-13-security.asc: {security_key.fingerprint}\n")
    return d, archive_key, security_key


def packages_xz(*stanzas: tuple[str, str]) -> bytes:
    text = "\n".join(f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n" for name, version in stanzas)
    return lzma.compress(text.encode())


def publish_suite(base: str, files: dict[str, bytes], suite: str, signer: Any, index: bytes, *,
                  date: str = "Thu, 26 Nov 2026 21:03:36 UTC", index_sha: str | None = None) -> None:
    prefix = base.split("/", 3)[3]
    release = (f"Origin: Debian\nSuite: {suite}\nDate: {date}\nSHA256:\n"
               f" {index_sha or hashlib.sha256(index).hexdigest()} {len(index)} main/binary-amd64/Packages.xz\n")
    files[f"/{prefix}/dists/{suite}/InRelease"] = clearsign(signer, release)
    files[f"/{prefix}/dists/{suite}/main/binary-amd64/Packages.xz"] = index


def test_parse_sources_reads_one_line_and_deb822_forms() -> None:
    listed = ("deb http://deb.example/debian trixie main\n# deb http://x/ off main\n"
              "deb [signed-by=/k.gpg] http://deb.example/debian-security/ trixie-security main contrib\n"
              "deb-src http://deb.example/debian trixie main\n")
    deb822 = ["Types: deb\nURIs: http://deb.example/debian\nSuites: trixie-updates\nComponents: main\n\n"
              "Types: deb\nEnabled: no\nURIs: http://off.example/debian\nSuites: trixie\nComponents: main\n"]
    assert upstream.parse_sources(listed, deb822) == [
        AptSource("http://deb.example/debian", "trixie", ("main",)),
        AptSource("http://deb.example/debian-security", "trixie-security", ("main", "contrib")),
        AptSource("http://deb.example/debian", "trixie-updates", ("main",)),
    ]


def test_pending_upgrades_uses_debian_version_order() -> None:
    from debian.debian_support import Version
    offers = {"trixie": {"openssl": Version("3.5.1-1"), "zlib1g": Version("1:1.3.1-1")},
              "trixie-security": {"openssl": Version("3.5.1-1+deb13u1"),
                                  "linux-image-cloud-amd64": Version("6.12.118-1")}}
    installed = [("openssl", "3.5.1-1"), ("zlib1g", "1:1.3.1-1"), ("linux-image-cloud-amd64", "6.12.118-1"),
                 ("local-only", "1.0")]
    pending = upstream.pending_upgrades(installed, offers)
    assert pending == [("openssl", "3.5.1-1", "3.5.1-1+deb13u1", "trixie-security")]
    # a ~ version sorts before its release: an installed 2.0~rc1 is behind an offered 2.0
    assert upstream.pending_upgrades([("x", "2.0~rc1")], {"s": {"x": Version("2.0")}})[0].offered == "2.0"


def test_signed_suite_and_index_are_read_and_the_security_suite_needs_its_own_key(archive: Any, keys: Any) -> None:
    base, files = archive
    keys_dir, archive_key, security_key = keys
    publish_suite(base, files, "trixie", archive_key, packages_xz(("openssl", "3.5.1-1")))
    sec_base = base + "-security"
    publish_suite(sec_base, files, "trixie-security", security_key, packages_xz(("openssl", "3.5.1-1+deb13u1")))
    state = upstream.fetch_suite(AptSource(base, "trixie", ("main",)), keys_dir, 13)
    assert state.date == "Thu, 26 Nov 2026 21:03:36 UTC" and len(state.sha256) == 64
    assert str(upstream.offered_versions(state, "amd64")["openssl"]) == "3.5.1-1"
    sec = upstream.fetch_suite(AptSource(sec_base, "trixie-security", ("main",)), keys_dir, 13)
    assert str(upstream.offered_versions(sec, "amd64")["openssl"]) == "3.5.1-1+deb13u1"
    # the security suite signed by the archive key is refused: each archive has its own key
    publish_suite(sec_base, files, "trixie-security", archive_key, packages_xz(("openssl", "9")))
    with pytest.raises(SignatureError, match="no valid signature|failed"):
        upstream.fetch_suite(AptSource(sec_base, "trixie-security", ("main",)), keys_dir, 13)


@pytest.mark.parametrize("attack", ["forged-lines", "other-key", "index-swapped", "unsigned"])
def test_what_the_signed_index_does_not_vouch_for_is_refused(archive: Any, keys: Any, attack: str) -> None:
    base, files = archive
    keys_dir, archive_key, _ = keys
    good = packages_xz(("openssl", "3.5.1-1"))
    signer = generate_key("mallory <m@example>") if attack == "other-key" else archive_key
    publish_suite(base, files, "trixie", signer, good)
    path = f"/{base.split('/', 3)[3]}/dists/trixie"
    if attack == "forged-lines":
        files[f"{path}/InRelease"] += b"\nSHA256:\n 00 1 main/binary-amd64/Packages.xz\n"
    elif attack == "index-swapped":
        files[f"{path}/main/binary-amd64/Packages.xz"] = packages_xz(("openssl", "0.1"))
    elif attack == "unsigned":
        files[f"{path}/InRelease"] = b"Origin: Debian\nSuite: trixie\n"
    source = AptSource(base, "trixie", ("main",))
    with pytest.raises(SignatureError):
        upstream.offered_versions(upstream.fetch_suite(source, keys_dir, 13), "amd64")


def test_unreachable_archive_and_unknown_release_are_clear_errors(keys: Any) -> None:
    keys_dir = keys[0]
    with pytest.raises(UpstreamError, match="no Debian archive keys vendored for release 99"):
        upstream.fetch_suite(AptSource("http://127.0.0.1:9/debian", "x", ("main",)), keys_dir, 99)
    with pytest.raises(UpstreamError, match=r"http://127.0.0.1:9/debian/dists/trixie/InRelease: ConnectionError"):
        upstream.fetch_suite(AptSource("http://127.0.0.1:9/debian", "trixie", ("main",)), keys_dir, 13, timeout=2)


def test_vendored_debian_keys_match_their_pins() -> None:
    for name, uid in (("debian-13-archive.asc", "Archive Automatic Signing Key (13/trixie)"),
                      ("debian-13-security.asc", "Security Archive Automatic Signing Key (13/trixie)")):
        cert = load_pinned_key(REPO_ROOT / "packer" / "keys", name)
        assert any(uid in str(u) for u in cert.user_ids)


METALINK = """<?xml version="1.0" encoding="utf-8"?>
<metalink version="3.0" xmlns="http://www.metalinker.org/" xmlns:mm0="http://fedorahosted.org/mirrormanager">
 <files>
  <file name="repomd.xml">
   <mm0:timestamp>1764300000</mm0:timestamp>
   <size>7000</size>
   <verification>
    <hash type="md5">00</hash>
    <hash type="sha256">{sha}</hash>
   </verification>
   <resources maxconnections="1"><url protocol="https" type="https">https://m.example/repomd.xml</url></resources>
  </file>
 </files>
</metalink>
"""


def test_fedora_epoch_is_repomd_timestamp_and_sha256_from_the_metalink(archive: Any) -> None:
    base, files = archive
    files["/metalink/updates-released-f45"] = METALINK.format(sha="c" * 64).encode()
    template = base.rsplit("/", 1)[0] + "/metalink/{repo}"
    assert upstream.fedora_repo_epoch("updates-released-f45", url_template=template) == \
        f"repomd 1764300000 sha256:{'c' * 64}"
    files["/metalink/fedora-99"] = b'<metalink xmlns="http://www.metalinker.org/"><files/></metalink>'
    with pytest.raises(UpstreamError, match="no repomd.xml timestamp and sha256"):
        upstream.fedora_repo_epoch("fedora-99", url_template=template)
    files["/metalink/broken"] = b"<metalink"
    with pytest.raises(UpstreamError, match="not a metalink document"):
        upstream.fedora_repo_epoch("broken", url_template=template)


def test_epochs_are_fetched_together_and_a_failure_is_named(archive: Any, keys: Any) -> None:
    from image_factory.site.inventory import Repository

    base, files = archive
    keys_dir, archive_key, _ = keys
    publish_suite(base, files, "trixie", archive_key, packages_xz(("openssl", "1")))
    repos = [Repository(kind="debian", uri=base, suite="trixie"),
             Repository(kind="debian", uri=base, suite="trixie-gone")]
    epochs, failures = upstream.repository_epochs(repos, keys_dir, 13, timeout=5)
    assert list(epochs) == [f"{base} trixie"] and epochs[f"{base} trixie"].startswith(
        "InRelease Thu, 26 Nov 2026 21:03:36 UTC sha256:")
    assert list(failures) == [f"{base} trixie-gone"] and "HTTP 404" in failures[f"{base} trixie-gone"]


def test_lab_repository_is_read_like_an_archive_suite_with_its_own_key(tmp_path: Path) -> None:
    """The lab's apt repository (real .deb files, signed InRelease) through the product's reader."""
    lab = AptRepo(tmp_path, suite="canary")
    lab.publish({"factory-canary": "1.0"})
    lab.serve()
    try:
        key = lab.write_public_key(tmp_path / "canary.asc")
        repo = Repository.model_validate({"kind": "debian", "uri": lab.url, "suite": "canary", "key": str(key),
                                          "fingerprint": lab.fingerprint, "packages": ["factory-canary"],
                                          "build_only": True})
        epoch = upstream.debian_suite_epoch(repo, tmp_path, 13)
        state = upstream.fetch_suite(upstream.repository_source(repo), tmp_path, 13,
                                     cert=upstream.repository_cert(repo, Path))
        assert {k: str(v) for k, v in upstream.offered_versions(state, "amd64").items()} == {"factory-canary": "1.0"}
        lab.publish({"factory-canary": "1.0"})  # re-signed, nothing else: a new epoch
        assert upstream.debian_suite_epoch(repo, tmp_path, 13) != epoch
        other = Repository.model_validate({**repo.model_dump(), "fingerprint": "ab" * 20})
        with pytest.raises(SignatureError, match="is not the pinned"):
            upstream.debian_suite_epoch(other, tmp_path, 13)
    finally:
        lab.close()


def test_security_fixes_are_the_versions_the_security_suite_ships(archive: Any, keys: Any) -> None:
    base, files = archive
    keys_dir, archive_key, security_key = keys
    sec_base = base.replace("/debian", "/debian-security")
    publish_suite(sec_base, files, "trixie-security", security_key,
                  packages_xz(("openssl", "3.5.1-1+deb13u1"), ("libzstd1", "1.5.7+dfsg-1+deb13u1")))
    repos = [Repository.model_validate({"kind": "debian", "uri": base, "suite": "trixie"}),
             Repository.model_validate({"kind": "debian", "uri": sec_base, "suite": "trixie-security"})]
    changes = {"changed": [{"name": "openssl", "from": "3.5.1-1", "to": "3.5.1-1+deb13u1"},
                           {"name": "tzdata", "from": "2025a-1", "to": "2025b-1"}],
               "added": ["libzstd1 1.5.7+dfsg-1+deb13u1"], "removed": []}
    assert upstream.security_updates(changes, repos, keys_dir, 13) == [
        "libzstd1 1.5.7+dfsg-1+deb13u1 (trixie-security)", "openssl 3.5.1-1+deb13u1 (trixie-security)"]
    assert upstream.security_updates({"changed": [], "added": []}, repos, keys_dir, 13) == []
