"""SSH to a hypervisor with paramiko, verifying the host key pinned in the inventory.

The transport is opened by hand rather than through SSHClient so that (1) the server is asked for
exactly the pinned key type, (2) the key is compared before authentication and before any payload
byte is sent, and (3) the fast cipher is negotiated (aes128-gcm; see docs/lab-notes.md).
There is no trust-on-first-use and no AutoAddPolicy anywhere.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import shlex
import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko

from image_factory.errors import RemoteError
from image_factory.site.inventory import SshEndpoint

# paramiko logs every failed handshake with a traceback from its own thread; the same failure
# reaches the caller as an exception carrying host and reason, so the duplicate is silenced.
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)

TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
_KEY_TYPES = {
    "ssh-ed25519": ["ssh-ed25519"],
    "ssh-rsa": ["rsa-sha2-512", "rsa-sha2-256"],
    "ecdsa-sha2-nistp256": ["ecdsa-sha2-nistp256"],
    "ecdsa-sha2-nistp384": ["ecdsa-sha2-nistp384"],
    "ecdsa-sha2-nistp521": ["ecdsa-sha2-nistp521"],
}


class HostKeyMismatch(RemoteError):
    """The server presented a key other than the pinned one: refuse before sending anything."""


class LinkClosed(RemoteError):
    """The link was used after its transport closed (or before it opened): reconnecting may help."""


class CommandTimedOut(RemoteError):
    """A command gave no answer within its timeout: the link may be gone, reconnecting may help."""


def fingerprint(key_type: str, key_b64: str) -> str:
    digest = hashlib.sha256(base64.b64decode(key_b64)).digest()
    return f"{key_type} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"


@dataclass
class CommandResult:
    status: int
    stdout: str
    stderr: str


class SshLink:
    """An authenticated transport to one hypervisor; use as a context manager."""

    def __init__(self, name: str, endpoint: SshEndpoint, *, timeout: float = 15.0):
        self.name = name
        self.endpoint = endpoint
        self.timeout = timeout
        self.transport: paramiko.Transport | None = None

    # ------------------------------------------------------------------ connect
    def __enter__(self) -> SshLink:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> SshLink:
        ep = self.endpoint
        pinned_type, pinned_b64 = ep.host_key.split()[:2]
        try:
            sock = socket.create_connection((ep.host, ep.port), timeout=self.timeout)
        except OSError as exc:
            raise RemoteError(self.name, f"SSH connection to {ep.host}:{ep.port} failed: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(PromptAcks.adopt(sock))
        opts = transport.get_security_options()
        opts.key_types = _KEY_TYPES.get(pinned_type, [pinned_type])
        opts.ciphers = [c for c in FAST_CIPHERS if c in opts.ciphers] + [
            c for c in opts.ciphers if c not in FAST_CIPHERS
        ]
        try:
            transport.start_client(timeout=self.timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport.close()
            raise RemoteError(
                self.name, f"SSH handshake with {ep.host}:{ep.port} failed ({exc}); "
                f"does the server offer a {pinned_type} host key?"
            ) from None
        offered = transport.get_remote_server_key()
        if offered.get_name() != pinned_type or offered.get_base64() != pinned_b64:
            transport.close()
            raise HostKeyMismatch(
                self.name,
                f"SSH host key of {ep.host}:{ep.port} does not match the key pinned in the inventory: "
                f"offered {fingerprint(offered.get_name(), offered.get_base64())}, "
                f"pinned {fingerprint(pinned_type, pinned_b64)}. Refusing to connect.",
            )
        try:
            self._authenticate(transport)
        except BaseException:
            transport.close()
            raise
        transport.set_keepalive(15)
        self.transport = transport
        return self

    def _authenticate(self, transport: paramiko.Transport) -> None:
        ep = self.endpoint
        keys: list[paramiko.PKey] = []
        if ep.key_file is not None:
            path = Path(str(ep.key_file)).expanduser()
            try:
                keys.append(paramiko.PKey.from_path(path))
            except (OSError, paramiko.SSHException) as exc:
                raise RemoteError(self.name, f"cannot load SSH client key {path}: {exc}") from None
        else:
            keys.extend(paramiko.Agent().get_keys())
        for key in keys:
            try:
                transport.auth_publickey(ep.user, key)
            except paramiko.AuthenticationException:
                continue
            if transport.is_authenticated():
                return
        raise RemoteError(self.name, f"SSH public-key authentication as {ep.user} was refused")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    # ------------------------------------------------------------------ use
    def _require(self) -> paramiko.Transport:
        if self.transport is None or not self.transport.is_active():
            raise LinkClosed(self.name, "SSH connection is not open")
        return self.transport

    def open_session(self) -> paramiko.Channel:
        return self._require().open_session(timeout=self.timeout)

    def run(self, argv: Sequence[str] | str, *, check: bool = True, timeout: float = 300.0) -> CommandResult:
        """Run a command (argv is shell-quoted); raise RemoteError on non-zero exit when check."""
        command = argv if isinstance(argv, str) else shlex.join(argv)
        chan = self.open_session()
        chan.settimeout(timeout)
        try:
            chan.exec_command(command)
            stdout = chan.makefile("rb").read().decode(errors="replace")
            stderr = chan.makefile_stderr("rb").read().decode(errors="replace")
            status = chan.recv_exit_status()
        except TimeoutError:
            raise CommandTimedOut(self.name, f"command timed out after {timeout:.0f}s: {command}") from None
        finally:
            chan.close()
        if check and status != 0:
            raise RemoteError(self.name, f"command failed ({status}): {command}: {stderr.strip()[-500:]}")
        return CommandResult(status, stdout, stderr)

    def sftp(self) -> paramiko.SFTPClient:
        client = paramiko.SFTPClient.from_transport(self._require())
        if client is None:
            raise RemoteError(self.name, "could not open an SFTP session")
        return client


class PromptAcks(socket.socket):
    """A connected TCP socket whose reads are acknowledged at once (TCP_QUICKACK after every recv).

    sshd does not set TCP_NODELAY on a non-interactive session, so when it sends two small packets in a row
    (after authentication: a global request, then the confirmation of our first channel) Nagle holds the
    second until the first is acknowledged, and Linux delays that ACK by up to 40 ms. Opening the first
    channel took 44 ms instead of 2 (docs/lab-notes.md); real hosts behave the same. The kernel leaves
    quick-ACK mode on its own, so it is asked again after each read.
    """

    @classmethod
    def adopt(cls, sock: socket.socket) -> PromptAcks:
        timeout = sock.gettimeout()
        adopted = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        adopted.settimeout(timeout)
        return adopted

    def recv(self, size: int, flags: int = 0) -> bytes:
        data = super().recv(size, flags)
        if TCP_QUICKACK is not None:
            with contextlib.suppress(OSError):  # the socket just closed: only the speed-up is lost
                self.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
        return data


class OpensshCommand:
    """OpenSSH's ``ssh`` to the same endpoint with the same pinning, for bulk data (about 1.4x paramiko's rate
    here: its C transport costs the client far less CPU per byte; docs/lab-notes.md).

    The pinned key is the only key ssh may accept: it sits in a private known_hosts file under a fixed alias,
    no other known_hosts file or config is read, BatchMode forbids prompts, and the server is asked for the
    pinned key type only. Use as a context manager (the known_hosts file is removed afterwards).
    """

    def __init__(self, endpoint: SshEndpoint, *, timeout: float = 15.0):
        self.endpoint = endpoint
        self.timeout = timeout
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("ssh") is not None

    def __enter__(self) -> OpensshCommand:
        self._dir = tempfile.TemporaryDirectory(prefix="factory-ssh-")  # 0700
        pinned_type, pinned_b64 = self.endpoint.host_key.split()[:2]
        Path(self._dir.name, "known_hosts").write_text(f"pinned-host {pinned_type} {pinned_b64}\n")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def argv(self, remote_command: str) -> list[str]:
        assert self._dir is not None, "use OpensshCommand as a context manager"
        ep = self.endpoint
        pinned_type = ep.host_key.split()[0]
        opts = {
            "BatchMode": "yes", "StrictHostKeyChecking": "yes", "HostKeyAlias": "pinned-host",
            "UserKnownHostsFile": str(Path(self._dir.name, "known_hosts")), "GlobalKnownHostsFile": "/dev/null",
            "HostKeyAlgorithms": ",".join(_KEY_TYPES.get(pinned_type, [pinned_type])), "CheckHostIP": "no",
            "UpdateHostKeys": "no", "Ciphers": ",".join(FAST_CIPHERS), "ConnectTimeout": str(int(self.timeout)),
            "ServerAliveInterval": "15", "ServerAliveCountMax": "4", "ForwardAgent": "no", "ForwardX11": "no",
            "ClearAllForwardings": "yes", "LogLevel": "ERROR",
        }
        argv = ["ssh", "-F", "/dev/null", "-T", "-p", str(ep.port), "-l", ep.user]
        if ep.key_file is not None:
            argv += ["-i", str(Path(str(ep.key_file)).expanduser()), "-o", "IdentitiesOnly=yes"]
        for key, value in opts.items():
            argv += ["-o", f"{key}={value}"]
        return [*argv, "--", ep.host, remote_command]


def connect(name: str, endpoint: SshEndpoint, *, timeout: float = 15.0) -> SshLink:
    return SshLink(name, endpoint, timeout=timeout).connect()
