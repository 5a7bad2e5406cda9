"""Unit tests for image_factory.image.imagetest (suites, JUnit, suite hash, a panicked boot) and the
strict paramiko backend of tests/image/conftest.py (against a real in-process SSH server)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from image_factory.image import imagetest as it
from image_factory.image import manifest as mf
from image_factory.image import testguest
from image_factory.lab import factories
from image_factory.platform import Platform
from image_factory.settings import Settings
from image_factory.site.inventory import Image, Source

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_suite_hash_changes_with_content_not_order(tmp_path: Path) -> None:
    a, b = tmp_path / "conftest.py", tmp_path / "test_common.py"
    a.write_text("x = 1\n")
    b.write_text("def test_x(): pass\n")
    h1 = it.suite_hash([a, b])
    assert h1 == it.suite_hash([b, a])
    b.write_text("def test_x(): assert 0\n")
    assert it.suite_hash([a, b]) != h1


def test_suite_files_real_suites_and_missing_suite(tmp_path: Path) -> None:
    files = it.suite_files(REPO, ["common", "hygiene", "fedora"])
    assert [f.name for f in files] == ["conftest.py", "test_common.py", "test_hygiene.py", "test_fedora.py"]
    with pytest.raises(testguest.ImageTestError, match="test_nosuch.py"):
        it.suite_files(REPO, ["nosuch"])


@pytest.mark.parametrize(("platform", "options"), [
    (None, []),
    (Platform(), []),
    (Platform(firmware="uefi", machine="q35"), ["--secure-boot=disabled", "--tpm=no"]),
    (Platform(firmware="uefi", secure_boot=True, keys="microsoft-2011+2023", tpm=True, machine="q35"),
     ["--secure-boot=enabled", "--tpm=yes"]),
    # Secure Boot asked with no keys enrolled: the firmware stays in setup mode and enforces nothing
    (Platform(firmware="uefi", secure_boot=True, keys="none", machine="q35"), ["--secure-boot=disabled", "--tpm=no"]),
])
def test_firmware_options_say_what_the_platform_boots_in(platform: Platform | None, options: list[str]) -> None:
    assert it.firmware_options(platform) == options


def test_parse_junit_counts_and_outcomes(tmp_path: Path) -> None:
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.image.test_common" name="test_a[paramiko://u@h:1]"/>'
        '<testcase classname="tests.image.test_common" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.image.test_hygiene" name="test_c"><error message="y"/></testcase>'
        '<testcase classname="tests.image.test_fedora" name="test_d"><skipped message="z"/></testcase>'
        "</testsuite></testsuites>"
    )
    c = it.parse_junit(xml)
    assert (c.tests, c.passed, c.failed, c.errors, c.skipped) == (4, 1, 1, 1, 1)
    assert c.failures == ["test_common::test_b", "test_hygiene::test_c"]
    assert c.outcomes["test_common::test_a[paramiko://u@h:1]"] == "passed"
    with pytest.raises(testguest.ImageTestError, match="no usable JUnit"):
        it.parse_junit(tmp_path / "missing.xml")


def _image() -> Image:
    return Image(name="fixture", family="debian", release=12, mode="cloud",
                 source=Source(url="builds/base/x.qcow2", checksum="none"), test_suites=["common", "hygiene"])


def _manifest(artifact: Path, sha: str) -> mf.Manifest:
    return factories.manifest("fixture", path=str(artifact), sha256=sha)


def test_test_image_refuses_artifact_that_changed_since_build(tmp_path: Path) -> None:
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds")}, root=REPO)
    art = tmp_path / "a.qcow2"
    art.write_bytes(b"not what was built")
    build_dir = tmp_path / "builds" / "fixture"
    mf.save(build_dir, _manifest(art, "0" * 64))
    with pytest.raises(testguest.ImageTestError, match="differs from the manifest"):
        it.test_image(settings, _image(), build_dir)
    assert mf.require(build_dir).image_test is None
    assert not list(build_dir.glob(".imagetest-*"))


def test_test_image_needs_a_manifest(tmp_path: Path) -> None:
    settings = Settings.from_mapping({"builds_dir": str(tmp_path)}, root=REPO)
    with pytest.raises(mf.ManifestError, match="build the image first"):
        it.test_image(settings, _image(), tmp_path / "fixture")


def _fake_guest(tmp_path: Path, serial: str) -> testguest.Guest:
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    (work / "serial.log").write_text(serial)
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    return testguest.Guest(proc, work, 1, work / "serial.log", work / "qga.sock", work / "key",
                           work / "known_hosts", Path(tempfile.mkdtemp(dir=tmp_path)))


PANIC = ("[   26.338350] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n"
         "[   26.342397] Kernel panic - not syncing: Fatal exception in interrupt\n")


def test_a_kernel_panic_on_the_console_ends_the_wait_at_once(tmp_path: Path) -> None:
    guest = _fake_guest(tmp_path, "booting\n" + PANIC)
    try:
        with pytest.raises(testguest.GuestPanicked, match="(?s)kernel panicked during boot.*Oops: int3"):
            testguest.wait_for_ssh(guest, timeout=60)
    finally:
        guest.stop()


@pytest.mark.parametrize(("accelerator", "boots"), [("tcg", 2), ("kvm", 1)])
def test_a_panicked_boot_is_repeated_once_under_tcg_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         accelerator: str, boots: int) -> None:
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds"), "accelerator": accelerator},
                                     root=REPO)
    art = tmp_path / "a.qcow2"
    art.write_bytes(b"artifact")
    build_dir = tmp_path / "builds" / "fixture"
    mf.save(build_dir, _manifest(art, mf.sha256_file(art)))
    started: list[testguest.Guest] = []

    def boot(*_a: object, **_k: object) -> testguest.Guest:
        started.append(_fake_guest(tmp_path, PANIC))
        return started[-1]

    monkeypatch.setattr(it, "boot_guest", boot)
    with pytest.raises(testguest.GuestPanicked):
        it.test_image(settings, _image(), build_dir)
    assert len(started) == boots
    assert not any(g.alive() for g in started)
    assert "Kernel panic" in (build_dir / it.SERIAL_NAME).read_text()


# ------------------------------------------------------------- strict host keys in the image suites


def _load_image_conftest() -> Any:
    spec = importlib.util.spec_from_file_location("image_suite_conftest", REPO / "tests/image/conftest.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Server(paramiko.ServerInterface):
    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"


@pytest.fixture
def ssh_server() -> Any:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    key = paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode()))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    stop = threading.Event()
    transports: list[paramiko.Transport] = []

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            t = paramiko.Transport(conn)
            t.add_server_key(key)
            transports.append(t)
            with contextlib.suppress(paramiko.SSHException, EOFError):
                t.start_server(server=_Server())

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    yield sock.getsockname()[1], key
    stop.set()
    th.join(2)
    for t in transports:
        t.close()
    sock.close()


def _backend(conftest: Any, port: int, known_hosts: Path, identity: Path) -> Any:
    from testinfra.backend.paramiko import ParamikoBackend

    b = ParamikoBackend(f"paramiko://tester@127.0.0.1:{port}", ssh_identity_file=str(identity))

    class _Host:
        backend = b

    class _Config:
        def getoption(self, name: str) -> Any:
            return str(known_hosts) if name == "known_hosts" else None

    conftest._harden(_Host, _Config())
    assert isinstance(b, conftest.StrictParamikoBackend)
    return b


def test_strict_backend_refuses_unknown_host_key(ssh_server: Any, tmp_path: Path) -> None:
    port, _key = ssh_server
    conftest = _load_image_conftest()
    identity, _ = testguest.make_ssh_key(tmp_path)
    other = paramiko.RSAKey.generate(1024)
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{port} ssh-rsa {other.get_base64()}\n")  # a different key for this host
    with pytest.raises(paramiko.SSHException):
        _ = _backend(conftest, port, kh, identity).client
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        _ = _backend(conftest, port, empty, identity).client


def test_strict_backend_accepts_pinned_host_key(ssh_server: Any, tmp_path: Path) -> None:
    port, key = ssh_server
    conftest = _load_image_conftest()
    identity, _ = testguest.make_ssh_key(tmp_path)
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{port} {key.get_name()} {key.get_base64()}\n")
    client = _backend(conftest, port, kh, identity).client
    transport = client.get_transport()
    assert transport is not None and transport.is_authenticated()
    client.close()
