"""The SSH upload engine against a real OpenSSH sshd (own instance in a tmp dir) and a TCP proxy
that cuts the connection at random points: resume, verify, atomic rename, skip, refusal."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from image_factory.pve.sshlink import HostKeyMismatch, SshLink
from image_factory.pve.upload import SshUploader, UploadError, partial_name
from image_factory.site.inventory import SshEndpoint

pytestmark = [pytest.mark.lab, pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/sbin/sshd").exists(),
                                                  reason="needs root and OpenSSH sshd")]


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


@dataclass
class Sshd:
    host: str
    port: int
    host_key: str
    client_key: Path
    storage: Path
    proc: subprocess.Popen[bytes]

    def endpoint(self, port: int | None = None, host_key: str | None = None) -> SshEndpoint:
        return SshEndpoint(host=self.host, port=port or self.port, user="root",
                           host_key=host_key or self.host_key, key_file=self.client_key)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    d = tmp_path / "sshd"
    d.mkdir()
    host_key = _keygen(d / "host_key")
    client_pub = _keygen(d / "client_key")
    (d / "authorized_keys").write_text(client_pub + "\n")
    storage = tmp_path / "import"
    storage.mkdir()
    port = _free_port()
    cfg = d / "sshd_config"
    cfg.write_text("\n".join([
        f"ListenAddress 127.0.0.1:{port}", f"HostKey {d / 'host_key'}", f"AuthorizedKeysFile {d / 'authorized_keys'}",
        f"PidFile {d / 'sshd.pid'}", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "UseDNS no", "MaxStartups 50:30:100",
        "MaxSessions 50", "Subsystem sftp internal-sftp", "",
    ]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(cfg), "-E", str(d / "log")])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield Sshd("127.0.0.1", port, host_key, d / "client_key", storage, proc)
    finally:
        proc.terminate()
        proc.wait(10)


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to the sshd; connection i is cut after budgets[i] client bytes."""

    def __init__(self, target: tuple[str, int], budgets: list[int]):
        self.target = target
        self.budgets = list(budgets)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self.client_bytes = 0
        self.cuts = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            budget = self.budgets[self.connections] if self.connections < len(self.budgets) else -1
            self.connections += 1
            upstream = socket.create_connection(self.target)
            pair = (client, upstream)
            threading.Thread(target=self._pump, args=(client, upstream, budget, pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, -1, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, budget: int, pair: tuple[socket.socket, ...]) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if budget >= 0 and sent + len(data) > budget:
                    dst.sendall(data[: max(budget - sent, 0)])
                    self.client_bytes += max(budget - sent, 0)
                    self.cuts += 1
                    break
                dst.sendall(data)
                sent += len(data)
                if budget >= 0:
                    self.client_bytes += len(data)
        except OSError:
            pass
        for s in pair:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def _artifact(tmp_path: Path, size: int) -> tuple[Path, str]:
    path = tmp_path / "art.qcow2"
    path.write_bytes(os.urandom(size))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=["openssh", "exec"])
def engine(request: pytest.FixtureRequest) -> str:
    """Both SSH engines: OpenSSH's ssh carrying the bytes (the default) and paramiko's exec channel."""
    return str(request.param)


def _uploader(endpoint: SshEndpoint, **kw: object) -> SshUploader:
    return SshUploader("hv", lambda: SshLink("hv", endpoint).connect(), endpoint=endpoint,  # type: ignore[arg-type]
                       **kw)


def test_upload_verifies_renames_and_then_skips(engine: str, sshd: Sshd, tmp_path: Path) -> None:
    art, digest = _artifact(tmp_path, 5 * 1024 * 1024 + 123)
    up = _uploader(sshd.endpoint(), engine=engine)
    seen: list[int] = []
    res = up.upload(art, str(sshd.storage), "img-1.qcow2", digest, progress=seen.append)
    up.close()
    final = sshd.storage / "img-1.qcow2"
    assert res.action == "uploaded" and res.bytes_sent == art.stat().st_size
    assert hashlib.sha256(final.read_bytes()).hexdigest() == digest
    assert not (sshd.storage / partial_name("img-1.qcow2")).exists()
    assert seen[-1] == art.stat().st_size
    again = _uploader(sshd.endpoint(), engine=engine)
    res2 = again.upload(art, str(sshd.storage), "img-1.qcow2", digest)
    again.close()
    assert res2.action == "skipped" and res2.bytes_sent == 0


def test_wrong_content_under_final_name_is_replaced_atomically(engine: str, sshd: Sshd, tmp_path: Path) -> None:
    art, digest = _artifact(tmp_path, 1024 * 1024)
    (sshd.storage / "img.qcow2").write_bytes(b"not the image")
    up = _uploader(sshd.endpoint(), engine=engine)
    res = up.upload(art, str(sshd.storage), "img.qcow2", digest)
    up.close()
    assert res.action == "uploaded"
    assert hashlib.sha256((sshd.storage / "img.qcow2").read_bytes()).hexdigest() == digest


def test_a_damaged_partial_is_caught_by_the_streamed_hash_and_sent_again(engine: str, sshd: Sshd,
                                                                          tmp_path: Path) -> None:
    """The host hashes the partial's earlier part and the new bytes as one stream: a partial left by an earlier
    run whose bytes are wrong fails verification, is removed, and the file is sent whole."""
    art, digest = _artifact(tmp_path, 3 * 1024 * 1024)
    partial = sshd.storage / partial_name("img.qcow2")
    damaged = bytearray(art.read_bytes()[: 1024 * 1024])
    damaged[4096] ^= 0xFF
    partial.write_bytes(bytes(damaged))
    up = _uploader(sshd.endpoint(), engine=engine)
    res = up.upload(art, str(sshd.storage), "img.qcow2", digest)
    up.close()
    assert res.resumed_from == [1024 * 1024] and res.attempts == 2
    assert res.bytes_sent == 2 * 1024 * 1024 + art.stat().st_size
    assert hashlib.sha256((sshd.storage / "img.qcow2").read_bytes()).hexdigest() == digest
    assert not partial.exists()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_resume_after_random_cuts_never_exposes_a_partial_final(engine: str,
    sshd: Sshd, tmp_path: Path, seed: int, watch_final_name: Any
) -> None:
    rng = random.Random(seed)
    size = 12 * 1024 * 1024 + rng.randrange(1000)
    art, digest = _artifact(tmp_path, size)
    # Three connections cut somewhere in the transfer (the handshake alone is a few KiB).
    budgets = sorted(rng.randrange(64 * 1024, size) for _ in range(3))
    proxy = CuttingProxy((sshd.host, sshd.port), budgets)
    final = sshd.storage / "img-cut.qcow2"
    try:
        with watch_final_name(final, size) as bad:  # the final name must only ever hold the complete file
            up = _uploader(sshd.endpoint(port=proxy.port), attempts=6, engine=engine)
            res = up.upload(art, str(sshd.storage), final.name, digest)
            up.close()
    finally:
        proxy.close()
    assert proxy.cuts >= 1
    assert res.resumed_from, "a cut mid-upload must resume from the remote partial size"
    assert not bad, f"the final name held an incomplete file: sizes {bad[:5]}"
    assert hashlib.sha256(final.read_bytes()).hexdigest() == digest
    assert not (sshd.storage / partial_name(final.name)).exists()
    # Resuming sent less than restarting would have: at most the artifact plus what was in flight.
    assert res.bytes_sent < size * (1 + len(budgets))


def test_gives_up_after_bounded_attempts_and_removes_the_partial(engine: str, sshd: Sshd, tmp_path: Path) -> None:
    art, digest = _artifact(tmp_path, 4 * 1024 * 1024)
    # Every connection dies right after the handshake and auth: no progress is possible.
    proxy = CuttingProxy((sshd.host, sshd.port), [6000] * 50)
    try:
        up = _uploader(sshd.endpoint(port=proxy.port), attempts=2, engine=engine)
        with pytest.raises(UploadError):
            up.upload(art, str(sshd.storage), "img-x.qcow2", digest)
        up.close()
    finally:
        proxy.close()
    assert not (sshd.storage / "img-x.qcow2").exists()
    assert proxy.connections <= 2 * 8 + 2


def test_unknown_host_key_is_refused_with_zero_bytes(engine: str, sshd: Sshd, tmp_path: Path) -> None:
    art, digest = _artifact(tmp_path, 1024 * 1024)
    other = _keygen(tmp_path / "other_key")
    up = _uploader(sshd.endpoint(host_key=other), engine=engine)
    with pytest.raises(HostKeyMismatch):
        up.upload(art, str(sshd.storage), "img-k.qcow2", digest)
    assert up.bytes_sent == 0
    assert list(sshd.storage.iterdir()) == []


def test_a_refusal_ssh_reports_is_final_not_retried(sshd: Sshd, tmp_path: Path) -> None:
    """OpenSSH refuses a client key others can read (paramiko does not): said at once, nothing left behind."""
    art, digest = _artifact(tmp_path, 1024 * 1024)
    loose = tmp_path / "loose_key"
    shutil.copy(sshd.client_key, loose)
    loose.chmod(0o644)
    endpoint = sshd.endpoint().model_copy(update={"key_file": loose})
    up = _uploader(endpoint, engine="openssh")
    with pytest.raises(UploadError, match=r"chmod 600") as caught:
        up.upload(art, str(sshd.storage), "img-p.qcow2", digest, check_final=False)
    up.close()
    assert "attempts" not in str(caught.value) and up.bytes_sent == 0
    assert list(sshd.storage.iterdir()) == []


def test_sftp_engine_resumes_and_verifies(sshd: Sshd, tmp_path: Path) -> None:
    art, digest = _artifact(tmp_path, 10 * 1024 * 1024)
    # Cut beyond the 2 MiB channel window, so some writes were surely processed before the cut
    # (an abrupt reset loses whatever the server still had buffered).
    proxy = CuttingProxy((sshd.host, sshd.port), [6 * 1024 * 1024])
    try:
        up = _uploader(sshd.endpoint(port=proxy.port), engine="sftp")
        res = up.upload(art, str(sshd.storage), "img-s.qcow2", digest)
        up.close()
    finally:
        proxy.close()
    assert res.engine == "sftp" and res.resumed_from, (res, proxy.cuts, proxy.connections)
    assert hashlib.sha256((sshd.storage / "img-s.qcow2").read_bytes()).hexdigest() == digest


def test_no_scp_needed() -> None:
    # The engine uses only sh, flock, stat, cat, mv, rm and openssl/sha256sum on the host.
    for tool in ("flock", "stat", "cat", "mv", "rm", "sha256sum"):
        assert shutil.which(tool), tool


def test_full_disk_is_named_at_the_first_failure_without_blind_retries(engine: str, sshd: Sshd, tmp_path: Path,
                                                                       small_tmpfs: Any) -> None:
    """The import directory is a 4 MiB filesystem (tmpfs): the 8 MiB upload hits ENOSPC half-way."""
    art, digest = _artifact(tmp_path, 8 * 1024 * 1024)
    small = small_tmpfs(sshd.storage / "small", 4)
    up = _uploader(sshd.endpoint(), engine=engine)
    started = time.monotonic()
    with pytest.raises(UploadError, match="No space left on device") as err:
        up.upload(art, str(small), "img-full.qcow2", digest)
    up.close()
    message = str(err.value)
    assert message.startswith("hv:") and partial_name("img-full.qcow2") in message and "MiB free" in message
    assert "attempts" not in message  # the first failure, not the last of many
    assert time.monotonic() - started < 30, "no blind retries"
    assert not (small / "img-full.qcow2").exists()
