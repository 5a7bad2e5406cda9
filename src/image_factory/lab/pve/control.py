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

# control op -> the Control method that carries it out (image_factory.lab.control sends the ops)
CONTROL_OPS: dict[str, str] = {op: f"_op_{op}" for op in (
    "fail", "clear_faults", "datacenter", "grant", "revoke", "release", "edk2_vars", "thin_pool", "flaky_network",
    "bridge_vlans", "slow_network", "hold_config_lock", "release_config_lock", "snapshot_lock", "unlock",
    "hold_storage_lock", "release_storage_lock", "durations", "time_scale", "agent_hangs", "set_node_offline",
    "revoke_tickets", "snapshot", "state", "reset", "node_offline",
)}


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
        """Fault hooks and introspection (see image_factory.lab.control for the client): CONTROL_OPS names
        each op's handler; a handler answers None unless it reports something."""
        handler = CONTROL_OPS.get(op)
        if handler is None:
            raise ValueError(f"unknown control op {op!r}")
        result = getattr(self, handler)(args)
        return await result if asyncio.iscoroutine(result) else result

    def _op_fail(self, args: dict[str, Any]) -> None:
        self.fail(args["method"], args["suffix"], status=args.get("status"), message=args.get("message"),
                  error=args.get("error"), times=args.get("times"), html=args.get("html", False))

    def _op_clear_faults(self, args: dict[str, Any]) -> None:
        self.failures.clear()
        self.bridge_vlans.clear()
        self.network.update(latency=0.0, jitter=0.0, node_latency={}, drop_rate=0.0, hang_rate=0.0)
        self.extra_durations.clear()
        for vm in self.vms:
            vm.agent_hangs = False
        for sid in [*self.storage_locks, *self.shared_locks]:
            self.storage_unlock(sid, "scenario")
        for vm in self.vms:
            self.release(vm, "scenario")

    def _op_datacenter(self, args: dict[str, Any]) -> None:
        """datacenter.cfg as an admin writes it (pvesh set /cluster/options): property strings."""
        for key, val in (args.get("set") or {}).items():
            self.cluster_options[str(key)] = str(val)
        for key in args.get("delete") or []:
            self.cluster_options.pop(str(key), None)

    def _op_grant(self, args: dict[str, Any]) -> None:
        """An admin's `pveum acl modify <path>` for the factory's user and its token."""
        user = self.spec.token_id.split("!")[0]
        for who in (user, self.spec.token_id):
            self.grant(who, str(args["path"]), *args["privs"])

    def _op_revoke(self, args: dict[str, Any]) -> None:
        """An admin's `pveum acl delete <path>` of these privileges, for the factory's user and its token."""
        user, acl = self.spec.token_id.split("!")[0], self.acl or {}
        for who in (user, self.spec.token_id):
            acl[who] = [(p, set(privs) - set(args["privs"])) if p == str(args["path"]) else (p, privs)
                        for p, privs in acl.get(who, [])]

    def _op_release(self, args: dict[str, Any]) -> None:
        self.switch_release(str(args["version"]))

    def _op_edk2_vars(self, args: dict[str, Any]) -> None:
        self.edk2_ms_2023 = bool(args["ms_2023"])

    def _op_thin_pool(self, args: dict[str, Any]) -> None:
        self.storages[THIN_STORAGE]["pool_size"] = int(args["size"])

    def _op_flaky_network(self, args: dict[str, Any]) -> None:
        self.flaky_network(**args)

    def _op_bridge_vlans(self, args: dict[str, Any]) -> None:
        self.bridge_vlans[str(args["bridge"])] = {"bridge_vlan_aware": 1 if args.get("aware", True) else None,
                                                  "bridge_vids": args.get("vids")}

    def _op_slow_network(self, args: dict[str, Any]) -> None:
        self.slow_network(**args)

    async def _op_hold_config_lock(self, args: dict[str, Any]) -> None:
        await self.hold_config_lock(int(args["vmid"]), args.get("secs"))

    def _op_release_config_lock(self, args: dict[str, Any]) -> None:
        self.release_config_lock(int(args["vmid"]))

    def _op_snapshot_lock(self, args: dict[str, Any]) -> None:
        self.snapshot_lock(int(args["vmid"]), args.get("lock", "snapshot"))

    def _op_unlock(self, args: dict[str, Any]) -> None:
        self.unlock(int(args["vmid"]))

    async def _op_hold_storage_lock(self, args: dict[str, Any]) -> None:
        await self.hold_storage_lock(args.get("storage", "local"), args.get("secs"))

    def _op_release_storage_lock(self, args: dict[str, Any]) -> None:
        self.storage_unlock(args.get("storage", "local"), "scenario")

    def _op_durations(self, args: dict[str, Any]) -> None:
        self.extra_durations.update({k: float(v) for k, v in args.items()})

    def _op_time_scale(self, args: dict[str, Any]) -> None:
        self.time_scale = float(args["value"])

    def _op_agent_hangs(self, args: dict[str, Any]) -> None:
        self.find(self.spec.node, int(args["vmid"])).agent_hangs = bool(args.get("value", True))

    def _op_set_node_offline(self, args: dict[str, Any]) -> None:
        self.set_node_offline(self.spec.node, bool(args.get("offline", True)))

    def _op_revoke_tickets(self, args: dict[str, Any]) -> None:
        self.revoke_tickets()

    def _op_snapshot(self, args: dict[str, Any]) -> None:
        vm = self.find(self.spec.node, int(args["vmid"]))
        vm.snapshots[args.get("name", "snap1")] = {"snaptime": int(time.time())}

    def _op_state(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.state()

    async def _op_reset(self, args: dict[str, Any]) -> None:
        await self.reset()

    def state(self) -> dict[str, Any]:
        vms = []
        for vm in self.vms:
            if vm.node != self.spec.node:  # a cluster peer's VM: that node's state lists it
                continue
            proc = self.runners.get(vm.vmid)
            vms.append({"vmid": vm.vmid, "name": vm.name, "status": vm.status, "template": bool(vm.template),
                        "lock": vm.lock, "config": dict(vm.config),
                        "qemu": proc.describe() if proc is not None else None})
        return {"node": self.spec.node, "version": self.version, "time_scale": self.time_scale, "vms": vms,
                "storage_locks": {k: v.holder for k, v in {**self.storage_locks, **self.shared_locks}.items()
                                  if v.holder},
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
        self.shared_locks.clear()
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

