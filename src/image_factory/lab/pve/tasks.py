"""Tasks: PVE's `WARNINGS: n` exit status and the node's task list."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from fakepve.server import USER, ok
from fakepve.server import params as request_params

from image_factory.lab.pve.base import (
    TASK_WARNINGS,
    LabNodeBase,
)


class Tasks(LabNodeBase):  # a concern of LabPve (node.py)
    async def task(self, node: str, ttype: str, tid: Any, user: str, body: Any, vm: Any = None, lock: bool = True,
                   log: Any = ()) -> str:
        """fakepve's task, plus PVE's `WARNINGS: n` exit status for warnings a worker printed (task_warn)."""
        warnings: list[str] = []
        box: dict[str, str] = {}

        def fix() -> None:
            record = self.tasks.get(box.get("upid", ""))
            if record is None or record.get("exitstatus") != "OK":
                return
            record["exitstatus"] = f"WARNINGS: {len(warnings)}"
            lines = record["log"]
            if lines and lines[-1] == "TASK OK":
                lines.pop()
            lines.extend(f"WARN: {w}" for w in warnings)
            lines.append(f"TASK WARNINGS: {len(warnings)}")

        async def wrapped() -> Any:
            token = TASK_WARNINGS.set(warnings)
            try:
                note = await body()
            finally:
                TASK_WARNINGS.reset(token)
            if warnings and "upid" in box:
                asyncio.get_running_loop().call_soon(fix)  # after fakepve records the exit status
            return note

        upid: str = await super().task(node, ttype, tid, user, wrapped, vm=vm, lock=lock, log=log)
        box["upid"] = upid
        if warnings and self.tasks.get(upid, {}).get("status") == "stopped":
            fix()  # the task ran inside the request (time_scale 0)
        return upid

    async def _task_list(self, request: web.Request) -> web.Response:
        """pve-manager's node_tasks (API2/Tasks.pm): `source` archive (the default: ended tasks), active
        (running ones, `status: "RUNNING"`, no endtime) or all; a token's task shows `user` without the token
        part and `tokenid`; ended tasks carry their exit status in `status`; newest first."""
        p = self._verify(request, await request_params(request))
        node, user = request.match_info["node"], request[USER]
        source = str(p.get("source") or "archive")
        audit = self.allowed(user, f"/nodes/{node}", "Sys.Audit")
        rows = []
        for task in self.tasklog:
            running = task.get("status") == "running"
            if task["node"] != node or (running and source == "archive") or (not running and source == "active"):
                continue
            if not (audit or self._task_owner(user, task)):
                continue
            if p.get("vmid") is not None and task["id"] != str(p["vmid"]):
                continue
            if p.get("typefilter") and task["type"] != p["typefilter"]:
                continue
            row = {k: val for k, val in task.items() if k not in ("log", "exitstatus", "status")}
            owner, _, tokenid = str(task["user"]).partition("!")
            row["user"] = owner
            if tokenid:
                row["tokenid"] = tokenid
            row["status"] = "RUNNING" if running else task.get("exitstatus", "unknown")
            rows.append(row)
        rows.sort(key=lambda t: -int(t["starttime"]))
        start = int(p.get("start") or 0)
        return ok(rows[start:start + int(p.get("limit") or 50)])

