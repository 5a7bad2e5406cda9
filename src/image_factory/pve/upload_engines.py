"""The SSH upload engines: one attempt each at putting a file's missing tail into a host's partial file.

Every engine is an ``UploadEngine`` chosen by name from ``ENGINE_TYPES``; the uploader (upload.py) repeats
attempts, verifies and renames. An attempt ends in an ``Attempt`` (what the host holds) or in an exception whose
type says what to do: ``LinkLost`` (and the link errors in ``RECONNECT``) reconnect and resume; an
``UploadError`` (``HostRefused``, ``DiskFull``, ``HostScriptFailed``) is final. What a host or ssh said in
words is read once, here, into one of these types (``SSH_REFUSALS``, ``HOST_WRITE_FAILURES``).

- ``openssh``: OpenSSH's ``ssh`` carries the bytes (the pinned host key only, aes128-gcm); the kernel moves
  the file into its stdin with sendfile, so memory use is constant and this process copies nothing.
- ``exec``: a paramiko exec channel, 1 MiB memoryview writes (where there is no ssh client).
  Both run the host script (upload_host.sh), which locks, resumes, hashes while receiving and renames.
- ``sftp``: pipelined SFTP writes into the same partial; the uploader hashes and renames afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import IO, ClassVar, Protocol

import paramiko

from image_factory.pve.sshlink import CommandTimedOut, LinkClosed, OpensshCommand, SshLink
from image_factory.pve.upload_remote import UploadError, free_space
from image_factory.site.inventory import SshEndpoint

CHUNK = 1024 * 1024
SENDFILE_CHUNK = 8 * 1024 * 1024  # per progress tick
SFTP_REQUEST = 261120  # OpenSSH sftp-server's largest write
PARTIAL_LOCK_WAIT = 60
HOST_SCRIPT = "upload_host.sh"
Progress = Callable[[int], None]  # called with the bytes the host has so far
# What ssh's stderr says when no retry can help (its exit status is 255 for these and for a dropped link alike).
SSH_REFUSALS = {  # first match wins: a key ssh ignored also ends in "Permission denied"
    "Host key verification failed": "the host's key is not the one pinned in the inventory",
    "UNPROTECTED PRIVATE KEY FILE": "the client key file is readable by others (chmod 600 it)",
    "Permission denied": "the factory's key was refused",
    "Could not resolve hostname": "the SSH host name does not resolve",
}
# What the host's writer says when its filesystem is full: final, no retry can fix it.
HOST_WRITE_FAILURES = ("No space left on device", "Disk quota exceeded")


# ------------------------------------------------------------------------------ what an attempt can end in


class LinkLost(Exception):
    """An attempt ended in a way that warrants reconnecting and resuming."""


class PartialBusy(LinkLost):
    """The partial file is still locked by a writer from an earlier, dropped connection."""


class HostRefused(UploadError):
    """ssh refused in a way no retry can change (host key, client key, name)."""


class DiskFull(UploadError):
    """The host's filesystem is full: free space there and re-run (the upload resumes)."""


class HostScriptFailed(UploadError):
    """The host's side could not open, lock or rename the partial file."""


class ChecksumMismatch(UploadError):
    """The host holds the whole file, but its sha256 is wrong even after a fresh upload."""


# The connection went away: reconnect and resume.
LINK_ERRORS: tuple[type[Exception], ...] = (OSError, EOFError, paramiko.SSHException, socket.timeout)
RETRYABLE: tuple[type[Exception], ...] = (*LINK_ERRORS, LinkLost)
# A command on the control link failed because the link did: reconnect and run it again.
RECONNECT: tuple[type[Exception], ...] = (*LINK_ERRORS, LinkClosed, CommandTimedOut)


# ------------------------------------------------------------------------------ one upload, one attempt


class Connection(Protocol):
    """Where an engine sends: a host's name, its control link (reopened when it dropped) and its endpoint."""

    name: str

    def link(self) -> SshLink: ...

    def endpoint(self) -> SshEndpoint: ...


@dataclass
class Transfer:
    """One upload as its attempts share it: what goes where, and what the attempts have done so far."""

    host: str
    local: Path
    size: int
    part_path: str
    final_path: str
    sha256: str
    progress: Progress | None = None
    sent: int = 0  # bytes put on the wire, over all attempts
    resumed_from: list[int] = field(default_factory=list)

    def resume_at(self, offset: int) -> int:
        """Where an attempt starts: the partial's size on the host (its script empties a longer one)."""
        if offset > self.size:
            raise UploadError(self.host, f"the host reported {offset} bytes of {self.part_path}, more than the "
                                         f"artifact's {self.size}, although its script empties such a partial")
        if offset:
            self.resumed_from.append(offset)
        if self.progress:
            self.progress(offset)
        return offset

    def moved(self, n: int, done: int) -> None:
        self.sent += n
        if self.progress:
            self.progress(done)


@dataclass(frozen=True)
class Attempt:
    """What the host holds after an attempt: the partial's size, its sha256 if the host hashed it, renamed?"""

    size: int
    sha256: str | None = None
    renamed: bool = False

    @classmethod
    def from_host(cls, out: list[str]) -> Attempt:
        verdict, have, got = out
        return cls(int(have), got.lower(), verdict == "OK")


class UploadEngine(ABC):
    """One way of carrying the bytes; ``attempt`` sends what the host lacks over one connection."""

    name: ClassVar[str]

    def __init__(self, *, chunk: int = CHUNK, channel_timeout: float = 120.0):
        self.chunk = chunk
        self.channel_timeout = channel_timeout

    @staticmethod
    def available() -> bool:
        return True

    @abstractmethod
    def attempt(self, conn: Connection, job: Transfer) -> Attempt: ...


# ------------------------------------------------------------------------------ the host's side


@cache
def host_script() -> str:
    return resources.files(__package__).joinpath(HOST_SCRIPT).read_text()


def receive_script(part_path: str, final_path: str, size: int, sha256: str) -> str:
    """The command the host runs for one attempt: upload_host.sh with its arguments, for the login shell."""
    return shlex.join(["sh", "-c", host_script(), "factory-upload", part_path, final_path, str(size), sha256,
                       str(PARTIAL_LOCK_WAIT)])


def no_offset_failure(host: str, status: int, err: str, part_path: str) -> Exception:
    """Why the host's side did not even report the partial's size, as the type that says what to do."""
    if status == 1 and not err:
        return PartialBusy("the partial file is still locked by an earlier writer")
    if status == 255:
        refusal = next((why for sign, why in SSH_REFUSALS.items() if sign in err), None)
        if refusal:  # no retry can change these
            return HostRefused(host, f"ssh: {refusal}: {err[-300:]}")
        return LinkLost(f"ssh failed: {err[-300:]}")
    return HostScriptFailed(host, f"cannot write {part_path} (exit {status}): {err[-300:]}")


def raise_if_disk_full(conn: Connection, stderr: str, part_path: str, missing: int) -> None:
    """The host's writer died: a full filesystem is final, so say so at once (with the free space there)."""
    if not any(sign in stderr for sign in HOST_WRITE_FAILURES):
        return
    directory = part_path.rsplit("/", 1)[0] or "/"
    raise DiskFull(conn.name, f"No space left on device writing {part_path} ({free_space(conn.link, directory)} "
                              f"on the filesystem of {directory}, {missing / 2**20:.0f} MiB still to send); "
                              "free space there and re-run: the upload resumes")


# ------------------------------------------------------------------------------ the engines


class OpensshEngine(UploadEngine):
    """OpenSSH's ssh carries the bytes: the kernel moves them from the file into ssh's stdin (sendfile), so
    this process copies nothing and stays small."""

    name = "openssh"

    @staticmethod
    def available() -> bool:
        return OpensshCommand.available()

    def attempt(self, conn: Connection, job: Transfer) -> Attempt:
        command = receive_script(job.part_path, job.final_path, job.size, job.sha256)
        with OpensshCommand(conn.endpoint()) as ssh, job.local.open("rb") as fh:
            proc = subprocess.Popen(ssh.argv(command), stdin=subprocess.PIPE,  # noqa: S603
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
            with contextlib.suppress(OSError):  # ssh reads sooner from a fuller pipe; 64 KiB is the fallback
                fcntl.fcntl(proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
            done = 0
            try:
                first = proc.stdout.readline()
                if not first.strip().isdigit():
                    proc.stdin.close()
                    status = proc.wait(timeout=self.channel_timeout)
                    raise no_offset_failure(conn.name, status, _text(proc.stderr), job.part_path)
                done = self._send(proc, fh, job, job.resume_at(int(first)))
                out = proc.stdout.read().decode(errors="replace").split()
                status = proc.wait(timeout=self.channel_timeout)
                err = _text(proc.stderr)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if status != 0 or len(out) != 3:
            raise_if_disk_full(conn, err, job.part_path, job.size - done)
            if status == 255:
                raise no_offset_failure(conn.name, status, err, job.part_path)
            raise LinkLost(f"remote writer ended with status {status}: {err[-200:]}")
        return Attempt.from_host(out)

    @staticmethod
    def _send(proc: subprocess.Popen[bytes], fh: IO[bytes], job: Transfer, done: int) -> int:
        """sendfile from ``done`` to the end; returns how far it got (the host's side may end early)."""
        assert proc.stdin is not None
        try:
            while done < job.size:
                n = os.sendfile(proc.stdin.fileno(), fh.fileno(), done, min(SENDFILE_CHUNK, job.size - done))
                if n == 0:
                    raise UploadError(job.host, f"{job.local} shrank while it was being sent")
                done += n
                job.moved(n, done)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the host's side ended early: its exit status and stderr say why
        return done


class ExecEngine(UploadEngine):
    """The same attempt as openssh's, over a paramiko exec channel (where there is no ssh client)."""

    name = "exec"

    def attempt(self, conn: Connection, job: Transfer) -> Attempt:
        link = conn.link()
        chan = link.open_session()
        chan.settimeout(self.channel_timeout)
        try:
            chan.exec_command(receive_script(job.part_path, job.final_path, job.size, job.sha256))
            offset = _read_line_int(chan)
            if offset is None:
                status = chan.recv_exit_status()
                raise no_offset_failure(conn.name, status, _text(chan.makefile_stderr("rb")), job.part_path)
            done = self._send(conn, chan, job, job.resume_at(offset))
            chan.shutdown_write()
            chan.settimeout(max(self.channel_timeout, 60 + job.size / 50e6))  # the host's hasher drains its pipe
            out = chan.makefile("rb").read().decode(errors="replace").split()
            status = chan.recv_exit_status()
            if status != 0 or len(out) != 3:
                self._raise_if_disk_full(conn, chan, job, done)
                raise LinkLost(f"remote writer ended with status {status}: {_text(chan.makefile_stderr('rb'))[-200:]}")
        finally:
            chan.close()
        return Attempt.from_host(out)

    def _send(self, conn: Connection, chan: paramiko.Channel, job: Transfer, done: int) -> int:
        buf = bytearray(self.chunk)
        view = memoryview(buf)
        with job.local.open("rb", buffering=0) as fh:
            fh.seek(done)
            while n := fh.readinto(buf):
                try:
                    chan.sendall(view[:n])  # type: ignore[arg-type]  # memoryview: no copy
                except RETRYABLE:
                    self._raise_if_disk_full(conn, chan, job, done)
                    raise
                done += n
                job.moved(n, done)
        return done

    @staticmethod
    def _raise_if_disk_full(conn: Connection, chan: paramiko.Channel, job: Transfer, done: int) -> None:
        """The host's writer died: read why, if it has said so yet."""
        if not chan.exit_status_ready():
            time.sleep(0.2)  # the writer's exit status trails its closed stdin by a moment
        if chan.exit_status_ready():
            raise_if_disk_full(conn, _text(chan.makefile_stderr("rb")), job.part_path, job.size - done)


class SftpEngine(UploadEngine):
    """Pipelined SFTP writes into the same partial name (the fallback); the uploader hashes on the host after."""

    name = "sftp"

    def attempt(self, conn: Connection, job: Transfer) -> Attempt:
        sftp = conn.link().sftp()
        try:
            try:
                offset = sftp.stat(job.part_path).st_size or 0
            except FileNotFoundError:
                offset = 0
            if offset > job.size:
                sftp.remove(job.part_path)
                offset = 0
            if offset:
                job.resumed_from.append(offset)
            with sftp.open(job.part_path, "ab") as remote, job.local.open("rb", buffering=0) as fh:
                remote.set_pipelined(True)
                remote.MAX_REQUEST_SIZE = SFTP_REQUEST
                fh.seek(offset)
                done = offset
                buf = bytearray(SFTP_REQUEST)
                view = memoryview(buf)
                while n := fh.readinto(buf):
                    remote.write(bytes(view[:n]))
                    done += n
                    job.moved(n, done)
            return Attempt(int(sftp.stat(job.part_path).st_size or 0))
        finally:
            sftp.close()


ENGINE_TYPES: dict[str, type[UploadEngine]] = {e.name: e for e in (OpensshEngine, ExecEngine, SftpEngine)}
ENGINES = tuple(ENGINE_TYPES)
AUTO_ORDER = ("openssh", "exec")  # "auto": the first of these this machine can run


def engine_named(name: str, *, chunk: int = CHUNK, channel_timeout: float = 120.0) -> UploadEngine:
    """The engine called ``name`` (or ``auto``), or a ValueError naming the choices."""
    if name == "auto":
        name = next(n for n in AUTO_ORDER if ENGINE_TYPES[n].available())
    try:
        engine_type = ENGINE_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown SSH engine {name!r} ({', '.join(ENGINES)} or auto)") from None
    return engine_type(chunk=chunk, channel_timeout=channel_timeout)


class _Readable(Protocol):
    def read(self) -> bytes: ...


def _text(stream: _Readable) -> str:
    return stream.read().decode(errors="replace").strip()


def _read_line_int(chan: paramiko.Channel) -> int | None:
    data = b""
    while not data.endswith(b"\n"):
        piece = chan.recv(64)
        if not piece:
            return None
        data += piece
        if len(data) > 64:
            return None
    try:
        return int(data.strip())
    except ValueError:
        return None
