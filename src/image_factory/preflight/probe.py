"""HostProbe: what preflight reads of one hypervisor, each fact read once, when a check first asks for it.

A fact that could not be read keeps its error: every check that needs it gets the same error again (and no
second request is made), so a check's outcome depends only on what the probe saw, never on which check ran
before it. Every read is read-only: API GETs and ``df`` over SSH.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from image_factory.preflight.model import SpaceNeed
from image_factory.pve.client import PveClient
from image_factory.pve.livemacs import MacUse, host_mac_uses
from image_factory.pve.sshlink import CommandResult, SshLink
from image_factory.pve.templates import ClusterFacts, cluster_facts
from image_factory.site.inventory import Hypervisor, Site

T = TypeVar("T")
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)(?:[.-](\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    m = _VERSION_RE.match(text.strip())
    if not m:
        return None
    return int(m[1]), int(m[2]), int(m[3] or 0)


class HostProbe:
    """One hypervisor as preflight sees it, and what this run asks of it (``need``, ``transport``, ``images``)."""

    def __init__(self, site: Site, hv: Hypervisor, *, timeout: float,
                 client_factory: Callable[[Hypervisor], PveClient] | None = None,
                 need: SpaceNeed | None = None, transport: str = "ssh", images: Sequence[str] = ()):
        self.site, self.hv, self.timeout = site, hv, timeout
        self.need, self.transport, self.images = need or SpaceNeed(0, ""), transport, tuple(images)
        self._client_factory = client_factory or (lambda h: PveClient(h, timeout=timeout))
        self._facts: dict[str, Any] = {}
        self._errors: dict[str, Exception] = {}

    def _fact(self, key: str, read: Callable[[], T]) -> T:
        if key in self._errors:
            raise self._errors[key]
        if key not in self._facts:
            try:
                self._facts[key] = read()
            except Exception as exc:
                self._errors[key] = exc
                raise
        value: T = self._facts[key]
        return value

    # -- the API: the client (its secret read, its TLS pinned), then its answers
    @property
    def client(self) -> PveClient:
        """Raises RemoteError (e.g. the CA file does not exist) or FactoryError (the token secret is unreadable)."""
        return self._fact("client", lambda: self._client_factory(self.hv))

    @property
    def version(self) -> dict[str, Any]:
        """GET /version: the first request, so it also proves TLS (TlsVerificationFailed) and the token (ApiError)."""
        return self._fact("version", lambda: self.client.version())

    @property
    def version_text(self) -> str:
        return str(self.version.get("version") or self.version.get("release") or "")

    @property
    def major(self) -> int:
        parsed = parse_version(self.version_text)
        return parsed[0] if parsed else 8

    @property
    def storages(self) -> list[dict[str, Any]]:
        return self._fact("storages", lambda: self.client.storages())

    def storage(self, sid: str) -> dict[str, Any] | None:
        return next((s for s in self.storages if str(s.get("storage")) == sid), None)

    @property
    def networks(self) -> list[dict[str, Any]]:
        return self._fact("networks", lambda: self.client.node_networks())

    @property
    def cluster(self) -> ClusterFacts:
        """A cluster entry's node: the cluster's nodes (online or not) and which of its storages are shared."""
        return self._fact("cluster", lambda: cluster_facts(self.client))

    @property
    def cluster_nodes(self) -> dict[str, bool]:
        """The nodes /cluster/resources lists (a host of its own: itself) and whether each is online."""
        return self._fact("cluster_nodes", lambda: self.client.cluster_nodes())

    @property
    def guests(self) -> list[dict[str, Any]]:
        return self._fact("guests", lambda: self.client.cluster_vms())

    @property
    def mac_uses(self) -> dict[str, list[MacUse]]:
        return self._fact("mac_uses", lambda: host_mac_uses(self.client, self.hv.name))

    @property
    def cluster_options(self) -> Any:
        return self._fact("cluster_options", lambda: self.client.cluster_options())

    def permissions(self, path: str) -> Any:
        return self._fact(f"permissions {path}", lambda: self.client.permissions(path))

    # -- SSH: the link (host key pinned), then what runs over it
    @property
    def link(self) -> SshLink:
        """Raises HostKeyMismatch or RemoteError."""
        return self._fact("link", lambda: SshLink(self.hv.name, self.hv.ssh, timeout=self.timeout).connect())

    def df(self, path: str) -> CommandResult:
        """``df -Pk -- path`` (its status and stderr kept: a missing directory is a finding, not an error)."""
        return self._fact(f"df {path}", lambda: self.link.run(["df", "-Pk", "--", path], check=False,
                                                             timeout=self.timeout))

    def close(self) -> None:
        link = self._facts.get("link")
        if link is not None:
            link.close()
