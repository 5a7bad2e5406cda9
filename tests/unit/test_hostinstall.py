"""Bare metal to a PVE host: answer files from the site model checked against the installer's own schema (8.4 and
9.1), the inventory's install: mapping, and the answer server driven with the installer's real request shape."""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator, FormatChecker

from image_factory.errors import SecretError, ValidationFailed
from image_factory.hostinstall.answer import AnswerError, render_answer, to_toml
from image_factory.hostinstall.gather import answer_secrets, rendered_answers
from image_factory.hostinstall.model import SUPPORTED_INSTALLERS, AnswerSecrets, RenderedAnswer
from image_factory.hostinstall.server import (
    AnswerServer,
    AnswerServerError,
    certificate_fingerprint,
    ensure_certificate,
)
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import Site, load_site

from .example_site import flat_example

pytestmark = pytest.mark.unit

CATALOGUE = REPO_ROOT / "packer/images.yml"
DATA = REPO_ROOT / "tests/data"
HASH = "$y$j9T$VgMv8lsz/TEvzesCZU3xD.$SK.h4QW51Jr/EmjuaTz5Bt4kYiX2Iezz6omzoqVEwj9"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKfXoTQ8mJ2n8jvU4vG0p6Y1sWq3bZr5nH7cLd9eFa2M ansible@deevnet"
TOKEN = "0123456789abcdef0123456789abcdef"  # noqa: S105 - the test server's token


def hypervisors(inv: dict[str, Any]) -> dict[str, Any]:
    return inv["all"]["children"]["hypervisors"]["hosts"]


def example_inventory() -> dict[str, Any]:
    return flat_example()


def load(tmp_path: Path, inv: dict[str, Any]) -> Site:
    path = tmp_path / "inventory" / "hosts.yml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return load_site(path.parent, CATALOGUE)


def problems(tmp_path: Path, inv: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationFailed) as exc:
        load(tmp_path, inv)
    return [str(p) for p in exc.value.problems]


def zfs_mirror_inventory() -> dict[str, Any]:
    """The example with pve-mgmt on a ZFS mirror: its VM storage becomes the install's local-zfs."""
    inv = example_inventory()
    pve = hypervisors(inv)["pve-mgmt"]["pve"]
    pve["install"]["disk"] = {"filesystem": "zfs", "zfs_raid": "raid1", "disks": ["sda", "sdb"], "hdsize": 200}
    pve["storage"]["images"] = pve["storage"]["cloudinit"] = "local-zfs"
    return inv


@pytest.fixture
def root_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example's secrets: pve-mgmt's hash from the environment, pve-tenant's from a 0600 file."""
    monkeypatch.setenv("PVE_MGMT_ROOT_PASSWORD_HASH", HASH)
    home = tmp_path / "home"
    hash_file = home / ".config/deevnet-image-factory/pve-tenant-root.hash"
    hash_file.parent.mkdir(parents=True)
    hash_file.write_text(HASH + "\n")
    hash_file.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    return hash_file


def validators() -> dict[str, Draft202012Validator]:
    return {release: Draft202012Validator(json.loads((DATA / f"pve-answer-{release}.schema.json").read_text()),
                                          format_checker=FormatChecker())
            for release in SUPPORTED_INSTALLERS}


# ----------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("release", SUPPORTED_INSTALLERS)
@pytest.mark.parametrize("variant", ["example", "zfs-mirror"])
def test_rendered_answers_match_the_installer_schema(release: str, variant: str, tmp_path: Path,
                                                     root_hashes: Path) -> None:
    """Every field of both example hypervisors' answers (and of a ZFS mirror) is one the installer's answer.rs
    takes, with its rules (tests/data/derive_pve_answer_schema.py)."""
    inv = example_inventory() if variant == "example" else zfs_mirror_inventory()
    site = load(tmp_path, inv)
    answers = rendered_answers(list(site.hypervisors.values()))
    assert [a.hypervisor for a in answers] == ["pve-mgmt", "pve-tenant"]
    validator = validators()[release]
    for answer in answers:
        document = tomllib.loads(answer.toml)
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
        assert errors == [], f"{answer.hypervisor} vs installer {release}"


def test_the_schema_refuses_what_the_installer_refuses() -> None:
    """The schema is not vacuous: each of the installer's rules rejects a broken answer."""
    base = {
        "global": {"keyboard": "en-us", "country": "us", "fqdn": "pve.example.lan", "mailto": "a@b.lan",
                   "timezone": "UTC", "root-password-hashed": HASH},
        "network": {"source": "from-dhcp"},
        "disk-setup": {"filesystem": "ext4", "disk-list": ["sda"]},
    }
    broken = {
        "unknown top-level table": {"extra": {}},
        "unknown global key": {"global": {**base["global"], "root-pasword": "x"}},
        "no password at all": {"global": {k: v for k, v in base["global"].items() if k != "root-password-hashed"}},
        "password and hash": {"global": {**base["global"], "root-password": "12345678"}},
        "keyboard not a layout": {"global": {**base["global"], "keyboard": "us"}},
        "hostname only": {"global": {**base["global"], "fqdn": "pve"}},
        "static without gateway": {"network": {"source": "from-answer", "cidr": "10.0.0.2/24", "dns": "10.0.0.1",
                                               "filter": {"ID_NET_NAME_MAC": "*00"}}},
        "dhcp with an address": {"network": {"source": "from-dhcp", "cidr": "10.0.0.2/24"}},
        "zfs without raid": {"disk-setup": {"filesystem": "zfs", "disk-list": ["sda", "sdb"]}},
        "ext4 on two disks": {"disk-setup": {"filesystem": "ext4", "disk-list": ["sda", "sdb"]}},
        "zfs with lvm options": {"disk-setup": {"filesystem": "zfs", "zfs": {"raid": "raid1"}, "lvm": {},
                                                "disk-list": ["sda", "sdb"]}},
        "no disks": {"disk-setup": {"filesystem": "ext4"}},
        "first boot from url without url": {"first-boot": {"source": "from-url"}},
    }
    for release, validator in validators().items():
        assert not list(validator.iter_errors(base)), release
        for why, change in broken.items():
            assert list(validator.iter_errors({**base, **change})), f"{release}: {why} passed"
    assert not list(validators()["9.1"].iter_errors({**base, "network": {
        "source": "from-dhcp", "interface-name-pinning": {"enabled": True, "mapping": {"aa:bb:cc:dd:ee:ff": "lan0"}}}}))
    assert list(validators()["8.4"].iter_errors({**base, "network": {
        "source": "from-dhcp", "interface-name-pinning": {"enabled": True}}})), "9.x-only key passed 8.4"
    mirror_on_one = {**base, "disk-setup": {"filesystem": "zfs", "zfs": {"raid": "raid1"}, "disk-list": ["sda"]}}
    assert list(validators()["9.1"].iter_errors(mirror_on_one)), "9.1 checks a RAID level's minimum disks"


def test_the_kept_schemas_are_what_the_derivation_script_makes() -> None:
    """The JSON files are the script's output (the script is how they were derived): the script run on a
    pve-installer snapshot, when one is here, reproduces them byte for byte."""
    import subprocess
    import sys

    git_dir = Path("/work/.mirror/proxmox+pve-installer/repo")
    if not (git_dir / "HEAD").exists():
        pytest.skip("no proxmox/pve-installer snapshot on this machine (fetch github:proxmox/pve-installer)")
    for release, commit in (("8.4", "faebafd"), ("9.1", "c10cceb")):
        out = subprocess.run([sys.executable, str(DATA / "derive_pve_answer_schema.py"), str(git_dir), commit, release],
                             check=True, capture_output=True, text=True).stdout
        assert out == (DATA / f"pve-answer-{release}.schema.json").read_text(), release


# ----------------------------------------------------------------------------------------- render


def test_answer_carries_the_site_model(tmp_path: Path, root_hashes: Path) -> None:
    site = load(tmp_path, zfs_mirror_inventory())
    mgmt, tenant = (tomllib.loads(a.toml) for a in rendered_answers(list(site.hypervisors.values())))
    assert mgmt["global"]["fqdn"] == "pve-mgmt.deevnet.lan"
    assert mgmt["global"]["root-password-hashed"] == HASH
    assert "root-password" not in mgmt["global"]
    assert mgmt["global"]["root-ssh-keys"] == [KEY]
    assert mgmt["network"] == {"source": "from-answer", "cidr": "192.168.10.2/24", "gateway": "192.168.10.1",
                               "dns": "192.168.10.1", "filter": {"ID_NET_NAME_MAC": "*00005e005301"}}
    assert mgmt["disk-setup"] == {"filesystem": "zfs", "disk-list": ["sda", "sdb"], "zfs": {"raid": "raid1",
                                                                                            "hdsize": 200.0}}
    assert mgmt["first-boot"] == {"source": "from-iso", "ordering": "fully-up"}
    assert tenant["network"] == {"source": "from-dhcp"}
    assert tenant["disk-setup"] == {"filesystem": "xfs", "disk-list": ["sda"], "lvm": {"swapsize": 8.0}}


def test_toml_writer_round_trips_awkward_strings() -> None:
    document = {"t": {"quote\"key": "a \"b\" \\ c\n\u00e9 \t", "n": {"deep.er": [1, 2.5, True, "x"]}}}
    assert tomllib.loads(to_toml(document)) == document


def test_root_password_hash_must_be_a_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = load(tmp_path, example_inventory())
    with pytest.raises(AnswerError, match="not a crypt"):
        render_answer(site.hypervisors["pve-mgmt"], AnswerSecrets("plain-text-password", (KEY,)))
    monkeypatch.delenv("PVE_MGMT_ROOT_PASSWORD_HASH", raising=False)
    with pytest.raises(SecretError, match="PVE_MGMT_ROOT_PASSWORD_HASH"):
        answer_secrets(site.hypervisors["pve-mgmt"])


def test_hash_file_readable_by_others_is_refused(tmp_path: Path, root_hashes: Path) -> None:
    site = load(tmp_path, example_inventory())
    root_hashes.chmod(0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        answer_secrets(site.hypervisors["pve-tenant"])


def test_root_ssh_key_files_are_read_and_checked(tmp_path: Path, root_hashes: Path) -> None:
    inv = example_inventory()
    install = hypervisors(inv)["pve-mgmt"]["pve"]["install"]
    pub = tmp_path / "factory.pub"
    pub.write_text(f"# the factory's key\n{KEY}\n")
    install["root_ssh_keys"], install["root_ssh_key_files"] = [], [str(pub)]
    hv = load(tmp_path, inv).hypervisors["pve-mgmt"]
    assert answer_secrets(hv).root_ssh_keys == (KEY,)
    pub.write_text("ssh-ed25519 AAAAnotakey\n")
    with pytest.raises(SecretError, match=r"factory.pub line 1"):
        answer_secrets(hv)


def test_hypervisor_without_install_mapping_says_so(tmp_path: Path) -> None:
    inv = example_inventory()
    del hypervisors(inv)["pve-tenant"]["pve"]["install"]
    hv = load(tmp_path, inv).hypervisors["pve-tenant"]
    with pytest.raises(AnswerError, match="no pve.install mapping"):
        answer_secrets(hv)


# -------------------------------------------------------------------------------------- inventory


@pytest.mark.parametrize(("change", "expected"), [
    (lambda i: i["disk"].update(filesystem="zfs", disks=["sda", "sdb"]), "needs zfs_raid"),
    (lambda i: i["disk"].update(filesystem="zfs", zfs_raid="raid1", disks=["sda"]), "raid1 needs at least 2 disks"),
    (lambda i: i["disk"].update(disks=["sda", "sdb"]), "exactly one disk"),
    (lambda i: i["disk"].update(filesystem="zfs", zfs_raid="raid1", disks=["sda", "sdb"]),
     "storage.images 'local-lvm' is not what a zfs install creates (local-zfs)"),
    (lambda i: i["disk"].update(disks=["/dev/sda"]), "block device name"),
    (lambda i: i["network"].pop("gateway"), "needs address, gateway and dns"),
    (lambda i: i["network"].update(gateway="10.9.9.1"), "outside 192.168.10.2/24"),
    (lambda i: i.update(network={"source": "dhcp", "address": "10.0.0.2/24"}), "only apply to source: static"),
    (lambda i: i["network"].update(mac="00:00:5e:00:53:99"), "is not one of macs"),
    (lambda i: i.update(macs=["01:00:5e:00:53:01"]), "multicast"),
    (lambda i: i.update(keyboard="us"), "install.keyboard"),
    (lambda i: i.update(timezone="Mars/Olympus"), "not a time zone"),
    (lambda i: i.update(root_password_hash_file="/x"),  # noqa: S106 - a path
     "exactly one of root_password_hash_env"),
    (lambda i: i.update(root_ssh_keys=[]), "root_ssh_keys or root_ssh_key_files"),
    (lambda i: i.update(fqdn="other.deevnet.lan"), "must start with the node name pve-mgmt"),
    (lambda i: i.update(root_password="secret"),  # noqa: S106 - the point: refused
     "install.root_password"),
])
def test_install_mistakes_name_file_entry_and_key(tmp_path: Path, change: Any, expected: str) -> None:
    inv = example_inventory()
    change(hypervisors(inv)["pve-mgmt"]["pve"]["install"])
    found = problems(tmp_path, inv)
    assert any(expected in p and "pve-mgmt" in p and "hosts.yml" in p for p in found), found


def test_a_static_address_must_be_where_the_playbook_connects(tmp_path: Path) -> None:
    inv = example_inventory()
    pve = hypervisors(inv)["pve-mgmt"]["pve"]
    pve["ssh"]["host"] = "192.168.10.3"
    pve["install"]["fqdn"] = "pve-mgmt.deevnet.lan"
    found = problems(tmp_path, inv)
    assert any("install.network.address 192.168.10.2/24 is not ssh.host 192.168.10.3" in p for p in found), found
    pve["ssh"]["host"] = "192.168.10.2"
    assert load(tmp_path, inv).hypervisors["pve-mgmt"].install_fqdn == "pve-mgmt.deevnet.lan"
    del pve["install"]["fqdn"]
    assert any("install.fqdn is needed" in p for p in problems(tmp_path, inv))


def test_a_mac_on_two_hypervisors_is_refused(tmp_path: Path) -> None:
    inv = example_inventory()
    hypervisors(inv)["pve-tenant"]["pve"]["install"]["macs"].append("00:00:5E:00:53:02")
    found = problems(tmp_path, inv)
    assert any("00:00:5e:00:53:02 is listed for more than one hypervisor" in p for p in found), found


# ----------------------------------------------------------------------------------------- server


def installer_post(macs: list[str], serial: str = "S3R1AL") -> bytes:
    """The body proxmox-fetch-answer POSTs (pve-installer 9.1.7: fetch_plugins/http.rs HttpFetchPayload, flattening
    sysinfo.rs SysInfo; DMI keys are the /sys/devices/virtual/dmi/id file names after their first '_')."""
    return json.dumps({
        "$schema": {"version": "1.0"},
        "product": {"fullname": "Proxmox VE", "product": "pve", "enable_btrfs": True},
        "iso": {"release": "9.1", "isorelease": "1"},
        "dmi": {"system": {"serial": serial, "sku": "SKU", "uuid": "4c4c4544-0000-1000-8000-000000000000",
                           "name": "PowerEdge R640"},
                "baseboard": {"asset_tag": "", "serial": "BB1", "name": "0X45NX"},
                "chassis": {"serial": "CH1", "sku": "", "asset_tag": ""}},
        "network_interfaces": [{"link": f"enp{i}s0", "mac": mac} for i, mac in enumerate(macs, 1)],
    }).encode()


@pytest.fixture
def answer_server(tmp_path: Path) -> Iterator[tuple[AnswerServer, str, list[str]]]:
    cert, key = tmp_path / "tls/cert.pem", tmp_path / "tls/key.pem"
    assert ensure_certificate(cert, key, ["127.0.0.1"])
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    answers = [RenderedAnswer("pve-mgmt", ("00:00:5e:00:53:01", "00:00:5e:00:53:02"), "[global]\nfqdn = \"m\"\n"),
               RenderedAnswer("pve-tenant", ("00:00:5e:00:53:11",), "[global]\nfqdn = \"t\"\n")]
    log: list[str] = []
    server = AnswerServer(("127.0.0.1", 0), answers, TOKEN, cert, key, log.append)
    thread = server.start()
    try:
        yield server, certificate_fingerprint(cert.read_bytes()), log
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def post(server: AnswerServer, fingerprint: str, body: bytes, path: str = f"/answer?token={TOKEN}",
         headers: dict[str, str] | None = None) -> tuple[int, str]:
    """POST as the installer does: JSON, and the certificate accepted only if its SHA-256 is the pinned one."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE  # pinning below replaces CA verification
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=tls, timeout=10)
    try:
        conn.connect()
        der = conn.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        assert hashlib.sha256(der).hexdigest() == fingerprint.replace(":", "").lower()
        conn.request("POST", path, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_known_mac_gets_its_answer(answer_server: tuple[AnswerServer, str, list[str]]) -> None:
    server, fingerprint, log = answer_server
    status, body = post(server, fingerprint, installer_post(["00:00:5E:00:53:02", "52:54:00:00:00:01"]))
    assert (status, body) == (200, "[global]\nfqdn = \"m\"\n")
    assert log == ["127.0.0.1: serial S3R1AL, product PowerEdge R640, "
                   "MACs 00:00:5e:00:53:02, 52:54:00:00:00:01: 200 answer for pve-mgmt"]
    status, body = post(server, fingerprint, installer_post(["00:00:5e:00:53:11"]),
                        path="/answer", headers={"Authorization": f"Bearer {TOKEN}"})
    assert (status, body) == (200, "[global]\nfqdn = \"t\"\n")


def test_unknown_and_ambiguous_machines_are_refused(answer_server: tuple[AnswerServer, str, list[str]]) -> None:
    server, fingerprint, log = answer_server
    status, body = post(server, fingerprint, installer_post(["52:54:00:00:00:01"]))
    assert status == 404 and "no hypervisor" in body
    status, body = post(server, fingerprint, installer_post(["00:00:5e:00:53:01", "00:00:5e:00:53:11"]))
    assert status == 409 and "pve-mgmt, pve-tenant" in body
    assert "404" in log[0] and "52:54:00:00:00:01" in log[0]
    assert "409" in log[1] and "serial S3R1AL" in log[1]


def test_wrong_or_missing_token_is_refused_and_never_logged(
        answer_server: tuple[AnswerServer, str, list[str]]) -> None:
    server, fingerprint, log = answer_server
    wrong = "f" * 32
    assert post(server, fingerprint, installer_post(["00:00:5e:00:53:01"]), path=f"/answer?token={wrong}")[0] == 403
    assert post(server, fingerprint, installer_post(["00:00:5e:00:53:01"]), path="/answer")[0] == 401
    assert post(server, fingerprint, installer_post(["00:00:5e:00:53:01"]), path="/answer",
                headers={"Authorization": f"Bearer {wrong}"})[0] == 403
    post(server, fingerprint, installer_post(["00:00:5e:00:53:01"]))
    assert len(log) == 4
    assert not any(TOKEN in line or wrong in line for line in log), log


def test_not_the_installer_request_is_a_bad_request(answer_server: tuple[AnswerServer, str, list[str]]) -> None:
    server, fingerprint, log = answer_server
    assert post(server, fingerprint, b"not json")[0] == 400
    assert post(server, fingerprint, json.dumps({"$schema": {"version": "2.0"}}).encode())[0] == 400
    no_nics = json.loads(installer_post([]))
    assert post(server, fingerprint, json.dumps(no_nics).encode())[0] == 400
    assert post(server, fingerprint, installer_post(["00:00:5e:00:53:01"]), path=f"/other?token={TOKEN}")[0] == 404


def test_certificate_is_kept_and_its_fingerprint_is_the_openssl_form(tmp_path: Path) -> None:
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    assert ensure_certificate(cert, key, ["answers.deevnet.lan", "192.0.2.10"])
    first = cert.read_bytes()
    assert not ensure_certificate(cert, key, ["other"]) and cert.read_bytes() == first
    openssl = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert)],
                             check=True, capture_output=True, text=True).stdout
    assert openssl.strip().split("=", 1)[1] == certificate_fingerprint(first)
    key.unlink()
    with pytest.raises(AnswerServerError, match="only one of"):
        ensure_certificate(cert, key, ["x"])


def test_short_token_is_refused(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ensure_certificate(cert, key, ["127.0.0.1"])
    with pytest.raises(AnswerServerError, match="shorter than 16"):
        AnswerServer(("127.0.0.1", 0), [], "short", cert, key, print)


# ------------------------------------------------------------------------------------------ media

STUB_ASSISTANT = """#!/bin/sh
# Stands in for proxmox-auto-install-assistant: records its command line, writes --output like prepare-iso does.
printf '%s\\n' "$@" > "$STUB_LOG"
out=""
while [ $# -gt 0 ]; do
    [ "$1" = "--output" ] && out="$2"
    shift
done
printf 'prepared' > "$out"
if [ -n "${STUB_FAIL:-}" ]; then echo "xorriso : FAILURE : stub failure, half an ISO written" >&2; exit 1; fi
"""


@pytest.fixture
def stub_assistant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "proxmox-auto-install-assistant"
    stub.write_text(STUB_ASSISTANT)
    stub.chmod(0o755)
    log = tmp_path / "assistant.args"
    monkeypatch.setenv("STUB_LOG", str(log))
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return log


@pytest.fixture
def downloaded_iso(tmp_path: Path) -> tuple[Path, Path]:
    iso = tmp_path / "dl" / "proxmox-ve_9.1-1.iso"
    iso.parent.mkdir()
    iso.write_bytes(b"ISO9660" * 1000)
    sums = tmp_path / "dl" / "SHA256SUMS"
    sums.write_text(f"{'0' * 64}  proxmox-ve_8.4-1.iso\n{hashlib.sha256(iso.read_bytes()).hexdigest()}  "
                    f"{iso.name}\n")
    return iso, sums


def test_media_embeds_the_answer_and_the_first_boot_hook(tmp_path: Path, root_hashes: Path, stub_assistant: Path,
                                                        downloaded_iso: tuple[Path, Path]) -> None:
    from image_factory.hostinstall.run import make_media

    iso, sums = downloaded_iso
    builds = tmp_path / "builds"
    out = make_media(load(tmp_path, example_inventory()), builds, iso=iso, sums=str(sums), fetch_from="iso",
                     hypervisor="pve-mgmt", url=None, fingerprint=None, token=None, output=None)
    assert out == builds / "hosts/proxmox-ve_9.1-1-auto-pve-mgmt.iso" and out.read_text() == "prepared"
    answer = builds / "hosts/pve-mgmt/answer.toml"
    hook = builds / "hosts/first-boot.sh"
    assert stub_assistant.read_text().splitlines() == [
        "prepare-iso", "--output", str(builds / "hosts/.proxmox-ve_9.1-1-auto-pve-mgmt.iso.partial"),
        "--fetch-from", "iso", "--answer-file", str(answer), "--on-first-boot", str(hook), str(iso)]
    assert tomllib.loads(answer.read_text())["global"]["fqdn"] == "pve-mgmt.deevnet.lan"
    assert hook.stat().st_mode & 0o111 and hook.read_text().startswith("#!/bin/sh")
    assert not list((builds / "hosts").glob(".*.partial"))


def test_media_for_the_answer_server_pins_its_certificate(tmp_path: Path, stub_assistant: Path,
                                                          downloaded_iso: tuple[Path, Path]) -> None:
    from image_factory.hostinstall.run import make_media

    iso, sums = downloaded_iso
    fingerprint = ":".join(["AB"] * 32)
    out = make_media(load(tmp_path, example_inventory()), tmp_path / "builds", iso=iso, sums=str(sums),
                     fetch_from="http", hypervisor=None, url="https://192.0.2.10:8443/answer",
                     fingerprint=fingerprint, token=TOKEN, output=tmp_path / "out.iso")
    args = stub_assistant.read_text().splitlines()
    assert out == tmp_path / "out.iso"
    assert args[:5] == ["prepare-iso", "--output", str(tmp_path / ".out.iso.partial"), "--fetch-from", "http"]
    assert args[5:9] == ["--url", f"https://192.0.2.10:8443/answer?token={TOKEN}", "--cert-fingerprint", fingerprint]
    assert args[-1] == str(iso) and "--answer-file" not in args


def test_media_refuses_an_iso_whose_hash_differs(tmp_path: Path, root_hashes: Path, stub_assistant: Path,
                                                 downloaded_iso: tuple[Path, Path]) -> None:
    from image_factory.hostinstall.media import IsoNotVerified
    from image_factory.hostinstall.run import make_media

    iso, sums = downloaded_iso
    with iso.open("ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(IsoNotVerified, match="SHA-256 .* but .*SHA256SUMS lists"):
        make_media(load(tmp_path, example_inventory()), tmp_path / "builds", iso=iso, sums=str(sums),
                   fetch_from="iso", hypervisor="pve-mgmt", url=None, fingerprint=None, token=None, output=None)
    assert not stub_assistant.exists(), "the assistant ran on an unverified ISO"
    renamed = iso.rename(iso.with_name("latest.iso"))
    with pytest.raises(IsoNotVerified, match="lists no latest.iso"):
        make_media(load(tmp_path, example_inventory()), tmp_path / "builds", iso=renamed, sums=str(sums),
                   fetch_from="iso", hypervisor="pve-mgmt", url=None, fingerprint=None, token=None, output=None)
    with pytest.raises(ValidationFailed, match="only https://"):
        make_media(load(tmp_path, example_inventory()), tmp_path / "builds", iso=renamed,
                   sums="http://download.proxmox.com/iso/SHA256SUMS", fetch_from="iso", hypervisor="pve-mgmt",
                   url=None, fingerprint=None, token=None, output=None)
    assert not stub_assistant.exists()


def test_media_failure_leaves_no_iso(tmp_path: Path, root_hashes: Path, stub_assistant: Path,
                                     downloaded_iso: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from image_factory.hostinstall.media import MediaError
    from image_factory.hostinstall.run import make_media

    iso, sums = downloaded_iso
    monkeypatch.setenv("STUB_FAIL", "1")
    with pytest.raises(MediaError, match=r"(?s)exit 1.*stub failure"):
        make_media(load(tmp_path, example_inventory()), tmp_path / "builds", iso=iso, sums=str(sums),
                   fetch_from="iso", hypervisor="pve-mgmt", url=None, fingerprint=None, token=None,
                   output=tmp_path / "out.iso")
    assert not (tmp_path / "out.iso").exists() and not (tmp_path / ".out.iso.partial").exists()


def test_media_without_the_assistant_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          downloaded_iso: tuple[Path, Path]) -> None:
    from image_factory.hostinstall.media import MediaError
    from image_factory.hostinstall.run import make_media

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    iso, sums = downloaded_iso
    with pytest.raises(MediaError, match=r"apt install proxmox-auto-install-assistant xorriso"):
        make_media(load(tmp_path, example_inventory()), tmp_path / "builds", iso=iso, sums=str(sums),
                   fetch_from="http", hypervisor=None, url="https://192.0.2.10:8443/answer",
                   fingerprint=":".join(["AB"] * 32), token=TOKEN, output=None)


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"fetch_from": "usb"}, "one of iso, http, partition"),
    ({"fetch_from": "http", "url": "http://192.0.2.10/answer"}, "https:// URL"),
    ({"fetch_from": "http", "url": "https://192.0.2.10/answer", "fingerprint": "AB:CD"}, "fingerprint"),
    ({"fetch_from": "http", "hypervisor": "pve-mgmt"}, "--hypervisor: --fetch-from http serves every"),
    ({"fetch_from": "iso"}, "name the hypervisor"),
    ({"fetch_from": "partition"}, "name the hypervisor"),
])
def test_media_plan_mistakes_are_named_before_anything_runs(tmp_path: Path, stub_assistant: Path,
                                                            downloaded_iso: tuple[Path, Path], kwargs: dict[str, Any],
                                                            expected: str) -> None:
    from image_factory.errors import FactoryError
    from image_factory.hostinstall.run import make_media

    iso, sums = downloaded_iso
    args: dict[str, Any] = {"hypervisor": None, "url": None, "fingerprint": None, "token": TOKEN, "output": None,
                            **kwargs}
    with pytest.raises(FactoryError, match=expected):
        make_media(load(tmp_path, example_inventory()), tmp_path / "builds", iso=iso, sums=str(sums), **args)
    assert not stub_assistant.exists() and not (tmp_path / "builds").exists()


def test_sums_over_https_are_fetched_with_tls_verified(tmp_path: Path, downloaded_iso: tuple[Path, Path]) -> None:
    from image_factory.hostinstall.media import read_sums, verify_iso

    iso, sums = downloaded_iso
    asked: list[str] = []
    text = read_sums("https://enterprise.proxmox.com/iso/SHA256SUMS",
                     get=lambda url: asked.append(url) or sums.read_text())
    assert asked == ["https://enterprise.proxmox.com/iso/SHA256SUMS"]
    assert verify_iso(iso, text, "SHA256SUMS") == hashlib.sha256(iso.read_bytes()).hexdigest()


def test_derivation_reads_serde_as_serde_does() -> None:
    """tests/data/derive_pve_answer_schema.py on source of answer.rs's shape: rename_all, rename, alias, Option and
    default (not required), try_from (the source type's fields), untagged enums, variant renames and aliases."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("derive_pve_answer_schema", DATA / "derive_pve_answer_schema.py")
    assert spec is not None and spec.loader is not None
    derive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive)
    src = '''
#[derive(Clone, Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Top {
    pub global_thing: String,
    #[serde(rename = "disk-setup")]
    pub disks: Disks,
    /// a doc comment, with a comma
    #[serde(alias = "max_size", default)]
    pub max_size: Option<BTreeMap<String, String>>,
    pub mode: Mode,
    pub name: Name,
}

#[derive(Clone, Deserialize, Debug)]
#[serde(try_from = "DiskSetup", deny_unknown_fields)]
pub struct Disks {
    pub inner: Vec<u8>,
}

#[derive(Clone, Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct DiskSetup {
    pub disk_list: Vec<String>,
    pub hdsize: Option<f64>,
}

#[derive(Clone, Deserialize, Debug)]
#[serde(rename_all(deserialize = "lowercase", serialize = "UPPERCASE"))]
pub enum Mode {
    #[serde(alias = "RAID1")]
    Raid1,
    #[serde(rename(deserialize = "raidz-1", serialize = "RAIDZ-1"))]
    RaidZ,
}

#[derive(Clone, Deserialize, Debug)]
#[serde(untagged)]
pub enum Name {
    Simple(Fqdn),
    Extended(DiskSetup),
}
'''
    items = derive.parse_items(src)
    assert derive.struct_schema("Top", items) == {
        "type": "object",
        "properties": {"global-thing": {"type": "string"}, "disk-setup": {"$ref": "#/$defs/Disks"},
                       "max-size": {"type": "object", "additionalProperties": {"type": "string"}},
                       "max_size": {"type": "object", "additionalProperties": {"type": "string"}},
                       "mode": {"$ref": "#/$defs/Mode"}, "name": {"$ref": "#/$defs/Name"}},
        "required": ["global-thing", "disk-setup", "mode", "name"],
        "additionalProperties": False,
    }
    assert derive.struct_schema("Disks", items) == {"$ref": "#/$defs/DiskSetup"}
    assert derive.struct_schema("DiskSetup", items)["required"] == ["disk-list"]
    assert derive.enum_schema("Mode", items) == {"type": "string", "enum": ["raid1", "RAID1", "raidz-1"]}
    assert derive.enum_schema("Name", items) == {"oneOf": [
        {"type": "string", "pattern": derive.FQDN_PATTERN}, {"$ref": "#/$defs/DiskSetup"}]}
    assert derive.reachable("Top", items) == {"Top", "Disks", "DiskSetup", "Mode", "Name"}


# ------------------------------------------------------------------------------------ first boot


def test_first_boot_hook_shows_what_to_pin_and_checks_the_playbook_tools(tmp_path: Path) -> None:
    """The hook as the installed host runs it, under a scratch root: the host key and the API certificate's
    fingerprint in the form the inventory pins, on the console and the login prompt."""
    import subprocess

    from image_factory.hostinstall.firstboot import FIRST_BOOT_HOOK

    root, tools = tmp_path / "root", tmp_path / "bin"
    (root / "etc/ssh").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "etc/ssh/ssh_host_ed25519_key.pub").write_text(KEY.replace("ansible@deevnet", "root@pve-mgmt") + "\n")
    ensure_certificate(root / "etc/pve/local/pve-ssl.pem", tmp_path / "pve-ssl.key", ["pve-mgmt.deevnet.lan"])
    tools.mkdir()
    for tool in ("pveum", "pvesm", "pvesh"):
        (tools / tool).write_text("#!/bin/sh\n")
        (tools / tool).chmod(0o755)
    hook = tmp_path / "proxmox-first-boot"
    hook.write_text(FIRST_BOOT_HOOK)
    hook.chmod(0o700)
    env = {"PATH": f"{tools}:/usr/bin:/bin", "DEEVNET_FIRST_BOOT_ROOT": str(root)}

    proc = subprocess.run([str(hook), "fully-up"], env=env, capture_output=True, text=True, timeout=60)
    fingerprint = certificate_fingerprint((root / "etc/pve/local/pve-ssl.pem").read_bytes())
    assert proc.returncode == 0, proc.stderr
    shown = (root / "etc/issue.d/deevnet-image-factory.issue").read_text()
    assert f"  host_key: {' '.join(KEY.split()[:2])}\n" in shown
    assert f"  tls_fingerprint: {fingerprint}\n" in shown
    assert (root / "dev/console").read_text() == shown == proc.stdout

    (tools / "pvesm").unlink()
    proc = subprocess.run([str(hook), "fully-up"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "MISSING for ansible/playbooks/hypervisor.yml: pvesm" in proc.stdout


# -------------------------------------------------------------------------------------------- CLI


def run_invoke(*args: str, env: dict[str, str]) -> Any:
    import subprocess
    import sys

    return subprocess.run([str(Path(sys.executable).parent / "invoke"), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "COLUMNS": "400", **env})


def test_cli_answer_writes_0600_and_prints_no_hash(tmp_path: Path, root_hashes: Path) -> None:
    env = {"HOME": str(tmp_path / "home"), "PVE_MGMT_ROOT_PASSWORD_HASH": HASH,
           "INVOKE_FACTORY_BUILDS_DIR": str(tmp_path / "builds")}
    proc = run_invoke("host.answer", "all", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert [a["hypervisor"] for a in listed["answers"]] == ["pve-mgmt", "pve-tenant"]
    for entry in listed["answers"]:
        path = Path(entry["path"])
        assert path.is_relative_to(tmp_path / "builds") and path.stat().st_mode & 0o777 == 0o600
        assert tomllib.loads(path.read_text())["global"]["root-password-hashed"] == HASH
    assert HASH not in proc.stdout + proc.stderr
    proc = run_invoke("host.answer", "pve-nope", env=env)
    assert proc.returncode == 2 and "pve-nope: no such hypervisor" in proc.stderr


def test_cli_media_without_the_assistant_exits_non_zero_naming_the_package(
        tmp_path: Path, downloaded_iso: tuple[Path, Path]) -> None:
    iso, sums = downloaded_iso
    proc = run_invoke("host.media", "--iso", str(iso), "--sums", str(sums), "--fetch-from", "http",
                      "--url", "https://192.0.2.10:8443/answer", "--cert-fingerprint", ":".join(["ab"] * 32),
                      env={"FACTORY_ANSWER_TOKEN": TOKEN, "INVOKE_FACTORY_BUILDS_DIR": str(tmp_path / "builds")})
    assert proc.returncode == 1
    assert "apt install proxmox-auto-install-assistant xorriso" in proc.stderr
    assert "Traceback" not in proc.stderr
