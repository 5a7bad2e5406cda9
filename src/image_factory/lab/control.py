"""Client of a lab node's control endpoint (HTTP over the unix socket run/<host>-control.sock).

Ops (args as keyword arguments):
  fail(method, suffix, status=None, message=None, error=None, times=None, html=False)   fakepve's fail()
  flaky_network(drop_rate=0.0, hang_rate=0.0, hang_secs=120, seed=None)
  slow_network(latency, jitter=0.0)
  hold_config_lock(vmid, secs=None) / release_config_lock(vmid)
  snapshot_lock(vmid, lock="snapshot") / unlock(vmid) / snapshot(vmid, name)
  hold_storage_lock(storage="local", secs=None) / release_storage_lock(storage="local")
  durations(clone_full=.., clone_linked=.., import=.., template=.., start=.., stop=.., imgcopy=..)  PVE seconds
  time_scale(value) / agent_hangs(vmid, value=True) / set_node_offline(offline=True) / revoke_tickets()
  datacenter(set={"user-tag-access": "user-allow=list,user-allow-list=a;b", ...}, delete=[...])  datacenter.cfg
  grant(path, privs) / revoke(path, privs)  ACLs of the factory's user and token (reset() restores the playbook's)
  thin_pool(size)  the LVM-thin pool's data size in bytes (reset() restores 100 GiB)
  release(version)  another pve-manager release of the node's major, e.g. 9.1.19 on 9.2.5 (reset() restores)
  clear_faults() / reset() / state()
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from image_factory.lab.config import LabError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


class Control:
    def __init__(self, socket_path: Path, timeout: float = 60.0):
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request("POST", "/control", body=json.dumps({"op": op, "args": args}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read() or b"{}")
        except OSError as exc:
            raise LabError(f"lab control {self.socket_path}: {exc}") from None
        finally:
            conn.close()
        if resp.status != 200:
            raise LabError(f"lab control {op}: {data.get('error', resp.status)}")
        return data.get("result")

    def __getattr__(self, op: str) -> Any:
        if op.startswith("_"):
            raise AttributeError(op)
        return lambda **args: self.call(op, **args)
