"""The control endpoint (a unix socket): fault hooks, introspection and resets for tests."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import shutil
import time
from typing import Any

from aiohttp import web
from fakepve import PveError, TaskError

from image_factory.lab.pve.base import (
    LabNodeBase,
)
from image_factory.lab.spec import THIN_STORAGE


class Control(LabNodeBase):  # a concern of LabPve (node.py)
    async def start_control(self) -> None:
        app = web.Application()
        app.router.add_post("/control", self._control)
        self._control_runner = web.AppRunner(app)
        await self._control_runner.setup()
        sock = self.spec.control_socket
        sock.unlink(missing_ok=True)
        site = web.UnixSite(self._control_runner, str(sock))
        await site.start()
        sock.chmod(0o600)
        self._reconciler = asyncio.ensure_future(self._reconcile())

    async def shutdown(self) -> None:
        if self._reconciler is not None:
            self._reconciler.cancel()
        for vmid in list(self.runners):
            self.runners.pop(vmid).stop()
            vm = self.vm(vmid)
            if vm is not None:
                vm.status = vm.qmpstatus = "stopped"
        with contextlib.suppress(OSError):
            self.save_state()
        if self._control_runner is not None:
            await self._control_runner.cleanup()
        self.spec.control_socket.unlink(missing_ok=True)
        await self.stop()

    async def _control(self, request: web.Request) -> web.Response:
        body = await request.json()
        op, args = body.get("op"), body.get("args") or {}
        try:
            result = await self.control(op, args)
        except (PveError, TaskError, KeyError, ValueError, TypeError) as exc:
            return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=400)
        return web.json_response({"result": result})

    async def control(self, op: str, args: dict[str, Any]) -> Any:
        """Fault hooks and introspection (see image_factory.lab.control for the client)."""
        if op == "fail":
            self.fail(args["method"], args["suffix"], status=args.get("status"), message=args.get("message"),
                      error=args.get("error"), times=args.get("times"), html=args.get("html", False))
            return None
        if op == "clear_faults":
            self.failures.clear()
            self.bridge_vlans.clear()
            self.network.update(latency=0.0, jitter=0.0, node_latency={}, drop_rate=0.0, hang_rate=0.0)
            self.extra_durations.clear()
            for vm in self.vms:
                vm.agent_hangs = False
            for sid in list(self.storage_locks):
                self.storage_unlock(sid, "scenario")
            for vm in self.vms:
                self.release(vm, "scenario")
            return None
        if op == "datacenter":
            # datacenter.cfg as an admin writes it (pvesh set /cluster/options): property strings
            for key, val in (args.get("set") or {}).items():
                self.cluster_options[str(key)] = str(val)
            for key in args.get("delete") or []:
                self.cluster_options.pop(str(key), None)
            return None
        if op == "grant":
            # an admin's `pveum acl modify <path>` for the factory's user and its token
            user = self.spec.token_id.split("!")[0]
            for who in (user, self.spec.token_id):
                self.grant(who, str(args["path"]), *args["privs"])
            return None
        if op == "revoke":
            # an admin's `pveum acl delete <path>` of these privileges, for the factory's user and its token
            user, acl = self.spec.token_id.split("!")[0], self.acl or {}
            for who in (user, self.spec.token_id):
                acl[who] = [(p, set(privs) - set(args["privs"])) if p == str(args["path"]) else (p, privs)
                            for p, privs in acl.get(who, [])]
            return None
        if op == "release":
            self.switch_release(str(args["version"]))
            return None
        if op == "edk2_vars":
            self.edk2_ms_2023 = bool(args["ms_2023"])
            return None
        if op == "thin_pool":
            self.storages[THIN_STORAGE]["pool_size"] = int(args["size"])
            return None
        if op == "flaky_network":
            self.flaky_network(**args)
            return None
        if op == "bridge_vlans":
            self.bridge_vlans[str(args["bridge"])] = {"bridge_vlan_aware": 1 if args.get("aware", True) else None,
                                                      "bridge_vids": args.get("vids")}
            return None
        if op == "slow_network":
            self.slow_network(**args)
            return None
        if op == "hold_config_lock":
            await self.hold_config_lock(int(args["vmid"]), args.get("secs"))
            return None
        if op == "release_config_lock":
            self.release_config_lock(int(args["vmid"]))
            return None
        if op == "snapshot_lock":
            self.snapshot_lock(int(args["vmid"]), args.get("lock", "snapshot"))
            return None
        if op == "unlock":
            self.unlock(int(args["vmid"]))
            return None
        if op == "hold_storage_lock":
            await self.hold_storage_lock(args.get("storage", "local"), args.get("secs"))
            return None
        if op == "release_storage_lock":
            self.storage_unlock(args.get("storage", "local"), "scenario")
            return None
        if op == "durations":
            self.extra_durations.update({k: float(v) for k, v in args.items()})
            return None
        if op == "time_scale":
            self.time_scale = float(args["value"])
            return None
        if op == "agent_hangs":
            self.find(self.spec.node, int(args["vmid"])).agent_hangs = bool(args.get("value", True))
            return None
        if op == "set_node_offline":
            self.set_node_offline(self.spec.node, bool(args.get("offline", True)))
            return None
        if op == "revoke_tickets":
            self.revoke_tickets()
            return None
        if op == "snapshot":
            vm = self.find(self.spec.node, int(args["vmid"]))
            vm.snapshots[args.get("name", "snap1")] = {"snaptime": int(time.time())}
            return None
        if op == "state":
            return self.state()
        if op == "reset":
            await self.reset()
            return None
        raise ValueError(f"unknown control op {op!r}")

    def state(self) -> dict[str, Any]:
        vms = []
        for vm in self.vms:
            proc = self.runners.get(vm.vmid)
            vms.append({"vmid": vm.vmid, "name": vm.name, "status": vm.status, "template": bool(vm.template),
                        "lock": vm.lock, "config": dict(vm.config),
                        "qemu": proc.describe() if proc is not None else None})
        return {"node": self.spec.node, "version": self.version, "time_scale": self.time_scale, "vms": vms,
                "storage_locks": {k: v.holder for k, v in self.storage_locks.items() if v.holder},
                "tasks": len(self.tasks), "failures": [list(k) for k in self.failures]}

    async def reset(self) -> None:
        """Back to a fresh node: no VMs, no disks, no imports, no faults, no tasks."""
        await self.control("clear_faults", {})
        for vmid in list(self.runners):
            await asyncio.to_thread(self.runners.pop(vmid).stop)
        self.vms.clear()
        self.tasks.clear()
        self.tasklog.clear()
        self.requests.clear()
        self._pending_io.clear()
        self.storage_locks.clear()
        self.time_scale = self.spec.time_scale
        self.cluster_options.clear()
        self.set_release(self.spec.version)
        self.acl = copy.deepcopy(self._initial_acl)
        self.storages[THIN_STORAGE].pop("pool_size", None)
        self.edk2_ms_2023 = bool(self.spec.extra.get("edk2_ms_2023", True))
        for store in self.storages.values():
            store["volumes"] = {}
            store["files"] = set()
        base = self.spec.storage_dir
        for sub in ("import", "images", "template/iso", "template/cache", "snippets", "dump"):
            folder = base / sub
            if folder.exists():
                for entry in folder.iterdir():
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
        for entry in self.thin_dir.iterdir():
            entry.unlink()  # a thin volume left here would be replaced by the next template's rename
        for entry in self.spec.staging_dir.glob("pveupload-*"):
            entry.unlink()
        self.state_file.unlink(missing_ok=True)
        self._saved_state = ""

