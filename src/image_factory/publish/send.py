"""One host's run context, and how the artifact's bytes reach the host: the transports publish knows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from image_factory.publish.model import Artifact, HostPlan, HostResult, ProgressHook
from image_factory.pve.client import PveClient
from image_factory.pve.hostlock import DEFAULT_WAIT, HostLock
from image_factory.pve.sshlink import SshLink
from image_factory.pve.upload import TRANSPORT_KINDS, SshUploader, TransportKind, UploadResult, upload_api
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


Sender = Callable[[HostContext, PveClient, SshLink, HostResult, Callable[[int], None]], UploadResult]


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


def _send_over_ssh(ctx: HostContext, client: PveClient, link: SshLink, result: HostResult,
                   tick: Callable[[int], None]) -> UploadResult:
    """Over the host's SSH link (verified, resumable, under the host lock)."""
    # The data channel starts on the control link (one handshake per host); after a drop the
    # uploader reconnects on its own, and the lost lock is noticed and re-taken by the caller.
    uploader = SshUploader(ctx.hv.name, lambda: ctx.link_factory(ctx.hv), engine=ctx.engine, shared=link,
                           endpoint=ctx.hv.ssh)
    try:
        return uploader.upload(ctx.artifact.path, ctx.hv.storage.import_dir, ctx.artifact.import_file,
                               ctx.artifact.manifest.artifact.sha256, progress=tick, check_final=False)
    finally:
        result.bytes_sent += uploader.bytes_sent  # counted even when the upload fails
        uploader.close()


def _send_through_the_api(ctx: HostContext, client: PveClient, link: SshLink, result: HostResult,
                          tick: Callable[[int], None]) -> UploadResult:
    """PVE's own upload call (content=import, checksum verified by PVE)."""
    art = ctx.artifact
    up = upload_api(client, ctx.hv.storage.import_, art.import_file, art.path, art.manifest.artifact.sha256,
                    progress=tick)
    result.bytes_sent += up.bytes_sent
    return up


TRANSPORTS: dict[str, Transport] = {
    "ssh": Transport(_send_over_ssh, TRANSPORT_KINDS["ssh"]),
    "api": Transport(_send_through_the_api, TRANSPORT_KINDS["api"]),
}


def upload(ctx: HostContext, plan: HostPlan, client: PveClient, link: SshLink, result: HostResult) -> None:
    """Send the artifact as the plan says (``skip``: a verified final file is already there)."""
    hv, art = ctx.hv, ctx.artifact
    total = art.size

    def tick(done: int) -> None:
        if ctx.progress:
            ctx.progress(hv.name, done, total)

    if plan.upload == "skip":
        tick(total)
        return
    up = TRANSPORTS[ctx.transport].send(ctx, client, link, result, tick)
    result.resumed_from = up.resumed_from
    result.upload = "resumed" if up.resumed_from else up.action
    tick(total)
