"""Transfer engines that put a build artifact into a hypervisor's import directory.

SSH (default, fastest; docs/lab-notes.md "SSH upload throughput"; bench/upload): ``SshUploader`` here repeats,
verifies and renames; the engines that carry the bytes are in upload_engines.py, the host's side of an attempt
is upload_host.sh, the remote file helpers are in upload_remote.py.
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

API (apiupload.py): ``POST /nodes/{node}/storage/{storage}/upload`` with ``content=import`` and PVE's own
sha256 check, streamed as multipart with a Content-Length through the client's verified session.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from image_factory.errors import FactoryError
from image_factory.pve.sshlink import SshLink
from image_factory.pve.upload_engines import (
    CHUNK,
    ENGINES,
    RECONNECT,
    RETRYABLE,
    Attempt,
    ChecksumMismatch,
    Progress,
    Transfer,
    engine_named,
    receive_script,
)
from image_factory.pve.upload_remote import (
    UploadError,
    final_has,
    partial_name,
    remote_list,
    remote_probe,
    remote_remove,
    remote_sha256,
    remote_size,
    remote_sizes,
)
from image_factory.reports import Report
from image_factory.site.inventory import SshEndpoint

if TYPE_CHECKING:
    from image_factory.pve.client import PveClient

__all__ = [
    "CHUNK", "DEFAULT_ATTEMPTS", "ENGINES", "TRANSPORT_KINDS", "SshUploader", "TransportKind", "UnknownTransport",
    "UploadError", "UploadResult", "final_has", "partial_name", "receive_script", "remote_list", "remote_probe",
    "remote_remove", "remote_sha256", "remote_size", "remote_sizes", "transport_kind", "upload_api",
]

DEFAULT_ATTEMPTS = 6
LinkFactory = Callable[[], SshLink]
T = TypeVar("T")


class UnknownTransport(FactoryError):
    """A transport name that is not one of TRANSPORT_KINDS (the caller's mistake, said before any host is contacted)."""


@dataclass(frozen=True)
class TransportKind:
    """How a transport's bytes land on a host: the facts preflight's space check and publish both rely on."""

    resumable: bool  # a partial file from an interrupted run is continued, not sent again
    staged: bool  # PVE stages the body in staging_dir first, then copies it (both copies exist at once)
    rebuilds_delta: bool = False  # can run the host's steps of a delta publish (upload_delta_host.sh)


TRANSPORT_KINDS = {
    "ssh": TransportKind(resumable=True, staged=False, rebuilds_delta=True),  # this module's SshUploader
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
        self._carrier = engine_named(engine, chunk=chunk, channel_timeout=channel_timeout)
        self.engine = self._carrier.name
        self._endpoint_given = endpoint
        self.name = name
        self._connect = connect
        self.attempts = attempts
        self._link: SshLink | None = shared
        self._shared = shared
        self.bytes_sent = 0

    # connection (upload_engines.Connection) -------------------------------------------------
    def link(self) -> SshLink:
        if self._link is None or self._link.transport is None or not self._link.transport.is_active():
            self.close()
            self._link = self._connect()
        return self._link

    def endpoint(self) -> SshEndpoint:
        return self._endpoint_given or self.link().endpoint

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
        job = Transfer(self.name, local, local.stat().st_size, f"{remote_dir}/{partial_name(final)}",
                       f"{remote_dir}/{final}", sha256, progress)
        result = UploadResult("uploaded", engine=self.engine, resumed_from=job.resumed_from)
        self.bytes_sent = 0
        if check_final and self._retry(lambda: final_has(self.link(), job.final_path, sha256, job.size)):
            result.action = "skipped"
            result.seconds = time.monotonic() - started
            return result
        try:
            if not self._send_verified(job, result):
                self._retry(lambda: self.link().run(["mv", "-f", "--", job.part_path, job.final_path], timeout=120))
        except BaseException:
            # Nothing half-made under any name: the partial goes (the final name was never touched).
            with contextlib.suppress(Exception):  # best effort; the original error matters
                remote_remove(self.link(), job.part_path)
            raise
        finally:
            result.bytes_sent = self.bytes_sent = job.sent
            result.seconds = time.monotonic() - started
        return result

    def _retry(self, fn: Callable[[], T]) -> T:
        """A command on the control link, run again on a fresh link when the link failed under it."""
        last: Exception | None = None
        for _ in range(self.attempts):
            try:
                return fn()
            except RECONNECT as exc:
                last = exc
                self.close()
        raise UploadError(self.name, f"SSH connection kept failing ({self.attempts} attempts): {last}")

    def _send_verified(self, job: Transfer, result: UploadResult) -> bool:
        """Send until the host holds the whole file with the right sha256; True if already renamed."""
        failures_without_progress = 0
        restarts_for_hash = 0
        while True:
            result.attempts += 1
            before = job.sent
            try:
                attempt = self._carrier.attempt(self, job)
            except RETRYABLE as exc:
                self.close()
                failures_without_progress = 0 if job.sent > before else failures_without_progress + 1
                if failures_without_progress >= self.attempts or result.attempts >= self.attempts * 8:
                    raise UploadError(
                        self.name, f"upload of {job.local.name} failed after {result.attempts} attempts: {exc}"
                    ) from None
                time.sleep(min(0.2 * failures_without_progress, 2.0))
                continue
            got = self._host_sha256(job, attempt)
            if got == job.sha256:
                return attempt.renamed
            restarts_for_hash += 1
            self._retry(lambda: remote_remove(self.link(), job.part_path))
            if restarts_for_hash >= 2:
                raise ChecksumMismatch(self.name, f"{job.part_path}: sha256 on the host is {got}, expected "
                                                  f"{job.sha256} (after a fresh upload)")

    def _host_sha256(self, job: Transfer, attempt: Attempt) -> str | None:
        """The sha256 of the whole partial on the host (hashed there during the attempt, or now)."""
        if attempt.size != job.size:
            raise UploadError(self.name, f"{job.part_path} has {attempt.size} bytes after the upload, "
                                         f"expected {job.size}")
        if attempt.sha256 is not None:
            return attempt.sha256
        return self._retry(lambda: remote_sha256(self.link(), job.part_path))


def upload_api(
    client: PveClient, storage: str, final: str, local: Path, sha256: str, *,
    progress: Progress | None = None, timeout: float = 3600.0,
) -> UploadResult:
    """Stream the file to PVE's upload endpoint (content=import); PVE verifies the sha256 itself."""
    # Imported here for its cost: requests, requests_toolbelt and the API client (about 6 MiB) stay out of an
    # SSH upload's memory (bench/upload measures it against a 64 MiB target).
    from image_factory.pve import apiupload

    started = time.monotonic()
    sent = apiupload.send(client, storage, final, local, sha256, progress=progress, timeout=timeout)
    return UploadResult("uploaded", bytes_sent=sent, attempts=1, engine="api", seconds=time.monotonic() - started)
