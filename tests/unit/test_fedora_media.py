"""fedora_media + signatures: image.refresh against a loopback HTTPS server with a key the test makes.

The server serves a releases.json and per-compose CHECKSUM files clearsigned by a key generated here,
vendored into a scratch repository and pinned there by fingerprint, exactly as packer/keys/ does.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakepve.certs import make_cert

from image_factory import fedora_media as fm
from image_factory.lab.aptrepo import clearsign, generate_key, public_key
from image_factory.settings import REPO_ROOT
from image_factory.signatures import SignatureError, clearsigned_bytes, load_pinned_key

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
    import json

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
    from image_factory.inventory import load_site

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

    from image_factory.inventory import Image, Source

    d = f"{base}/pub/fedora/linux/releases/45/Cloud/x86_64/images"
    return Image(name="fedora-45", family="fedora", release=45, mode="cloud", eol=date(2027, 12, 8),
                 source=Source(url=f"{d}/{CLOUD}", checksum=f"file:{d}/Fedora-Cloud-45-1.3-x86_64-CHECKSUM"))


@pytest.mark.parametrize("attack", [None, "forged-lines-outside", "wrong-key", "unsigned"])
def test_build_hands_packer_only_a_signed_sha256(server: Any, repo: Any, tmp_path: Path, attack: str | None) -> None:
    from types import SimpleNamespace

    from image_factory import build
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
        build.verify_source_checksum(settings, image, SimpleNamespace(var_file=var_file),
                                     lambda kind, msg: events.append(msg))
        assert f'source_checksum = "sha256:{CLOUD_SUM}"' in var_file.read_text()
        assert any(fm.release_key_name(45) in e for e in events)
        return
    with pytest.raises(SignatureError) as err:
        build.verify_source_checksum(settings, image, SimpleNamespace(var_file=var_file), lambda kind, msg: None)
    assert "Fedora-Cloud-45-1.3-x86_64-CHECKSUM" in str(err.value)
    assert "source_checksum" not in var_file.read_text()


def test_past_eol_media_come_from_the_archive() -> None:
    from datetime import date

    image = _fedora_image("https://download.fedoraproject.org")
    live = "https://download.fedoraproject.org/pub/fedora/linux/releases/45/x.iso"
    assert fm.located(image, live, today=date(2027, 12, 8)) == live
    assert fm.located(image, live, today=date(2027, 12, 9)) == \
        "https://archives.fedoraproject.org/pub/archive/fedora/linux/releases/45/x.iso"
