"""One plan/deploy run's shared state: API clients, host locks, per-host clone locks, progress."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from image_factory.pve.client import PveClient
from image_factory.pve.hostlock import ClusterLock, HostGuard, HostLock
from image_factory.pve.sshlink import SshLink
from image_factory.pve.templates import TemplateInfo
from image_factory.site.inventory import Hypervisor, Site

ClientFactory = Callable[[Hypervisor], PveClient]
LockFactory = Callable[[Hypervisor, str, int], HostGuard]
SnippetWriter = Callable[[Hypervisor, str, bytes], None]


def ssh_put_snippet(hv: Hypervisor, name: str, data: bytes) -> None:
    """Write ``data`` as ``<snippets_dir>/<name>`` over the pinned SSH endpoint: a temporary file renamed into place
    (a start never reads half a snippet); a file of that name is left as it is (names are content hashes)."""
    final = f"{hv.storage.snippets_dir}/{name}"
    with SshLink(hv.name, hv.ssh) as link:
        sftp = link.sftp()
        try:
            try:
                if sftp.stat(final).st_size == len(data):
                    return
            except FileNotFoundError:
                pass
            partial = f"{final}.partial-{uuid.uuid4().hex[:8]}"
            with sftp.open(partial, "wb") as out:
                out.write(data)
            sftp.chmod(partial, 0o644)
            sftp.posix_rename(partial, final)
        finally:
            sftp.close()


def ssh_host_lock(hv: Hypervisor, owner: str, wait: int) -> HostGuard:
    """The host lock publish takes too, held over the hypervisor's pinned SSH endpoint; a cluster node's: the
    cluster lock (pve.hostlock.ClusterLock), held through this node."""
    if hv.cluster is not None:
        return ClusterLock(SshLink(hv.name, hv.ssh).connect(), hv.cluster_lock_dir, owner, wait=wait, owns_link=True)
    return HostLock(SshLink(hv.name, hv.ssh).connect(), hv.storage.import_dir, owner, wait=wait, owns_link=True)


class Run:
    """Shared state of one plan/deploy run: clients, host locks, per-host clone locks, progress."""

    def __init__(self, site: Site, *, client_factory: ClientFactory | None, progress: Any = None,
                 run_id: str | None = None, snippet_writer: SnippetWriter | None = None):
        self.site = site
        self.snippets = snippet_writer or ssh_put_snippet
        self.factory = client_factory or (lambda hv: PveClient(hv))
        self.clients: dict[str, PveClient] = {}
        self.clone_locks: dict[str, threading.Lock] = {}
        self.guards: dict[str, HostGuard] = {}
        self.templates: dict[tuple[str, int], TemplateInfo] = {}  # (host, vmid) -> template seen while planning
        self._lock = threading.Lock()
        self.progress = progress
        self.run_id = run_id or uuid.uuid4().hex[:12]

    def client(self, hv: Hypervisor) -> PveClient:
        with self._lock:
            if hv.name not in self.clients:
                self.clients[hv.name] = self.factory(hv)
                self.clone_locks[hv.name] = threading.Lock()
            return self.clients[hv.name]

    def clone_lock(self, hv: Hypervisor) -> AbstractContextManager[Any]:
        self.client(hv)
        return self.clone_locks[hv.name]

    def guard(self, hv: Hypervisor, doing: str) -> None:
        """Before every write: this run must still hold the host lock (a dry run holds none and writes nothing)."""
        lock = self.guards.get(hv.name)
        if lock is None:
            raise AssertionError(f"write on {hv.name} without its host lock ({doing})")
        lock.ensure(doing)

    def holds(self, hv: Hypervisor) -> bool:
        lock = self.guards.get(hv.name)
        return lock is not None and lock.held

    def say(self, vm: str, text: str) -> None:
        if self.progress is not None:
            self.progress(vm, text)


