"""One host's run context, and how the artifact's bytes reach the host: the transports publish knows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from image_factory.publish.model import Artifact, HostPlan, HostResult, ProgressHook
from image_factory.pve.client import PveClient
from image_factory.pve.hostlock import DEFAULT_WAIT, HostLock
from image_factory.pve.sshlink import CommandTimedOut, SshLink
from image_factory.pve.upload import (
    TRANSPORT_KINDS,
    SshUploader,
    TransportKind,
    UploadError,
    UploadResult,
    remote_remove,
    upload_api,
)
from image_factory.pve.upload_delta import DeltaRebuildFailed, delta_name, rebuild_from_delta
from image_factory.site.inventory import Hypervisor

LOCK_WAIT = DEFAULT_WAIT


@dataclass
class HostContext:
    hv: Hypervisor
    artifact: Artifact
    transport: str
    keep: int
    run_id: str
    client_factory: Callable[[Hypervisor], PveClient] = PveClient
    link_factory: Callable[[Hypervisor], SshLink] = field(default=lambda hv: SshLink(hv.name, hv.ssh).connect())
    progress: ProgressHook | None = None
    engine: str = "auto"
    lock_wait: int = LOCK_WAIT
    label: str = ""  # the report's host when it is not hv's name: a cluster publishing once for all its nodes
    shared_nodes: tuple[str, ...] = ()  # a cluster on shared storage: the nodes whose templates are the cluster's
    unseen_nodes: tuple[str, ...] = ()  # a cluster on shared storage: its offline nodes (clones there are not seen)
    cluster_lock: HostLock | None = None  # a cluster node's: the cluster lock its unit holds for all its nodes

    @property
    def host(self) -> str:
        return self.label or self.hv.name


@dataclass(frozen=True)
class Payload:
    """One file for a host's import storage: the local file, its import name and the sha256 it must arrive with."""

    local: Path
    final: str
    sha256: str


Sender = Callable[[HostContext, PveClient, SshLink, HostResult, Callable[[int], None], Payload], UploadResult]


@dataclass(frozen=True)
class Transport:
    """How an artifact's bytes reach a host's import storage: the sender and its kind's facts."""

    send: Sender
    kind: TransportKind

    @property
    def resumable(self) -> bool:
        return self.kind.resumable

    @property
    def staged(self) -> bool:
        return self.kind.staged

    @property
    def rebuilds_delta(self) -> bool:
        return self.kind.rebuilds_delta


def _send_over_ssh(ctx: HostContext, client: PveClient, link: SshLink, result: HostResult,
                   tick: Callable[[int], None], item: Payload) -> UploadResult:
    """Over the host's SSH link (verified, resumable, under the host lock)."""
    # The data channel starts on the control link (one handshake per host); after a drop the
    # uploader reconnects on its own, and the lost lock is noticed and re-taken by the caller.
    uploader = SshUploader(ctx.hv.name, lambda: ctx.link_factory(ctx.hv), engine=ctx.engine, shared=link,
                           endpoint=ctx.hv.ssh)
    try:
        return uploader.upload(item.local, ctx.hv.storage.import_dir, item.final, item.sha256, progress=tick,
                               check_final=False)
    finally:
        result.bytes_sent += uploader.bytes_sent  # counted even when the upload fails
        uploader.close()


def _send_through_the_api(ctx: HostContext, client: PveClient, link: SshLink, result: HostResult,
                          tick: Callable[[int], None], item: Payload) -> UploadResult:
    """PVE's own upload call (content=import, checksum verified by PVE)."""
    up = upload_api(client, ctx.hv.storage.import_, item.final, item.local, item.sha256, progress=tick)
    result.bytes_sent += up.bytes_sent
    return up


TRANSPORTS: dict[str, Transport] = {
    "ssh": Transport(_send_over_ssh, TRANSPORT_KINDS["ssh"]),
    "api": Transport(_send_through_the_api, TRANSPORT_KINDS["api"]),
}


def _send_delta(ctx: HostContext, plan: HostPlan, link: SshLink, result: HostResult) -> None:
    """The delta over the verified SSH upload, then the host's rebuild of the full image on the base it names."""
    hv, art, delta = ctx.hv, ctx.artifact, ctx.artifact.delta
    assert delta is not None

    def tick(done: int) -> None:
        if ctx.progress:
            ctx.progress(hv.name, done, delta.size)

    uploader = SshUploader(hv.name, lambda: ctx.link_factory(hv), engine=ctx.engine, shared=link, endpoint=hv.ssh)
    try:
        uploader.upload(delta.path, hv.storage.import_dir, delta_name(art.import_file), delta.sha256,
                        progress=tick, check_final=False)
    finally:
        result.bytes_sent += uploader.bytes_sent
        uploader.close()
    rebuild_from_delta(link, hv.storage.import_dir, plan.delta_base, art.import_file, delta.guest_sha256)


def upload(ctx: HostContext, plan: HostPlan, client: PveClient, link: SshLink, result: HostResult) -> None:
    """Send the artifact as the plan says (``skip``: a verified final file is already there; ``delta``: only the
    clusters that differ from a base the host holds, falling back to the full image if the host cannot rebuild
    a verified image from them)."""
    hv, art = ctx.hv, ctx.artifact
    total = art.size

    def tick(done: int) -> None:
        if ctx.progress:
            ctx.progress(hv.name, done, total)

    if plan.upload == "skip":
        tick(total)
        return
    if plan.upload == "delta":
        try:
            _send_delta(ctx, plan, link, result)
            result.upload = "delta"
            result.notes.append(f"sent a delta of {plan.delta_bytes / 2**20:.1f} MiB against {plan.delta_base} "
                                f"({plan.delta_bytes / art.size:.1%} of the image); the host rebuilt the image "
                                "and verified its guest view")
            return
        except (UploadError, CommandTimedOut) as exc:  # the host's script removed what it made (under `timeout`)
            step = "rebuild" if isinstance(exc, DeltaRebuildFailed | CommandTimedOut) else "upload"
            result.notes.append(f"delta publish against {plan.delta_base} failed in its {step} "
                                f"({exc.message[:300]}); sent the full image")
        except FileNotFoundError as exc:  # another publish of this image replaced the kept base and its delta
            result.notes.append(f"the delta against {plan.delta_base} is gone ({exc.filename}: another publish of "
                                "this image kept a newer base); sent the full image")
        # LinkClosed is not caught: the link held the host lock, so the round re-plans under a re-taken lock
    elif plan.no_delta:
        result.notes.append(f"sent the full image: {plan.no_delta}")
    up = TRANSPORTS[ctx.transport].send(ctx, client, link, result, tick,
                                        Payload(art.path, art.import_file, art.manifest.artifact.sha256))
    result.resumed_from = up.resumed_from
    result.upload = "resumed" if up.resumed_from else up.action
    tick(total)


def upload_efi_vars(ctx: HostContext, plan: HostPlan, client: PveClient, link: SshLink, result: HostResult) -> None:
    """The build's enrolled EFI variable store, beside the disk, by the same verified transport (540 KiB: sent
    whole; ``skip``: the same bytes are already there). A file of that name with other bytes is replaced."""
    art = ctx.artifact
    if plan.efi_vars_upload != "upload" or art.efi_vars is None:
        return
    if ctx.transport == "api":  # the upload endpoint does not replace a file (SSH's rename does)
        remote_remove(link, f"{ctx.hv.storage.import_dir}/{art.efi_vars_file}")
    TRANSPORTS[ctx.transport].send(ctx, client, link, result, lambda _done: None,
                                   Payload(art.efi_vars, art.efi_vars_file, art.manifest.efi_vars_sha256))
