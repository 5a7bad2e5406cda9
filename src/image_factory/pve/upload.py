"""Transfer engines that put a build artifact into a hypervisor's import directory.

SSH (default, fastest; docs/lab-notes.md "SSH upload throughput"; bench/upload):
- data goes into ``.<file>.partial`` through OpenSSH's ``ssh`` (engine ``openssh``: the pinned host key
  only, aes128-gcm, the kernel moves the file into its stdin with sendfile, so memory use is constant
  and this process copies nothing), or where there is no ssh client through a paramiko exec channel
  (engine ``exec``: 1 MiB memoryview writes);
- the remote command takes an exclusive ``flock`` on the partial file *before* it reports the
  partial's size, so a writer left over from a dropped connection has finished before we resume
  and appends never interleave; we resume from exactly that size;
- a dropped connection reconnects and resumes, with a bounded number of attempts without progress;
- the host hashes the bytes as they arrive (tee(2)/splice(2) driven by perl, or its copying loop, into
  ``openssl dgst -sha256``, else ``sha256sum``; on a resume the partial's earlier part first) and compares
  with the manifest; only then is the partial renamed (``mv``, atomic in one directory) to the final name,
  so no file under the final name is ever incomplete or unverified;
- a final file that already has the right sha256 is not sent again.
Hashing is not done in the sending loop (it halves throughput): the local file is verified once
against the manifest before any host is contacted, and each host verifies what it received.

SFTP (fallback engine): pipelined writes into the same partial name, same resume/verify/rename.

API: ``POST /nodes/{node}/storage/{storage}/upload`` with ``content=import`` and PVE's own
sha256 check, streamed as multipart with a Content-Length through the client's verified session.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import paramiko

from image_factory.errors import FactoryError, RemoteError, TlsVerificationFailed
from image_factory.pve.sshlink import OpensshCommand, SshLink
from image_factory.reports import Report
from image_factory.site.inventory import SshEndpoint

if TYPE_CHECKING:  # the API engine's imports (requests, proxmoxer) stay out of an SSH upload's memory
    from requests_toolbelt import MultipartEncoderMonitor

    from image_factory.pve.client import PveClient

CHUNK = 1024 * 1024
SENDFILE_CHUNK = 8 * 1024 * 1024  # per progress tick
ENGINES = ("openssh", "exec", "sftp")
# What ssh's stderr says when no retry can help (its exit status is 255 for these and for a dropped link alike).
SSH_REFUSALS = {  # first match wins: a key ssh ignored also ends in "Permission denied"
    "Host key verification failed": "the host's key is not the one pinned in the inventory",
    "UNPROTECTED PRIVATE KEY FILE": "the client key file is readable by others (chmod 600 it)",
    "Permission denied": "the factory's key was refused",
    "Could not resolve hostname": "the SSH host name does not resolve",
}
SFTP_REQUEST = 261120  # OpenSSH sftp-server's largest write
PARTIAL_LOCK_WAIT = 60
DEFAULT_ATTEMPTS = 6
Progress = Callable[[int], None]  # called with the bytes the host has so far
LinkFactory = Callable[[], SshLink]
# Errors that mean "the connection went away": reconnect and resume.
LINK_ERRORS: tuple[type[Exception], ...] = (OSError, EOFError, paramiko.SSHException, socket.timeout)


class UploadError(RemoteError):
    pass


class UnknownTransport(FactoryError):
    """A transport name that is not one of TRANSPORT_KINDS (the caller's mistake, said before any host is contacted)."""


@dataclass(frozen=True)
class TransportKind:
    """How a transport's bytes land on a host: the facts preflight's space check and publish both rely on."""

    resumable: bool  # a partial file from an interrupted run is continued, not sent again
    staged: bool  # PVE stages the body in staging_dir first, then copies it (both copies exist at once)


TRANSPORT_KINDS = {
    "ssh": TransportKind(resumable=True, staged=False),  # this module's SshUploader
    "api": TransportKind(resumable=False, staged=True),  # upload_api: PVE's own upload call
}


def transport_kind(name: str) -> TransportKind:
    """The transport called ``name``, or a clear error naming the choices."""
    try:
        return TRANSPORT_KINDS[name]
    except KeyError:
        raise UnknownTransport(f"unknown transport {name!r} (choose {' or '.join(TRANSPORT_KINDS)})") from None


@dataclass
class UploadResult(Report):
    action: str  # "uploaded" | "skipped"
    bytes_sent: int = 0
    attempts: int = 0
    resumed_from: list[int] = field(default_factory=list)
    engine: str = "exec"
    seconds: float = 0.0


def partial_name(final: str) -> str:
    return f".{final}.partial"


def _q(path: str) -> str:
    return shlex.quote(path)


# ------------------------------------------------------------------------------ remote helpers


def remote_size(link: SshLink, path: str) -> int | None:
    res = link.run(f"stat -c %s -- {_q(path)}", check=False, timeout=60)
    if res.status != 0:
        return None
    try:
        return int(res.stdout.strip())
    except ValueError:
        raise UploadError(link.name, f"unexpected stat output for {path}: {res.stdout!r}") from None


def remote_sizes(link: SshLink, *paths: str) -> dict[str, int | None]:
    """Sizes of several files in one round trip (None: absent)."""
    script = "; ".join(f"stat -c %s -- {_q(p)} 2>/dev/null || echo -" for p in paths)
    res = link.run(script, check=False, timeout=60)
    values = res.stdout.split()
    if len(values) != len(paths):
        raise UploadError(link.name, f"unexpected stat output: {res.stdout!r} {res.stderr.strip()[-200:]}")
    return {p: (None if v == "-" else int(v)) for p, v in zip(paths, values, strict=True)}


def remote_probe(link: SshLink, directory: str, *names: str) -> tuple[list[str], dict[str, int | None]]:
    """One round trip: the directory's entries and the sizes of some of them (None: absent)."""
    qd = _q(directory)
    sizes = "; ".join(f"stat -c %s -- {qd}/{_q(n)} 2>/dev/null || echo -" for n in names)
    res = link.run(f"ls -1A -- {qd} || exit 3; echo @@@; {sizes}", check=False, timeout=60)
    if res.status != 0 or "@@@\n" not in res.stdout:
        raise UploadError(link.name, f"cannot list {directory}: {res.stderr.strip()[-300:]}")
    listing, _, tail = res.stdout.partition("@@@\n")
    values = tail.split()
    if len(values) != len(names):
        raise UploadError(link.name, f"unexpected stat output: {tail!r}")
    return ([n for n in listing.splitlines() if n],
            {n: (None if v == "-" else int(v)) for n, v in zip(names, values, strict=True)})


def remote_list(link: SshLink, directory: str) -> list[str]:
    """Names in a directory on the host (hidden ones included)."""
    res = link.run(f"ls -1A -- {_q(directory)}", check=False, timeout=60)
    if res.status != 0:
        raise UploadError(link.name, f"cannot list {directory}: {res.stderr.strip()[-300:]}")
    return [line for line in res.stdout.splitlines() if line]


def remote_sha256(link: SshLink, path: str, *, timeout: float = 1800) -> str | None:
    """sha256 of a file on the host (openssl is ~3.5x faster than sha256sum there); None if absent."""
    qp = _q(path)
    cmd = (
        f"test -f {qp} || exit 3; "
        f"if command -v openssl >/dev/null 2>&1; then openssl dgst -sha256 -r < {qp}; else sha256sum < {qp}; fi"
    )
    res = link.run(cmd, check=False, timeout=timeout)
    if res.status == 3:
        return None
    if res.status != 0:
        raise UploadError(link.name, f"cannot hash {path}: {res.stderr.strip()[-300:]}")
    digest = res.stdout.split()[0].lower() if res.stdout.split() else ""
    if len(digest) != 64:
        raise UploadError(link.name, f"unexpected hash output for {path}: {res.stdout[:200]!r}")
    return digest


def remote_remove(link: SshLink, *paths: str) -> None:
    if paths:
        link.run("rm -f -- " + " ".join(_q(p) for p in paths), check=False, timeout=60)


def final_has(link: SshLink, path: str, sha256: str, size: int) -> bool:
    """True when ``path`` exists on the host with exactly this content."""
    have = remote_size(link, path)
    if have != size:
        return False
    return remote_sha256(link, path) == sha256


# ------------------------------------------------------------------------------ SSH engine

# The tee between sshd, the partial and the hasher. Where both ends are pipes (sshd's session stdin is one on
# Linux) the kernel does it: tee(2) hands the hasher the bytes without consuming them and splice(2) moves them
# into the partial, so nothing is copied through this process (the copying loop cost the host about 0.2 of a
# core at 200 MB/s). splice refuses a file opened for appending, so it writes through a second descriptor
# positioned at the end; the lock on fd 8 still excludes every other writer. Where tee fails at once (stdin
# not a pipe), perl has no syscall.ph, or the first splice fails (a filesystem without splice support), a
# copying loop with large reads and 1 MiB pipes does it (bytes already teed to the hasher are only written
# to the partial); coreutils tee reads 8 KiB at a time through 64 KiB pipes, which made the verified upload
# slower than hashing after it (bench/upload). Perl is on every Debian host (perl-base is essential); a
# failed write stops it with the reason on stderr. 1031 is F_SETPIPE_SZ.
_TEE = (
    'fcntl(STDIN, 1031, 1 << 20); fcntl(STDOUT, 1031, 1 << 20); '
    'open(my $f, ">>&=", 8) or die "partial: $!\\n"; binmode STDIN; binmode STDOUT; my $b; '
    'sub put { my ($fh, $n) = @_; my $o = 0; while ($o < $n) { my $w = syswrite($fh, $b, $n - $o, $o); '
    'die "write: $!\\n" unless defined $w; $o += $w } } '
    'my ($tee, $splice) = eval { require "syscall.ph"; (&SYS_tee, &SYS_splice) }; '
    'my ($w, $moved) = (undef, 0); '
    'if (defined $tee && open($w, "+<", "/proc/self/fd/8") && defined sysseek($w, 0, 2)) { while (1) { '
    'my $n = syscall($tee, 0, 1, 1 << 20, 0); '
    'if ($n < 0) { die "tee: $!\\n" if $moved; last } exit 0 if $n == 0; '
    'while ($n > 0) { my $m = syscall($splice, 0, 0, fileno($w), 0, $n, 0); '
    'if ($m > 0) { $n -= $m; $moved += $m; next } die "write: $!\\n" if $moved; '
    'while ($n > 0) { my $r = sysread(STDIN, $b, $n); die "read: $!\\n" unless $r; put($f, $r); $n -= $r } } '
    'last unless $moved } } '
    'while (1) { my $n = sysread(STDIN, $b, 4 << 20); die "read: $!\\n" unless defined $n; last unless $n; '
    'put($f, $n); put(\\*STDOUT, $n) }'
)


def receive_script(part_path: str, final_path: str, size: int, sha256: str) -> str:
    """The host's side of one upload attempt, one shell command (each exec costs a round trip and a session).

    Lock the partial (a writer left from a dropped connection finishes first), empty it if it is longer than
    the artifact (it cannot be a prefix of it), report its size, append
    stdin, and rename only when size and sha256 match. The hash is computed while the bytes arrive (after
    the partial's earlier part, read back from disk, on a resume), so verifying costs no pass over the file
    after the transfer. A failed write leaves the partial short: exit 4 (the caller reads stderr for why).
    """
    qp, qf = _q(part_path), _q(final_path)
    return (
        f"exec 8>>{qp} || exit 2; flock -w {PARTIAL_LOCK_WAIT} 8 || exit 1; "
        f"off=$(stat -c %s -- {qp}) || exit 2; "
        f'if [ "$off" -gt {size} ]; then : > {qp} || exit 2; off=0; fi; '  # not this artifact's: start over
        'echo "$off"; '
        "if command -v openssl >/dev/null 2>&1; then hasher='openssl dgst -sha256 -r'; else hasher=sha256sum; fi; "
        "if command -v perl >/dev/null 2>&1; then "
        f"h=$({{ head -c \"$off\" < {qp} && perl -e {_q(_TEE)}; }} | $hasher); "
        f"else cat >&8 || exit 4; h=$($hasher < {qp}); fi; "  # no perl: hash after the transfer
        f"h=${{h%% *}}; sz=$(stat -c %s -- {qp}); "
        f'[ "$sz" -ge {size} ] || exit 4; '
        f'if [ "$sz" = {size} ] && [ "$h" = {_q(sha256)} ]; then mv -f -- {qp} {qf} || exit 5; '
        f'echo "OK $sz $h"; else echo "BAD $sz $h"; fi'
    )



class SshUploader:
    """Resumable, verified upload of one file to one host's import directory over SSH."""

    def __init__(
        self, name: str, connect: LinkFactory, *, engine: str = "auto", attempts: int = DEFAULT_ATTEMPTS,
        chunk: int = CHUNK, channel_timeout: float = 120.0, shared: SshLink | None = None,
        endpoint: SshEndpoint | None = None,
    ):
        """``shared``: an open link to use first (never closed here; after a failure we reconnect on our own).
        ``engine``: openssh, exec, sftp, or auto (openssh where the ssh binary exists, else exec).
        ``endpoint``: where ``connect`` connects to (the openssh engine needs it; else read from a link)."""
        if engine == "auto":
            engine = "openssh" if OpensshCommand.available() else "exec"
        if engine not in ENGINES:
            raise ValueError(f"unknown SSH engine {engine!r} ({', '.join(ENGINES)} or auto)")
        self._endpoint_given = endpoint
        self.name = name
        self._connect = connect
        self.engine = engine
        self.attempts = attempts
        self.chunk = chunk
        self.channel_timeout = channel_timeout
        self._link: SshLink | None = shared
        self._shared = shared
        self.bytes_sent = 0

    # connection -----------------------------------------------------------------------------
    def link(self) -> SshLink:
        if self._link is None or self._link.transport is None or not self._link.transport.is_active():
            self.close()
            self._link = self._connect()
        return self._link

    def close(self) -> None:
        if self._link is not None:
            if self._link is not self._shared:
                self._link.close()
            self._link = None

    # the whole job ----------------------------------------------------------------------------
    def upload(
        self, local: Path, remote_dir: str, final: str, sha256: str, *, progress: Progress | None = None,
        check_final: bool = True,
    ) -> UploadResult:
        started = time.monotonic()
        size = local.stat().st_size
        final_path = f"{remote_dir}/{final}"
        part_path = f"{remote_dir}/{partial_name(final)}"
        result = UploadResult("uploaded", engine=self.engine)
        self.bytes_sent = 0
        if check_final and self._retry(lambda: final_has(self.link(), final_path, sha256, size)):
            result.action = "skipped"
            result.seconds = time.monotonic() - started
            return result
        try:
            renamed = self._send_verified(local, size, part_path, final_path, sha256, result, progress)
            if not renamed:
                self._retry(lambda: self.link().run(["mv", "-f", "--", part_path, final_path], timeout=120))
        except BaseException:
            # Nothing half-made under any name: the partial goes (the final name was never touched).
            with contextlib.suppress(Exception):  # best effort; the original error matters
                remote_remove(self.link(), part_path)
            raise
        finally:
            result.bytes_sent = self.bytes_sent
            result.seconds = time.monotonic() - started
        return result

    def _retry(self, fn: Callable[[], Any]) -> Any:
        last: BaseException | None = None
        for _ in range(self.attempts):
            try:
                return fn()
            except LINK_ERRORS as exc:
                last = exc
                self.close()
            except RemoteError as exc:
                if "SSH connection is not open" not in str(exc) and "timed out" not in str(exc):
                    raise
                last = exc
                self.close()
        raise UploadError(self.name, f"SSH connection kept failing ({self.attempts} attempts): {last}")

    def _send_verified(
        self, local: Path, size: int, part_path: str, final_path: str, sha256: str, result: UploadResult,
        progress: Progress | None,
    ) -> bool:
        """Send until the host holds the whole file with the right sha256; True if already renamed."""
        failures_without_progress = 0
        restarts_for_hash = 0
        while True:
            result.attempts += 1
            before = self.bytes_sent
            try:
                have, got, renamed = self._send_once(local, size, part_path, final_path, sha256, result, progress)
            except RETRYABLE as exc:
                self.close()
                failures_without_progress = 0 if self.bytes_sent > before else failures_without_progress + 1
                if failures_without_progress >= self.attempts or result.attempts >= self.attempts * 8:
                    raise UploadError(
                        self.name, f"upload of {local.name} failed after {result.attempts} attempts: {exc}"
                    ) from None
                time.sleep(min(0.2 * failures_without_progress, 2.0))
                continue
            if have != size:
                raise UploadError(self.name, f"{part_path} has {have} bytes after the upload, expected {size}")
            if got is None:
                got = self._retry(lambda: remote_sha256(self.link(), part_path))
            if got == sha256:
                return renamed
            restarts_for_hash += 1
            self._retry(lambda: remote_remove(self.link(), part_path))
            if restarts_for_hash >= 2:
                raise UploadError(
                    self.name, f"{part_path}: sha256 on the host is {got}, expected {sha256} (after a fresh upload)"
                )

    # one attempt ------------------------------------------------------------------------------
    def _send_once(
        self, local: Path, size: int, part_path: str, final_path: str, sha256: str, result: UploadResult,
        progress: Progress | None,
    ) -> tuple[int, str | None, bool]:
        """One connection's worth: returns (size on the host, its sha256 or None, renamed)."""
        if self.engine == "sftp":
            return self._send_sftp(local, size, part_path, result, progress), None, False
        if self.engine == "openssh":
            return self._send_openssh(local, size, part_path, final_path, sha256, result, progress)
        link = self.link()
        script = receive_script(part_path, final_path, size, sha256)
        chan = link.open_session()
        chan.settimeout(self.channel_timeout)
        try:
            chan.exec_command(f"sh -c {_q(script)}")
            offset = _read_line_int(chan)
            if offset is None:
                status = chan.recv_exit_status()
                self._raise_for_no_offset(status, chan.makefile_stderr("rb").read().decode(errors="replace").strip(),
                                          part_path)
            done = self._resume_from(offset, size, part_path, result, progress, stop=chan.close)
            buf = bytearray(self.chunk)
            view = memoryview(buf)
            with local.open("rb", buffering=0) as fh:
                fh.seek(offset)
                while True:
                    n = fh.readinto(buf)
                    if not n:
                        break
                    try:
                        chan.sendall(view[:n])  # type: ignore[arg-type]  # memoryview: no copy
                    except RETRYABLE:
                        self._raise_if_disk_full(link, chan, part_path, size - done)
                        raise
                    self.bytes_sent += n
                    done += n
                    if progress:
                        progress(done)
            chan.shutdown_write()
            chan.settimeout(max(self.channel_timeout, 60 + size / 50e6))  # the host's hasher drains its pipe
            out = chan.makefile("rb").read().decode(errors="replace").split()
            status = chan.recv_exit_status()
            if status != 0 or len(out) != 3:
                self._raise_if_disk_full(link, chan, part_path, size - done)
                err = chan.makefile_stderr("rb").read().decode(errors="replace").strip()
                raise _LinkLost(f"remote writer ended with status {status}: {err[-200:]}")
        finally:
            chan.close()
        verdict, have, got = out
        return int(have), got.lower(), verdict == "OK"

    def _raise_if_disk_full(self, link: SshLink, chan: paramiko.Channel, part_path: str, missing: int) -> None:
        """The host's writer died: a full filesystem is final (no retry can fix it), so say so at once."""
        if not chan.exit_status_ready():
            time.sleep(0.2)  # the writer's exit status trails its closed stdin by a moment
        if not chan.exit_status_ready():
            return
        self._raise_if_full(chan.makefile_stderr("rb").read().decode(errors="replace"), part_path, missing)

    def _raise_if_full(self, stderr: str, part_path: str, missing: int) -> None:
        if "No space left on device" not in stderr and "Disk quota exceeded" not in stderr:
            return
        directory = part_path.rsplit("/", 1)[0] or "/"
        try:
            df = self.link().run(["df", "-Pk", "--", directory], check=False, timeout=30).stdout.splitlines()
            free = f"{int(df[-1].split()[3]) * 1024 / 2**20:.0f} MiB free"
        except Exception:  # the message matters more than the figure
            free = "free space unknown"
        raise UploadError(self.name, f"No space left on device writing {part_path} ({free} on the filesystem of "
                                     f"{directory}, {missing / 2**20:.0f} MiB still to send); free space there and "
                                     "re-run: the upload resumes")

    def _send_openssh(
        self, local: Path, size: int, part_path: str, final_path: str, sha256: str, result: UploadResult,
        progress: Progress | None,
    ) -> tuple[int, str | None, bool]:
        """The same attempt as the exec engine, with OpenSSH's ssh carrying the bytes: the kernel moves them
        from the file into ssh's stdin (sendfile), so this process copies nothing and stays small."""
        script = receive_script(part_path, final_path, size, sha256)
        with OpensshCommand(self._endpoint()) as ssh, local.open("rb") as fh:
            proc = subprocess.Popen(ssh.argv(f"sh -c {_q(script)}"), stdin=subprocess.PIPE,  # noqa: S603
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
                    self._raise_for_no_offset(status, proc.stderr.read().decode(errors="replace").strip(), part_path)
                done = self._resume_from(int(first), size, part_path, result, progress, stop=proc.kill)
                try:
                    while done < size:
                        n = os.sendfile(proc.stdin.fileno(), fh.fileno(), done, min(SENDFILE_CHUNK, size - done))
                        if n == 0:
                            raise UploadError(self.name, f"{local} shrank while it was being sent")
                        self.bytes_sent += n
                        done += n
                        if progress:
                            progress(done)
                    proc.stdin.close()
                except BrokenPipeError:
                    pass  # the host's side ended early: its exit status and stderr say why
                out = proc.stdout.read().decode(errors="replace").split()
                status = proc.wait(timeout=self.channel_timeout)
                err = proc.stderr.read().decode(errors="replace").strip()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if status != 0 or len(out) != 3:
            self._raise_if_full(err, part_path, size - done)
            if status == 255:
                self._raise_for_no_offset(status, err, part_path)
            raise _LinkLost(f"remote writer ended with status {status}: {err[-200:]}")
        verdict, have, got = out
        return int(have), got.lower(), verdict == "OK"

    def _resume_from(self, offset: int, size: int, part_path: str, result: UploadResult, progress: Progress | None,
                     *, stop: Callable[[], None]) -> int:
        """Where this attempt starts: the partial's size on the host (its script empties a longer one)."""
        if offset > size:
            stop()
            raise UploadError(self.name, f"the host reported {offset} bytes of {part_path}, more than the "
                                         f"artifact's {size}, although its script empties such a partial")
        if offset:
            result.resumed_from.append(offset)
        if progress:
            progress(offset)
        return offset

    def _raise_for_no_offset(self, status: int, err: str, part_path: str) -> NoReturn:
        """Why the host's side did not even report the partial's size."""
        if status == 1 and not err:
            raise _LinkLost("the partial file is still locked by an earlier writer")
        if status == 255:
            permanent = next((why for sign, why in SSH_REFUSALS.items() if sign in err), None)
            if permanent:  # no retry can change these
                raise UploadError(self.name, f"ssh: {permanent}: {err[-300:]}")
            raise _LinkLost(f"ssh failed: {err[-300:]}")
        raise UploadError(self.name, f"cannot write {part_path} (exit {status}): {err[-300:]}")

    def _endpoint(self) -> SshEndpoint:
        return self._endpoint_given or self.link().endpoint

    def _send_sftp(
        self, local: Path, size: int, part_path: str, result: UploadResult, progress: Progress | None
    ) -> int:
        link = self.link()
        sftp = link.sftp()
        try:
            try:
                offset = sftp.stat(part_path).st_size or 0
            except FileNotFoundError:
                offset = 0
            if offset > size:
                sftp.remove(part_path)
                offset = 0
            if offset:
                result.resumed_from.append(offset)
            with sftp.open(part_path, "ab") as remote, local.open("rb", buffering=0) as fh:
                remote.set_pipelined(True)
                remote.MAX_REQUEST_SIZE = SFTP_REQUEST
                fh.seek(offset)
                done = offset
                buf = bytearray(SFTP_REQUEST)
                view = memoryview(buf)
                while True:
                    n = fh.readinto(buf)
                    if not n:
                        break
                    remote.write(bytes(view[:n]))
                    self.bytes_sent += n
                    done += n
                    if progress:
                        progress(done)
            return int(sftp.stat(part_path).st_size or 0)
        finally:
            sftp.close()


class _LinkLost(Exception):
    """An attempt ended in a way that warrants reconnecting and resuming."""


RETRYABLE: tuple[type[Exception], ...] = (*LINK_ERRORS, _LinkLost)


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


# ------------------------------------------------------------------------------ API engine


def upload_api(
    client: PveClient, storage: str, final: str, local: Path, sha256: str, *,
    progress: Progress | None = None, timeout: float = 3600.0,
) -> UploadResult:
    """Stream the file to PVE's upload endpoint (content=import); PVE verifies the sha256 itself."""
    import requests
    from requests_toolbelt import MultipartEncoder, MultipartEncoderMonitor

    from image_factory.pve.client import ApiError

    started = time.monotonic()
    url, call = client.upload_endpoint(storage)
    sent = 0
    size = local.stat().st_size
    with local.open("rb") as fh:
        encoder = MultipartEncoder(
            fields=[
                ("content", "import"),
                ("checksum-algorithm", "sha256"),
                ("checksum", sha256),
                ("filename", (final, fh, "application/octet-stream")),
            ]
        )
        last = 0

        def tick(mon: MultipartEncoderMonitor) -> None:
            nonlocal last
            last = mon.bytes_read
            if progress:
                progress(min(last, size))

        monitor = MultipartEncoderMonitor(encoder, tick)
        try:
            # Bypass ProxmoxHttpSession.request (it would re-wrap the body); the session keeps the
            # token auth and our verified-TLS adapter.
            resp = requests.Session.request(
                client.session, "POST", url, data=monitor,
                headers={"Content-Type": monitor.content_type, "Content-Length": str(monitor.len)},
                timeout=(30, timeout),
            )
        except requests.exceptions.SSLError as exc:
            raise TlsVerificationFailed(client.name, f"TLS verification of {client.api_url} failed: {exc}") from None
        except requests.exceptions.RequestException as exc:
            raise UploadError(client.name, f"{call}: {exc}") from None
        sent = last
    if resp.status_code != 200:
        try:
            body = resp.json()
            message = str(body.get("message") or resp.reason).strip()
            if body.get("errors"):
                message += " " + "; ".join(f"{k}: {v}" for k, v in sorted(body["errors"].items()))
        except ValueError:
            message = resp.reason or resp.text[:300]
        raise ApiError(client.name, call, resp.status_code, message)
    upid = resp.json().get("data")
    result = UploadResult("uploaded", bytes_sent=sent, attempts=1, engine="api")
    if isinstance(upid, str) and upid.startswith("UPID:"):
        client.wait_task(upid, timeout=timeout)
    result.seconds = time.monotonic() - started
    return result
