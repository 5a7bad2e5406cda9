"""A node of the lab's modelled cluster (lab/cluster.py): what its peers share, pveproxy's forwarding, going offline.

All nodes of a cluster run in one process; ``join_cluster`` makes them share what pmxcfs shares through /etc/pve
(VM configs -- so VMIDs are cluster-wide --, the node list, ACLs, tokens, tickets, datacenter.cfg, pools, the
shared storage and its lock). A call for another node is forwarded to that node's own endpoint over HTTPS, as
pveproxy does for an API method with ``proxyto => 'node'``; when that node is offline the caller gets 595, as
pveproxy answers when it cannot reach the node (pve-http-server, PVE::APIServer::AnyEvent::proxy_request).
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import ssl
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from fakepve.qemu import DRIVE_KEY, split_drive, volume_ref
from fakepve.routing import die
from fakepve.server import error, ok

from image_factory.lab.pki import cert_fingerprint
from image_factory.lab.pve.base import LabNodeBase
from image_factory.lab.pve.pmxcfs import CFS_LOCK_TIMEOUT, LockExpiry
from image_factory.lab.wire import entered

FORWARDED_HEADERS = ("Authorization", "Cookie", "CSRFPreventionToken", "Content-Type", "Content-Length", "Accept")
NO_ROUTE = "No route to host"


def join_cluster(members: list[LabNodeBase]) -> None:
    """Make the nodes one cluster: one set of shared objects, each node keeping its own local storages,
    tasks and VM processes."""
    first = members[0]
    nodes = {m.spec.node: {"online": True} for m in members}
    vms = [vm for m in members for vm in m.vms]
    cts = [ct for m in members for ct in getattr(m, "cts", [])]
    sid = first.cluster_spec["shared_storage"]
    shared = first.storages[sid]
    for m in members[1:]:
        shared["volumes"].update(m.storages[sid].get("volumes") or {})
    acl: dict[str, list[Any]] = {}
    for m in members:
        for user, entries in (m.acl or {}).items():
            mine = acl.setdefault(user, [])
            mine.extend(entry for entry in entries if entry not in mine)
    # the storage locks the previous run of this process held (pmxcfs would expire them after 120 s)
    for stale in (Path(first.cluster_spec["etc_pve"]) / "priv" / "lock").glob("storage-*"):
        with contextlib.suppress(OSError):
            stale.rmdir()
    peers = {m.spec.node: m for m in members}
    shared_locks: dict[str, Any] = {}
    # pmxcfs's 120 s, in the first node's PVE seconds (its time scale; 0 finishes tasks at once, not locks)
    expiry = LockExpiry(Path(first.cluster_spec["etc_pve"]) / "priv" / "lock",
                        lambda: CFS_LOCK_TIMEOUT * (first.time_scale or 1))
    for m in members:
        m.nodes, m.vms, m.cts, m.peers, m.shared_locks = nodes, vms, cts, peers, shared_locks
        m.cluster_name = str(first.cluster_spec["name"])
        m.tickets, m.apitokens, m.users = first.tickets, first.apitokens, first.users
        m.cluster_options, m.pools, m.pool_info = first.cluster_options, first.pools, first.pool_info
        m.acl = acl
        m._initial_acl = copy.deepcopy(acl)
        m.storages[sid] = shared
        m.lock_expiry = expiry


class ClusterMember(LabNodeBase):  # a concern of LabPve (node.py); inert on an independent node (no peers)
    _proxy_session: aiohttp.ClientSession | None = None
    lock_expiry: LockExpiry | None = None  # the cluster's, one for all its nodes (join_cluster)

    async def _answer(self, request: web.Request, handler: Any, generic: Any, path_node: str | None) -> Any:
        peer = self.peers.get(path_node) if path_node else None
        if peer is None or peer is self:
            return await super()._answer(request, handler, generic, path_node)
        if not self.nodes.get(str(path_node), {}).get("online", True):
            return error(595, NO_ROUTE)
        return await self._forward(request, peer)

    async def _forward(self, request: web.Request, peer: LabNodeBase) -> web.Response:
        """pveproxy's proxy_request: the same call on the owning node's endpoint, its answer passed back. Under
        /api2/extjs the peer is asked in JSON: this node's own middleware wraps the answer once."""
        path = request.path_qs
        if path.startswith("/api2/extjs/"):
            path = "/api2/json/" + path[len("/api2/extjs/"):]
        headers = {k: request.headers[k] for k in FORWARDED_HEADERS if k in request.headers}
        # an upload's body is streamed on (Upload._read_body left it unread), any other was read whole
        data: Any = request.content.iter_chunked(1 << 20) if path.endswith("/upload") else await request.read()
        url = f"https://{peer.spec.address}:{peer.spec.port}{path}"
        try:
            async with self._proxy().request(request.method, url, headers=headers, data=data) as resp:
                body = await resp.read()
                kind = resp.headers.get("Content-Type", "application/json")
                reason = resp.reason  # PVE puts an error's message in the status line
        except (aiohttp.ClientError, OSError) as exc:
            return error(595, f"{NO_ROUTE} ({exc})")
        return web.Response(status=resp.status, reason=reason, body=body, headers={"Content-Type": kind})

    def _proxy(self) -> aiohttp.ClientSession:
        if self._proxy_session is None:
            context = ssl.create_default_context(cafile=str(self.cluster_spec["ca_cert"]))
            self._proxy_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        return self._proxy_session

    async def _cluster_status(self, request: web.Request) -> web.Response:
        """pvecm's view (API2/ClusterConfig.pm / Cluster.pm status): the cluster, then each node with its
        address, whether it is this node (local) and online; quorate while more than half are online."""
        if not self.peers:
            response: web.Response = await super()._cluster_status(request)
            return response
        online = [n for n, s in self.nodes.items() if s.get("online", True)]
        data: list[dict[str, Any]] = [{"type": "cluster", "id": "cluster", "name": self.cluster_name,
                                       "nodes": len(self.nodes), "quorate": int(self.quorate), "version": 3}]
        for index, (name, peer) in enumerate(sorted(self.peers.items()), 1):
            data.append({"type": "node", "id": f"node/{name}", "name": name, "nodeid": index, "level": "",
                         "ip": peer.spec.address, "local": int(peer is self), "online": int(name in online)})
        return ok(data)

    async def _nodes(self, request: web.Request) -> web.Response:
        """GET /nodes: every node of the cluster, each with its own certificate's fingerprint."""
        response: web.Response = await super()._nodes(request)
        if not self.peers:
            return response
        data = json.loads(response.text or "{}").get("data") or []
        for item in data:
            peer = self.peers.get(item.get("node"))
            if peer is not None:
                with contextlib.suppress(OSError, ValueError):
                    item["ssl_fingerprint"] = cert_fingerprint(peer.spec.cert)
        return ok(data)

    def _storage_resource(self, node: str, name: str) -> dict[str, Any] | None:
        """An offline node's storages show status unknown (pvestatd's data of that node is missing)."""
        item: dict[str, Any] | None = super()._storage_resource(node, name)
        if item is not None and not self.nodes.get(node, {}).get("online", True):
            item["status"] = "unknown"
        return item

    async def _qm_clone(self, v: dict[str, Any], user: str) -> str:
        """qemu-server's clone_vm: a clone to another node (`target`) needs every source volume on shared
        storage ("can't clone VM to node ... (VM uses local storage)"); a non-shared target storage is refused
        first ("can't clone to non-shared storage", fakepve)."""
        target, storage = v.get("target"), v.get("storage")
        if target and target not in (v["node"], "localhost") and target in self.nodes:
            store = self.storages.get(str(storage)) if storage else None
            if store is None or store.get("shared"):
                src = self.find(v["node"], int(v["vmid"]))
                if not self._on_shared_storage(src.config):
                    raise die(f"can't clone VM to node '{target}' (VM uses local storage)")
        upid: str = await super()._qm_clone(v, user)
        return upid

    def _on_shared_storage(self, config: dict[str, Any]) -> bool:
        """check_storage_access_clone's $sharedvm: every disk and CD-ROM image on a shared storage."""
        for key, value in config.items():
            if not DRIVE_KEY.match(key):
                continue
            sid = volume_ref(split_drive(str(value))[0])[0]
            if sid is not None and not (self.storages.get(sid) or {}).get("shared"):
                return False
        return True

    def revoke_tickets(self) -> None:
        self.tickets.clear()  # in place: the cluster's nodes share one ticket table

    async def set_offline(self, offline: bool) -> None:
        """The node goes down (or comes back): its endpoint stops answering, open connections are cut, and its
        peers report it offline and answer 595 for it; the cluster stays quorate while most nodes are up."""
        self.set_node_offline(self.spec.node, offline)
        online = sum(1 for s in self.nodes.values() if s.get("online", True))
        for peer in self.peers.values():
            peer.quorate = online * 2 > len(self.nodes)
        if offline and self.runner is not None:
            for site in list(self.runner.sites):
                await site.stop()
            server = self.runner.server
            for conn in list(getattr(server, "connections", []) or []):
                with contextlib.suppress(Exception):
                    conn.force_close()
                    if conn.transport is not None:
                        conn.transport.abort()
        elif not offline and self.runner is not None and not self.runner.sites:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(self.spec.cert), str(self.spec.key))
            with entered(self.spec.extra.get("netns")):
                await web.TCPSite(self.runner, self.spec.address, self.spec.port, ssl_context=context).start()

    async def _op_node_offline(self, args: dict[str, Any]) -> None:
        await self.set_offline(bool(args.get("offline", True)))

    async def reset(self) -> None:
        """A cluster node's reset also brings it back online and empties the shared storage and /etc/pve's
        locks; the cluster's nodes share the ACLs again (a reset gives each node its initial copy)."""
        await super().reset()  # Control.reset, later in LabPve's order
        if not self.peers:
            return
        await self.set_offline(False)
        for peer in self.peers.values():
            peer.acl = self.acl
        for folder in (Path(self.cluster_spec["shared_dir"]), Path(self.cluster_spec["etc_pve"]) / "priv" / "lock"):
            for entry in folder.rglob("*") if folder.is_dir() else []:
                if entry.is_file():
                    entry.unlink(missing_ok=True)
            for entry in sorted(folder.rglob("*"), reverse=True) if folder.is_dir() else []:
                if entry.is_dir() and entry.parent != Path(self.cluster_spec["shared_dir"]):
                    shutil.rmtree(entry, ignore_errors=True)

    async def shutdown(self) -> None:
        await super().shutdown()  # Control.shutdown
        if self._proxy_session is not None:
            await self._proxy_session.close()
