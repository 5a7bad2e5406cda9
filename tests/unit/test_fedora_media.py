"""fedora_media + signatures: image.refresh against a loopback HTTPS server with a key the test makes.

The server serves a releases.json and per-compose CHECKSUM files clearsigned by a key generated here,
vendored into a scratch repository and pinned there by fingerprint, exactly as packer/keys/ does.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fakepve.certs import make_cert

from image_factory.image import fedora_media as fm
from image_factory.image.signatures import SignatureError, clearsigned_bytes, load_pinned_key
from image_factory.lab.aptrepo import clearsign, generate_key, public_key
from image_factory.lab.loopback import serve_http
from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit

CLOUD = "Fedora-Cloud-Base-Generic-45-1.3.x86_64.qcow2"
UKI = "Fedora-Cloud-Base-UKI-45-1.3.x86_64.qcow2"
ISO = "Fedora-Everything-netinst-x86_64-45-1.3.iso"
CLOUD_SUM, ISO_SUM = "a" * 64, "b" * 64


def checksum_text(name: str, digest: str) -> str:
    return f"# {name}: 1024 bytes\nSHA256 ({name}) = {digest}\n"


class Files(dict[str, bytes]):
    """path -> body served by the loopback server."""


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loopback_http: Any) -> Iterator[tuple[str, Files]]:
    cert, key, _ = make_cert(str(tmp_path), name="media", hosts=("127.0.0.1",))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", cert)
    files = Files()
    with loopback_http(files, cert_and_key=(cert, key)) as base:
        yield base, files


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, Any]:
    """A scratch repository root with the catalogue and a pinned key of the test's own."""
    root = tmp_path / "repo"
    (root / "packer/keys").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "packer/images.yml", root / "packer/images.yml")
    signer = generate_key("Fedora (45) <fedora-45-primary@fedoraproject.org>")
    (root / "packer/keys" / fm.release_key_name(45)).write_text(str(public_key(signer)))
    (root / "packer/keys/fingerprints.yml").write_text(f"{fm.release_key_name(45)}: {signer.fingerprint.upper()}\n")
    return root, signer


def publish_release(base: str, files: Files, signer: Any, *, cloud: bytes | None = None, iso: bytes | None = None,
                    releases: str | None = None) -> None:
    d = "/pub/fedora/linux/releases/45"
    entries = [
        {"version": "45", "arch": "x86_64", "variant": "Cloud", "subvariant": "Cloud_Base",
         "link": f"{base}{d}/Cloud/x86_64/images/{CLOUD}", "sha256": CLOUD_SUM},
        {"version": "45", "arch": "x86_64", "variant": "Cloud", "subvariant": "Cloud_Base_UKI",
         "link": f"{base}{d}/Cloud/x86_64/images/{UKI}", "sha256": "c" * 64},
        {"version": "45", "arch": "aarch64", "variant": "Cloud", "subvariant": "Cloud_Base",
         "link": f"{base}{d}/Cloud/aarch64/images/Fedora-Cloud-Base-Generic-45-1.3.aarch64.qcow2"},
        {"version": "45", "arch": "x86_64", "variant": "Everything", "subvariant": "Everything",
         "link": f"{base}{d}/Everything/x86_64/iso/{ISO}", "sha256": ISO_SUM},
        {"version": "45 Beta", "arch": "x86_64", "variant": "Everything", "subvariant": "Everything",
         "link": f"{base}{d}/Everything/x86_64/iso/Fedora-Everything-netinst-x86_64-45_Beta-1.1.iso"},
    ]

    files["/releases.json"] = (releases or json.dumps(entries)).encode()
    files[f"{d}/Cloud/x86_64/images/Fedora-Cloud-45-1.3-x86_64-CHECKSUM"] = (
        cloud if cloud is not None else clearsign(signer, checksum_text(CLOUD, CLOUD_SUM)))
    files[f"{d}/Everything/x86_64/iso/Fedora-Everything-45-1.3-x86_64-CHECKSUM"] = (
        iso if iso is not None else clearsign(signer, checksum_text(ISO, ISO_SUM)))


def refresh(base: str, root: Path, *, dry_run: bool = False) -> fm.RefreshResult:
    return fm.refresh_catalogue(root / "packer/images.yml", root, 45, releases_url=f"{base}/releases.json",
                                dry_run=dry_run)


def test_refresh_picks_cloud_base_and_netinst_and_writes_the_signed_sha256(server: Any, repo: Any) -> None:
    base, files = server
    root, signer = repo
    publish_release(base, files, signer)
    catalogue = root / "packer/images.yml"
    before = catalogue.read_text()
    dry = refresh(base, root, dry_run=True)
    assert catalogue.read_text() == before and not dry.written and dry.diff
    result = refresh(base, root)
    assert result.written
    assert result.media["cloud"].file_name == CLOUD and result.media["iso"].file_name == ISO  # never the UKI
    text = catalogue.read_text()
    assert f"sha256:{CLOUD_SUM}" in text and f"sha256:{ISO_SUM}" in text and f"/{CLOUD}" in text
    assert "# Image catalogue" in text.splitlines()[0]  # comments kept
    from image_factory.site.inventory import load_site

    site = load_site(REPO_ROOT / "ansible/inventory", catalogue)
    assert site.images["fedora-45"].source.checksum == f"sha256:{CLOUD_SUM}"
    assert site.images["fedora-45-iso"].source.url.endswith(ISO)
    assert not refresh(base, root).diff  # a second refresh changes nothing


@pytest.mark.parametrize("attack", ["forged-lines-outside", "wrong-key", "bad-signature", "unsigned",
                                    "releases-json-disagrees"])
def test_refresh_refuses_and_writes_nothing(server: Any, repo: Any, attack: str) -> None:
    base, files = server
    root, signer = repo
    good = clearsign(signer, checksum_text(CLOUD, CLOUD_SUM))
    cloud = {
        "forged-lines-outside": b"SHA256 (" + CLOUD.encode() + b") = " + b"f" * 64 + b"\n" + good,
        "wrong-key": clearsign(generate_key("Mallory <m@example.org>"), checksum_text(CLOUD, CLOUD_SUM)),
        "bad-signature": good.replace(CLOUD_SUM.encode(), b"e" * 64),
        "unsigned": checksum_text(CLOUD, CLOUD_SUM).encode(),
        "releases-json-disagrees": clearsign(signer, checksum_text(CLOUD, "d" * 64)),
    }[attack]
    publish_release(base, files, signer, cloud=cloud)
    catalogue = root / "packer/images.yml"
    before = catalogue.read_text()
    with pytest.raises(SignatureError) as err:
        refresh(base, root)
    message = str(err.value)
    assert "Fedora-Cloud-45-1.3-x86_64-CHECKSUM" in message or CLOUD in message, message
    assert "Stack backtrace" not in message and "\n" not in message, message
    assert catalogue.read_text() == before


def test_releases_json_without_the_release_is_a_clear_error(server: Any, repo: Any) -> None:
    base, files = server
    root, signer = repo
    publish_release(base, files, signer, releases="[]")
    with pytest.raises(fm.MediaError, match="no cloud artifact"):
        refresh(base, root)


def test_vendored_fedora_keys_match_their_pins() -> None:
    for release in (43, 44, 45, 46):
        cert = load_pinned_key(REPO_ROOT / fm.KEYS_DIR, fm.release_key_name(release))
        assert f"fedora-{release}-primary@fedoraproject.org" in str(cert.user_ids[0])


def test_a_key_whose_fingerprint_is_not_the_pin_is_refused(repo: Any) -> None:
    root, _ = repo
    other = generate_key("Fedora (45) <fedora-45-primary@fedoraproject.org>")
    (root / "packer/keys" / fm.release_key_name(45)).write_text(str(public_key(other)))
    with pytest.raises(SignatureError, match="is not the pinned"):
        fm.release_key(root, 45)


def test_only_the_signed_bytes_are_returned(repo: Any) -> None:
    _, signer = repo
    signed = clearsign(signer, "inside\n")
    assert clearsigned_bytes(signed, public_key(signer), what="x") == b"inside\n"


# ------------------------------------------------------------------ build time: a remote file: checksum


def _fedora_image(base: str) -> Any:
    from datetime import date

    from image_factory.site.inventory import Image, Source

    d = f"{base}/pub/fedora/linux/releases/45/Cloud/x86_64/images"
    return Image(name="fedora-45", family="fedora", release=45, mode="cloud", eol=date(2027, 12, 8),
                 source=Source(url=f"{d}/{CLOUD}", checksum=f"file:{d}/Fedora-Cloud-45-1.3-x86_64-CHECKSUM"))


@pytest.mark.parametrize("attack", [None, "forged-lines-outside", "wrong-key", "unsigned"])
def test_build_hands_packer_only_a_signed_sha256(server: Any, repo: Any, tmp_path: Path, attack: str | None) -> None:
    from types import SimpleNamespace

    from image_factory.image import sources
    from image_factory.settings import Settings

    base, files = server
    root, signer = repo
    good = clearsign(signer, checksum_text(CLOUD, CLOUD_SUM))
    cloud = {None: good,
             "forged-lines-outside": b"SHA256 (" + CLOUD.encode() + b") = " + b"f" * 64 + b"\n" + good,
             "wrong-key": clearsign(generate_key("Mallory <m@example.org>"), checksum_text(CLOUD, CLOUD_SUM)),
             "unsigned": checksum_text(CLOUD, CLOUD_SUM).encode()}[attack]
    publish_release(base, files, signer, cloud=cloud)
    var_file = tmp_path / "build.pkrvars.hcl"
    var_file.write_text('accelerator = "tcg"\n')
    settings = Settings.from_mapping({}, root=root)
    events: list[str] = []
    image = _fedora_image(base)
    if attack is None:
        sources.verify_source_checksum(settings, image, SimpleNamespace(var_file=var_file),
                                     lambda kind, msg: events.append(msg))
        assert f'source_checksum = "sha256:{CLOUD_SUM}"' in var_file.read_text()
        assert any(fm.release_key_name(45) in e for e in events)
        return
    with pytest.raises(SignatureError) as err:
        sources.verify_source_checksum(settings, image, SimpleNamespace(var_file=var_file), lambda kind, msg: None)
    assert "Fedora-Cloud-45-1.3-x86_64-CHECKSUM" in str(err.value)
    assert "source_checksum" not in var_file.read_text()


def test_past_eol_media_come_from_the_archive() -> None:
    from datetime import date

    image = _fedora_image("https://download.fedoraproject.org")
    live = "https://download.fedoraproject.org/pub/fedora/linux/releases/45/x.iso"
    assert fm.located(image, live, today=date(2027, 12, 8)) == live
    assert fm.located(image, live, today=date(2027, 12, 9)) == \
        "https://archives.fedoraproject.org/pub/archive/fedora/linux/releases/45/x.iso"


# ------------------------------------------------------------------ hostile servers and hostile inputs
#
# A loopback HTTPS server whose answers each case chooses: a body, a redirect, or a body that trickles in
# a byte at a time. The certificate covers 127.0.0.1 and localhost, so "localhost" stands for another host
# (a mirror, or a host that is not Fedora's) reached over verified TLS.


D45 = "/pub/fedora/linux/releases/45"
CLOUD_PATH = f"{D45}/Cloud/x86_64/images/{CLOUD}"
CLOUD_CHECKSUM_PATH = f"{D45}/Cloud/x86_64/images/Fedora-Cloud-45-1.3-x86_64-CHECKSUM"
ISO_CHECKSUM_PATH = f"{D45}/Everything/x86_64/iso/Fedora-Everything-45-1.3-x86_64-CHECKSUM"


@dataclass(frozen=True)
class Redirect:
    location: str  # "{base}" and "{other}" (the same server under the name localhost) are filled in
    status: int = 302


@dataclass(frozen=True)
class TrickleHeaders:
    """Sends its status line, then header bytes one at a time, never ending the headers."""


@dataclass(frozen=True)
class Trickle:
    """Declares a length, then sends one byte per interval until the client gives up."""

    length: int = 4096


Route = bytes | Redirect | Trickle | TrickleHeaders


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str, dict[str, Route]]]:
    cert, key, _ = make_cert(str(tmp_path), name="hostile", hosts=("127.0.0.1", "localhost"))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", cert)
    routes: dict[str, Route] = {}
    stop = threading.Event()
    names: dict[str, str] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            route = routes.get(self.path)
            if isinstance(route, Redirect):
                self.send_response(route.status)
                self.send_header("Location", route.location.format(**names))
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif isinstance(route, TrickleHeaders):
                try:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    while not stop.wait(0.05):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                except OSError:
                    return
            elif isinstance(route, Trickle):
                self.send_response(200)
                self.send_header("Content-Length", str(route.length))
                self.end_headers()
                try:
                    for _ in range(route.length):
                        if stop.wait(0.05):
                            return
                        self.wfile.write(b"x")
                        self.wfile.flush()
                except OSError:
                    return
            else:
                self.send_response(200 if route is not None else 404)
                self.send_header("Content-Length", str(len(route or b"")))
                self.end_headers()
                self.wfile.write(route or b"")

        def log_message(self, *args: Any) -> None:
            pass

    with serve_http(Handler, cert_and_key=(cert, key)) as base:
        names.update(base=base, other=base.replace("127.0.0.1", "localhost"))
        yield base, names["other"], routes
        stop.set()


def releases_entries(base: str, *, cloud: str | None = None) -> list[dict[str, str]]:
    return [
        {"version": "45", "arch": "x86_64", "variant": "Cloud", "subvariant": "Cloud_Base",
         "link": cloud or f"{base}{CLOUD_PATH}", "sha256": CLOUD_SUM},
        {"version": "45", "arch": "x86_64", "variant": "Everything", "subvariant": "Everything",
         "link": f"{base}{D45}/Everything/x86_64/iso/{ISO}", "sha256": ISO_SUM},
    ]


def good_routes(base: str, signer: Any) -> dict[str, Route]:
    return {
        "/releases.json": json.dumps(releases_entries(base)).encode(),
        CLOUD_CHECKSUM_PATH: clearsign(signer, checksum_text(CLOUD, CLOUD_SUM)),
        ISO_CHECKSUM_PATH: clearsign(signer, checksum_text(ISO, ISO_SUM)),
    }


RC = "/pub/alt/stage/45_RC-1.2/Cloud/x86_64/images"
RC_CLOUD = "Fedora-Cloud-Base-Generic-45-1.2.x86_64.qcow2"


def _rc_compose(base: str, signer: Any) -> dict[str, Route]:
    """An older release-candidate compose: genuinely signed by the release key, but not the release."""
    return {"/releases.json": json.dumps(releases_entries(base, cloud=f"{base}{RC}/{RC_CLOUD}")).encode(),
            f"{RC}/Fedora-Cloud-45-1.2-x86_64-CHECKSUM": clearsign(signer, checksum_text(RC_CLOUD, "9" * 64))}


def _link(link: str) -> Callable[[str, Any], dict[str, Route]]:
    return lambda base, _signer: {"/releases.json": json.dumps(releases_entries(base, cloud=link.format(
        base=base))).encode()}


def _checksum(route: Route | Callable[[Any], Route]) -> Callable[[str, Any], dict[str, Route]]:
    return lambda _base, signer: {CLOUD_CHECKSUM_PATH: route(signer) if callable(route) else route}


# (case, what the server answers instead of the good release, the releases URL, what the refusal says)
HOSTILE_REFRESH: list[tuple[str, Callable[[str, Any], dict[str, Route]], str, str]] = [
    ("releases.json over plain http", lambda b, s: {}, "http://127.0.0.1:1/releases.json", "not https"),
    ("releases.json redirected to http", lambda b, s: {"/releases.json": Redirect("http://127.0.0.1:1/r.json"),
                                                       }, "{base}/releases.json", "not https"),
    ("releases.json redirected off Fedora's hosts",
     lambda b, s: {"/releases.json": Redirect("{other}/elsewhere/releases.json")}, "{base}/releases.json",
     "not one of Fedora's hosts"),
    ("releases.json in a redirect loop", lambda b, s: {"/releases.json": Redirect("{base}/releases.json")},
     "{base}/releases.json", "more than 5 redirects"),
    ("releases.json missing", lambda b, s: {"/releases.json": Redirect("{base}/gone")}, "{base}/releases.json",
     "HTTP 404"),
    ("releases.json nested 100000 deep", lambda b, s: {"/releases.json": b"[" * 100000 + b"]" * 100000},
     "{base}/releases.json", "nested 100000 deep"),
    ("releases.json nested 9 deep", lambda b, s: {"/releases.json": b"[" * 9 + b"]" * 9},
     "{base}/releases.json", "nested 9 deep"),
    ("releases.json not JSON", lambda b, s: {"/releases.json": b"<html>"}, "{base}/releases.json", "not JSON"),
    ("releases.json an object", lambda b, s: {"/releases.json": b"{}"}, "{base}/releases.json", "JSON array"),
    ("releases.json trickling", lambda b, s: {"/releases.json": Trickle()}, "{base}/releases.json",
     "not complete within"),
    ("releases.json headers trickling", lambda b, s: {"/releases.json": TrickleHeaders()}, "{base}/releases.json",
     "not complete within"),
    ("releases.json redirected to a broken URL", lambda b, s: {"/releases.json": Redirect("https://[::1/x")},
     "{base}/releases.json", "sent to a URL that cannot be used"),
    ("link a broken URL", _link("https://[::1" + CLOUD_PATH), "{base}/releases.json", "not a URL with a host"),
    ("link to an older RC compose", _rc_compose, "{base}/releases.json", "outside /releases/45/"),
    ("link climbing out with ..", _link("{base}" + D45 + "/../../../alt/stage/45_RC-1.2/x/" + RC_CLOUD),
     "{base}/releases.json", "with . or .."),
    ("link escaped", _link("{base}" + D45 + "/%2e%2e/x/" + CLOUD), "{base}/releases.json", "escaped path"),
    ("link over http", _link("http://127.0.0.1:1" + CLOUD_PATH), "{base}/releases.json", "not https"),
    ("link on another host", _link("https://mirror.example.org" + CLOUD_PATH), "{base}/releases.json",
     "not on Fedora's hosts"),
    ("link to another release", _link("{base}/pub/fedora/linux/releases/44/Cloud/x86_64/images/"
                                      "Fedora-Cloud-Base-Generic-44-1.7.x86_64.qcow2"), "{base}/releases.json",
     "outside /releases/45/"),
    ("link with a query", _link("{base}" + CLOUD_PATH + "?copy=" + CLOUD), "{base}/releases.json", "a query"),
    ("CHECKSUM lists the file twice", _checksum(lambda s: clearsign(
        s, checksum_text(CLOUD, CLOUD_SUM) + f"SHA256 ({CLOUD}) = {'e' * 64}\n")), "{base}/releases.json",
     "more than once"),
    ("CHECKSUM lists the file twice, same sum", _checksum(lambda s: clearsign(
        s, checksum_text(CLOUD, CLOUD_SUM) * 2)), "{base}/releases.json", "more than once"),
    ("CHECKSUM too large", _checksum(b"#" * (fm.MAX_CHECKSUM + 1)), "{base}/releases.json", "larger than"),
    ("CHECKSUM trickling", _checksum(Trickle()), "{base}/releases.json", "not complete within"),
    ("CHECKSUM redirected to http", _checksum(Redirect("http://127.0.0.1:1" + CLOUD_CHECKSUM_PATH)),
     "{base}/releases.json", "not https"),
    ("CHECKSUM redirected to another file on a mirror",
     _checksum(Redirect("{other}/mirror/Fedora-Cloud-45-1.2-x86_64-CHECKSUM")), "{base}/releases.json",
     "not one of Fedora's hosts"),
]


@pytest.mark.parametrize(("case", "answers", "url", "says"), HOSTILE_REFRESH, ids=[c[0] for c in HOSTILE_REFRESH])
def test_hostile_release_data_is_refused_with_its_reason(
    hostile: Any, repo: Any, monkeypatch: pytest.MonkeyPatch, case: str,
    answers: Callable[[str, Any], dict[str, Route]], url: str, says: str,
) -> None:
    base, other, routes = hostile
    root, signer = repo
    monkeypatch.setattr(fm, "FETCH_DEADLINE", 1.0)
    routes.update(good_routes(base, signer))
    routes.update(answers(base, signer))
    catalogue = root / "packer/images.yml"
    before = catalogue.read_bytes()
    releases_url = url.format(base=base, other=other)
    with pytest.raises((fm.MediaError, SignatureError)) as err:
        fm.refresh_catalogue(catalogue, root, 45, releases_url=releases_url)
    message = str(err.value)
    assert says in message, message
    assert "\n" not in message and "Traceback" not in message, message
    named = ("releases.json", "CHECKSUM", CLOUD, RC_CLOUD)
    assert any(n in message for n in named), f"{case}: the refusal names no file: {message}"
    assert catalogue.read_bytes() == before


MIRRORED = "/mirror/fedora/linux/releases/45/Fedora-Cloud-45-1.3-x86_64-CHECKSUM"
BENIGN_REFRESH: list[tuple[str, Callable[[str, Any], dict[str, Route]], str]] = [
    ("as published", lambda b, s: {}, "{base}/releases.json"),
    ("HTTPS written in capitals", lambda b, s: {}, "HTTPS://127.0.0.1:{port}/releases.json"),
    ("releases.json moved on the same host", lambda b, s: {"/old.json": Redirect("{base}/releases.json", 301)},
     "{base}/old.json"),
    ("CHECKSUM from an https mirror (same file)", lambda b, s: {
        CLOUD_CHECKSUM_PATH: Redirect("{other}" + MIRRORED),
        MIRRORED: clearsign(s, checksum_text(CLOUD, CLOUD_SUM))}, "{base}/releases.json"),
]


@pytest.mark.parametrize(("case", "answers", "url"), BENIGN_REFRESH, ids=[c[0] for c in BENIGN_REFRESH])
def test_benign_variants_refresh_with_the_signed_sha256(
    hostile: Any, repo: Any, case: str, answers: Callable[[str, Any], dict[str, Route]], url: str
) -> None:
    base, other, routes = hostile
    root, signer = repo
    routes.update(good_routes(base, signer))
    routes.update(answers(base, signer))
    port = base.rsplit(":", 1)[1]
    result = fm.refresh_catalogue(root / "packer/images.yml", root, 45,
                                  releases_url=url.format(base=base, other=other, port=port))
    assert result.checksums == {"cloud": CLOUD_SUM, "iso": ISO_SUM}


# ------------------------------------------------------------------ a build's file: checksum


@pytest.mark.parametrize(("checksum", "says"), [
    ("file:http://download.fedoraproject.org/pub/x/Fedora-Cloud-45-1.3-x86_64-CHECKSUM", "is http:, not https"),
    ("file:ftp://download.fedoraproject.org/pub/x/Fedora-Cloud-45-1.3-x86_64-CHECKSUM", "is ftp:, not https"),
    ("file:s3::https://bucket.s3.amazonaws.com/Fedora-Cloud-45-1.3-x86_64-CHECKSUM", "is s3:, not https"),
    ("file:git::https://example.org/sums", "is git:, not https"),
    ("file:/srv/sums/Fedora-Cloud-45-1.3-x86_64-CHECKSUM", "a local file is not verified"),
    ("file:sums/CHECKSUM", "a local file is not verified"),
])
def test_a_downloads_checksum_file_other_than_https_is_refused(checksum: str, says: str) -> None:
    with pytest.raises(fm.MediaError) as err:
        fm.remote_checksum_file(checksum, source_is_local=False, what="images.yml: fedora-45: source.checksum")
    assert says in str(err.value) and "fedora-45" in str(err.value) and checksum[5:] in str(err.value)


@pytest.mark.parametrize(("checksum", "local", "fetched"), [
    ("file:HTTPS://dl.example/x-CHECKSUM", False, "https://dl.example/x-CHECKSUM"),
    ("file:https://dl.example/x-CHECKSUM", False, "https://dl.example/x-CHECKSUM"),
    ("file:Https://dl.example/x-CHECKSUM", True, "https://dl.example/x-CHECKSUM"),
    ("file:builds/base/debian-13-base.qcow2.sha256", True, None),
    ("sha256:" + "a" * 64, False, None),
])
def test_which_checksum_files_are_fetched_and_verified(checksum: str, local: bool, fetched: str | None) -> None:
    assert fm.remote_checksum_file(checksum, source_is_local=local, what="x") == fetched


def test_a_capitalised_https_checksum_is_verified_before_packer_sees_it(server: Any, repo: Any,
                                                                       tmp_path: Path) -> None:
    from types import SimpleNamespace

    from image_factory.image import sources
    from image_factory.settings import Settings
    from image_factory.site.inventory import Image, Source

    base, files = server
    root, signer = repo
    publish_release(base, files, signer, cloud=clearsign(signer, checksum_text(CLOUD, "d" * 64)))
    image = _fedora_image(base)
    shouting = image.model_copy(update={"source": Source(
        url=image.source.url, checksum=image.source.checksum.replace("file:https://", "file:HTTPS://"))})
    assert isinstance(shouting, Image)
    var_file = tmp_path / "build.pkrvars.hcl"
    var_file.write_text("")
    sources.verify_source_checksum(Settings.from_mapping({}, root=root), shouting, SimpleNamespace(var_file=var_file),
                                 lambda kind, msg: None)
    assert f'source_checksum = "sha256:{"d" * 64}"' in var_file.read_text()


def test_render_refuses_a_checksum_packer_would_read_unverified(tmp_path: Path) -> None:
    from image_factory.image import render
    from image_factory.settings import Settings
    from image_factory.site.inventory import Source

    image = _fedora_image("https://download.fedoraproject.org")
    image = image.model_copy(update={"source": Source(url=image.source.url, checksum="file:s3::https://b/x")})
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds")}, root=REPO_ROOT)
    with pytest.raises(fm.MediaError, match="fedora-45: source.checksum: s3::https://b/x is s3:, not https"):
        render.render_image(settings, image, packer_version=(1, 6, 6), scratch=True)


# ------------------------------------------------------------------ Fedora's own signature, as published

REAL_CHECKSUM = REPO_ROOT / "tests/data/fedora/Fedora-Cloud-44-1.7-aarch64-CHECKSUM"
REAL_GENERIC = "Fedora-Cloud-Base-Generic-44-1.7.aarch64.qcow2"


def test_fedoras_real_f44_checksum_verifies_against_the_pinned_key() -> None:
    cert = fm.release_key(REPO_ROOT, 44)
    data = REAL_CHECKSUM.read_bytes()
    assert fm.signed_sha256(data, REAL_GENERIC, cert, what=REAL_CHECKSUM.name) == \
        "55c60a3b80d3616a08705afd0459e75fe9f03c54aba7a46e4002a41a72fa0d5b"
    with pytest.raises(SignatureError, match="lists no SHA256 for Fedora-Cloud-Base-Generic-44-1.7.x86_64"):
        fm.signed_sha256(data, "Fedora-Cloud-Base-Generic-44-1.7.x86_64.qcow2", cert, what=REAL_CHECKSUM.name)


@pytest.mark.parametrize(("case", "change", "says"), [
    ("one hex digit changed", lambda d: d.replace(b"= 55c60a3b", b"= 55c60a3c"), "signature check"),
    ("forged line above the block", lambda d: b"SHA256 (" + REAL_GENERIC.encode() + b") = " + b"f" * 64 + b"\n" + d,
     "text outside the clearsigned block"),
    ("signed by another release's key", None, "signature check"),
])
def test_fedoras_real_f44_checksum_altered_is_refused(case: str, change: Any, says: str) -> None:
    data = REAL_CHECKSUM.read_bytes()
    cert = fm.release_key(REPO_ROOT, 45 if change is None else 44)
    with pytest.raises(SignatureError, match=says) as err:
        fm.signed_sha256(change(data) if change else data, REAL_GENERIC, cert, what=REAL_CHECKSUM.name)
    assert REAL_CHECKSUM.name in str(err.value)


# ------------------------------------------------------------------ the catalogue edit: other bytes untouched


def test_a_refresh_changes_only_the_refreshed_values_byte_for_byte(server: Any, repo: Any) -> None:
    base, files = server
    root, signer = repo
    publish_release(base, files, signer)
    catalogue = root / "packer/images.yml"
    before = catalogue.read_bytes().splitlines(keepends=True)
    refresh(base, root)
    after = catalogue.read_bytes().splitlines(keepends=True)
    assert len(after) == len(before)
    changed = [(b, a) for b, a in zip(before, after, strict=True) if a != b]
    assert [a.decode().split(":", 1)[0].strip() for _, a in changed] == ["url", "checksum", "url", "checksum"]
    assert all(a.startswith(b.split(b":", 1)[0]) for b, a in changed)  # same key, same indentation
    assert any(b"/releases/45/Cloud/x86_64/images/\n" in b and CLOUD.encode() in a for b, a in changed)


@pytest.mark.parametrize(("source", "expected"), [
    ("    source:\n      url: https://old/  # where\n      checksum: refresh\n",
     "    source:\n      url: https://new/f.iso  # where\n      checksum: sha256:{sum}\n"),
    ("    source:\n      url: \"https://old/\"\n      checksum: 'refresh'   # pinned by image.refresh\n",
     "    source:\n      url: \"https://new/f.iso\"\n      checksum: 'sha256:{sum}'   # pinned by image.refresh\n"),
    ("    source: {url: https://old/, checksum: refresh}\n",
     "    source: {{url: https://new/f.iso, checksum: sha256:{sum}}}\n"),
])
def test_the_catalogue_edit_keeps_quotes_comments_and_flow_style(tmp_path: Path, source: str, expected: str) -> None:
    from ruamel.yaml import YAML

    head = "# catalogue\nimages:\n  other:\n    repositories:\n      - {kind: debian, suite: trixie}\n  fedora-45:\n"
    text = head + source
    digest = "d" * 64
    after = fm.edited_in_place(text, YAML().load(text), {"fedora-45": {"url": "https://new/f.iso",
                                                                       "checksum": f"sha256:{digest}"}},
                               tmp_path / "images.yml")
    assert after == head + expected.format(sum=digest)
# ------------------------------------------------------------------- checksum: refresh, resolved at build time

REAL_F44 = "Fedora-Cloud-44-1.7-aarch64-CHECKSUM"  # Fedora's own clearsigned file (shared/fedora-fixtures)
REAL_F44_GENERIC = ("Fedora-Cloud-Base-Generic-44-1.7.aarch64.qcow2",
                    "55c60a3b80d3616a08705afd0459e75fe9f03c54aba7a46e4002a41a72fa0d5b")


def _real_f44_checksum() -> bytes:
    for shared in (REPO_ROOT.parent / "shared", REPO_ROOT.parents[1] / "shared"):
        if (shared / "fedora-fixtures" / REAL_F44).is_file():
            return (shared / "fedora-fixtures" / REAL_F44).read_bytes()
    pytest.skip(f"shared/fedora-fixtures/{REAL_F44} is not beside this checkout")


def _unpinned(base: str, release: int, mode: str = "cloud") -> Any:
    from datetime import date

    from image_factory.site.inventory import Image, Source

    where = "Cloud/x86_64/images" if mode == "cloud" else "Everything/x86_64/iso"
    return Image(name=f"fedora-{release}", family="fedora", release=release, mode=mode, eol=date(2027, 12, 8),
                 source=Source(url=f"{base}/pub/fedora/linux/releases/{release}/{where}/", checksum="refresh"))


def test_resolve_medium_verifies_fedoras_real_signed_checksum(server: Any) -> None:
    """Fedora 44's real CHECKSUM under Fedora's real 44 key (the one vendored in packer/keys): the file name is
    the aarch64 compose's, served where the x86_64 CHECKSUM would be; the signature is Fedora's own."""
    import json

    base, files = server
    body = _real_f44_checksum()
    d = "/pub/fedora/linux/releases/44/Cloud/x86_64/images"
    name, digest = REAL_F44_GENERIC
    files["/releases.json"] = json.dumps([{"version": "44", "arch": "x86_64", "variant": "Cloud",
                                          "subvariant": "Cloud_Base", "link": f"{base}{d}/{name}",
                                          "sha256": digest}]).encode()
    files[f"{d}/Fedora-Cloud-44-1.7-x86_64-CHECKSUM"] = body
    resolved = fm.resolve_medium(REPO_ROOT, _unpinned(base, 44), releases_url=f"{base}/releases.json")
    assert (resolved.url, resolved.sha256) == (f"{base}{d}/{name}", digest)
    assert resolved.signed_by == "RPM-GPG-KEY-fedora-44-primary"
    files[f"{d}/Fedora-Cloud-44-1.7-x86_64-CHECKSUM"] = body.replace(digest.encode(), b"0" * 64)
    with pytest.raises(SignatureError):
        fm.resolve_medium(REPO_ROOT, _unpinned(base, 44), releases_url=f"{base}/releases.json")


def test_resolve_medium_stays_inside_the_entrys_media_directory(server: Any, repo: Any) -> None:
    base, files = server
    root, signer = repo
    publish_release(base, files, signer)
    elsewhere = _unpinned(base, 45).model_copy(update={"source": _unpinned(base, 45).source.model_copy(
        update={"url": f"{base}/pub/fedora/linux/releases/45/Server/x86_64/images/"})})
    with pytest.raises(fm.MediaError, match="outside fedora-45's media directory"):
        fm.resolve_medium(root, elsewhere, releases_url=f"{base}/releases.json")


STUB_PACKER_BUILD = """#!{python}
import os, re, subprocess, sys
open(os.environ["PACKER_CALLS"], "a").write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] == "version":
    print("Packer v1.6.6"); sys.exit(0)
if sys.argv[1] != "build":
    sys.exit(0)
var_file = [a.split("=", 1)[1] for a in sys.argv if a.startswith("-var-file=")][0]
work = re.search(r'^work_dir = "(.*)"$', open(var_file).read(), re.M).group(1)
name = re.search(r'vm_name\\s*=\\s*"([^"]+)"', open(sys.argv[-1]).read()).group(1)
os.makedirs(os.path.join(work, "output"))
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", os.path.join(work, "output", name), "64M"], check=True)
"""


def test_a_build_resolves_refresh_media_and_records_them(server: Any, repo: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """fedora-45 as the catalogue ships it (checksum: refresh) builds: the medium and its sha256 come from the
    signed CHECKSUM at build time, into the rendered template, the manifest and the pipeline's summary; the
    same compose is a cache hit, a new one a new build; --offline keeps what the last build resolved."""
    import sys

    from image_factory import pipeline
    from image_factory.image import build, render, rendercheck
    from image_factory.settings import Settings

    base, files = server
    root, signer = repo
    for d in ("packer", "kickstart", "ansible"):
        shutil.copytree(REPO_ROOT / d, root / d, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("keys", "images.yml"))
    publish_release(base, files, signer)
    stub = tmp_path / "bin/packer"
    stub.parent.mkdir()
    stub.write_text(STUB_PACKER_BUILD.format(python=sys.executable))
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("PACKER_CALLS", str(tmp_path / "calls"))
    monkeypatch.setattr(rendercheck, "validate", lambda result, settings: None)  # the real validators: test_render.py
    render._packer_version_cache.clear()
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds"), "accelerator": "tcg",
                                      "fedora_releases_url": f"{base}/releases.json"}, root=root)
    image = _unpinned(base, 45).model_copy(update={"repositories": []})
    events: list[str] = []

    outcome = build.build_image(settings, image, compress=False, on_event=lambda ev: events.append(ev.message))
    link = f"{base}/pub/fedora/linux/releases/45/Cloud/x86_64/images/{CLOUD}"
    assert outcome.status == "built" and outcome.manifest is not None
    assert outcome.manifest.source == {
        "url": link, "sha256": CLOUD_SUM, "signed_by": fm.release_key_name(45),
        "checksum_url": f"{base}/pub/fedora/linux/releases/45/Cloud/x86_64/images/Fedora-Cloud-45-1.3-x86_64-CHECKSUM",
        "resolved": "at build time (checksum: refresh)"}
    hcl = (settings.builds_dir / "fedora-45/fedora-45.pkr.hcl").read_text()
    assert f'iso_url      = "{link}"' in hcl and f'default     = "sha256:{CLOUD_SUM}"' in hcl
    assert any("media resolved at build time" in e and "image.refresh --release 45" in e for e in events)

    report = pipeline.PipelineReport(started_at="2026-12-06T00:00:00Z")
    report.images.append(pipeline.ImageRun("fedora-45", build={"status": "built", "source": outcome.manifest.source}))
    assert f"resolved at build time (checksum: refresh): {link} sha256 {CLOUD_SUM}" in pipeline.markdown_summary(report)

    assert build.build_image(settings, image, compress=False).status == "cached"  # the same compose
    offline = build.build_image(settings, image, compress=False, offline=True)
    assert offline.status == "cached" and offline.manifest is not None
    assert offline.manifest.source["sha256"] == CLOUD_SUM

    newer = "Fedora-Cloud-Base-Generic-45-1.4.x86_64.qcow2"
    d = "/pub/fedora/linux/releases/45/Cloud/x86_64/images"
    import json

    files["/releases.json"] = json.dumps([{"version": "45", "arch": "x86_64", "variant": "Cloud",
                                          "subvariant": "Cloud_Base", "link": f"{base}{d}/{newer}"}]).encode()
    files[f"{d}/Fedora-Cloud-45-1.4-x86_64-CHECKSUM"] = clearsign(signer, checksum_text(newer, "9" * 64))
    rebuilt = build.build_image(settings, image, compress=False)
    assert rebuilt.status == "built" and rebuilt.manifest is not None
    assert rebuilt.manifest.source["url"].endswith(newer) and rebuilt.manifest.source["sha256"] == "9" * 64


def test_offline_without_an_earlier_resolution_says_how_to_pin(repo: Any, tmp_path: Path) -> None:
    from image_factory.image import buildevents, sources
    from image_factory.settings import Settings

    root, _ = repo
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds")}, root=root)
    with pytest.raises(buildevents.BuildError, match=r"not pinned yet .*--offline.*image\.refresh --release 45"):
        sources.resolve_unpinned(settings, _unpinned("https://download.fedoraproject.org", 45), lambda k, m: None,
                               offline=True, previous=None)
