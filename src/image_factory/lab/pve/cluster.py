"""Node and cluster: /nodes, cluster status and options (datacenter.cfg), node status, network."""

from __future__ import annotations

import contextlib
import json
import shutil
from typing import Any

from aiohttp import web
from fakepve.server import ok

from image_factory.lab.pki import cert_fingerprint
from image_factory.lab.pve.base import (
    LabNodeBase,
)


class Cluster(LabNodeBase):  # a concern of LabPve (node.py)
    def _routes_lab(self) -> list[tuple[str, str, Any]]:
        return [("GET", "/cluster/options", self._cluster_options_get),
                ("PUT", "/cluster/options", self._cluster_options_set),
                ("PUT", "/nodes/{node}/qemu/{vmid}/resize", self._qm_resize),
                ("GET", "/nodes/{node}/network", self._network_list),
                ("GET", "/nodes/{node}/status", self._node_status)]

    async def _nodes(self, request: web.Request) -> web.Response:
        """GET /nodes: this node, with its real certificate fingerprint."""
        response: web.Response = await super()._nodes(request)
        data = json.loads(response.text or "{}").get("data") or []
        with contextlib.suppress(OSError, ValueError):
            fp = cert_fingerprint(self.spec.cert)
            for item in data:
                item["ssl_fingerprint"] = fp
        return ok(data)

    async def _cluster_status(self, request: web.Request) -> web.Response:
        """A node that is not in a cluster lists only itself."""
        return ok([{"type": "node", "id": f"node/{self.spec.node}", "name": self.spec.node, "nodeid": 0,
                    "ip": self.spec.address, "local": 1, "online": 1, "level": ""}])

    async def _cluster_options_get(self, v: dict[str, Any], user: str) -> dict[str, Any]:
        """pve-manager's get_options (API2/Cluster.pm): 200 to every user. Without Sys.Audit on / only
        `console` and `tag-style`; with it all of datacenter.cfg as PVE::DataCenterConfig parses it (tag-style
        and user-tag-access as objects, user-allow-list and registered-tags as arrays). Always `allowed-tags`."""
        stored = dict(self.cluster_options)
        if not self.allowed(user, "/", "Sys.Audit"):
            stored = {k: val for k, val in stored.items() if k in ("console", "tag-style")}
        answer: dict[str, Any] = {}
        for key, val in stored.items():
            if key in ("tag-style", "user-tag-access"):
                parsed: dict[str, Any] = dict(p.split("=", 1) for p in str(val).split(",") if "=" in p)
                if "user-allow-list" in parsed:
                    parsed["user-allow-list"] = [t for t in parsed["user-allow-list"].split(";") if t]
                if "case-sensitive" in parsed:
                    parsed["case-sensitive"] = int(parsed["case-sensitive"] in ("1", "true"))
                answer[key] = parsed
            elif key == "registered-tags":
                answer[key] = [t for t in str(val).split(";") if t]
            else:
                answer[key] = val
        answer["allowed-tags"] = sorted(self.allowed_tags(user))
        return answer

    async def _cluster_options_set(self, v: dict[str, Any], user: str) -> None:
        self.require(user, "/", "Sys.Modify")
        for key in ("user-tag-access", "registered-tags", "tag-style"):
            if key in v:
                self.cluster_options[key] = str(v[key])
        for key in str(v.get("delete", "")).split(","):
            self.cluster_options.pop(key.strip(), None)

    async def _node_status(self, v: dict[str, Any], user: str) -> dict[str, Any]:
        self.require(user, f"/nodes/{v['node']}", "Sys.Audit")
        root = shutil.disk_usage(self.spec.storage_dir)
        mem = 32 * 1024 ** 3
        return {
            "pveversion": f"pve-manager/{self.version}/ec5affc9e41f1d79",
            "kversion": "Linux 6.8.12-9-pve #1 SMP PREEMPT_DYNAMIC PMX 6.8.12-9 (2025-03-16T19:18Z)",
            "current-kernel": {"sysname": "Linux", "release": "6.8.12-9-pve", "machine": "x86_64",
                               "version": "#1 SMP PREEMPT_DYNAMIC PMX 6.8.12-9 (2025-03-16T19:18Z)"},
            "boot-info": {"mode": "efi", "secureboot": 0},
            "uptime": 86400, "cpu": 0.02, "wait": 0.0, "loadavg": ["0.10", "0.12", "0.09"],
            "cpuinfo": {"model": "lab CPU", "cpus": 8, "cores": 8, "sockets": 1, "mhz": "3000.000",
                        "hvm": "1", "flags": "", "user_hz": 100},
            "memory": {"total": mem, "used": mem // 8, "free": mem - mem // 8, "available": mem - mem // 8},
            "swap": {"total": 0, "used": 0, "free": 0},
            "rootfs": {"total": root.total, "used": root.used, "free": root.free, "avail": root.free},
            "ksm": {"shared": 0},
        }

    async def _network_list(self, v: dict[str, Any], user: str) -> list[dict[str, Any]]:
        """The node's interfaces: a NIC and the bridges the lab inventory's VMs use. pve-manager's network index
        (API2/Network.pm) answers every user, but hides each bridge the caller holds neither SDN.Audit nor
        SDN.Use on (/sdn/zones/localnetwork/<bridge>, or a VLAN below it)."""
        kind = v.get("type")
        out: list[dict[str, Any]] = [{"iface": "eno1", "type": "eth", "method": "manual", "method6": "manual",
                                      "families": ["inet"], "priority": 2, "active": 1, "exists": 1}]
        for n, bridge in enumerate(self.spec.extra.get("bridges") or ["vmbr0"]):
            item: dict[str, Any] = {"iface": bridge, "type": "bridge", "method": "manual", "method6": "manual",
                                    "families": ["inet"], "priority": 3 + n, "active": 1, "autostart": 1,
                                    "exists": 1, "bridge_ports": "eno1" if n == 0 else "",
                                    "bridge_stp": "off", "bridge_fd": "0"}
            # As PVE's GUI writes a VLAN-aware bridge (bridge-vlan-aware yes, bridge-vids 2-4094); a test can
            # make one VLAN-unaware or narrow its VLANs (control op bridge_vlans).
            vlans = self.bridge_vlans.get(bridge, {"bridge_vlan_aware": 1, "bridge_vids": "2-4094"})
            item.update({k: v for k, v in vlans.items() if v is not None})
            if n == 0:
                item.update(method="static", address=self.spec.address, netmask="255.255.255.0",
                            cidr=f"{self.spec.address}/24")
            out.append(item)
        out = [i for i in out if i["type"] != "bridge" or self._may_see_bridge(user, i["iface"])]
        if kind in ("bridge", "any_bridge"):
            return [i for i in out if i["type"] == "bridge"]
        if kind == "eth":
            return [i for i in out if i["type"] == "eth"]
        return out

