"""Guest agent: relayed to a booted VM's real agent, answered from its config otherwise."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from fakepve import FakeVm, PveError
from fakepve import agent as guest_agent

from image_factory.lab import vmrunner
from image_factory.lab.pve.base import (
    LabNodeBase,
)

# Guest-agent commands relayed to the real agent as guest-<command> without arguments.
FILE_READ_MAX = 16 * 1024 * 1024  # PVE's agent/file-read limit
AGENT_ADDRESS_DELAY = 1.0  # PVE seconds from start until a started VM's agent reports an address
RELAYED = ("ping", "info", "get-host-name", "get-osinfo", "network-get-interfaces", "get-time", "get-timezone",
           "get-users", "get-vcpus", "get-fsinfo")


class GuestAgent(LabNodeBase):  # a concern of LabPve (node.py)
    async def _agent_call(self, match: Any, values: dict[str, Any]) -> Any:
        vm = self.find(values["node"], values["vmid"])
        command = match.template.rsplit("/", 1)[1]
        if not vmrunner.agent_enabled(vm.config):  # stored as written: enabled may stand anywhere
            raise PveError(500, "No QEMU guest agent configured")
        if vm.status != "running":
            raise PveError(500, f"VM {vm.vmid} is not running")
        if vm.agent_hangs:
            await self.pause(10)
            raise PveError(500, f"VM {vm.vmid} qmp command 'guest-ping' failed - got timeout")
        proc = self.runners.get(vm.vmid)
        if proc is not None:
            if not await asyncio.to_thread(proc.guest_up):
                raise PveError(500, "QEMU guest agent is not running")
            return await self._relay(vm, proc, command, values)
        vm.agent = vm.agent or {}
        if command == "network-get-interfaces":
            vm.agent = dict(vm.agent, interfaces=self._interfaces(vm, None))
        elif command == "get-host-name":
            vm.agent = dict(vm.agent)
            vm.agent["get-host-name"] = {"host-name": vm.name}
        guest_agent.record(vm, command, values)
        return guest_agent.result(vm, command, values)

    async def _relay(self, vm: FakeVm, proc: vmrunner.VmProcess, command: str, values: dict[str, Any]) -> Any:
        """The real guest agent answers (through the VM's virtio-serial socket), shaped as PVE shapes it."""
        def ask(cmd: str, args: dict[str, Any] | None = None) -> Any:
            try:
                return proc.agent(cmd, args, timeout=10.0)
            except TimeoutError:
                raise PveError(500, f"VM {vm.vmid} qmp command '{cmd}' failed - got timeout") from None
            except (OSError, ValueError) as exc:
                raise PveError(500, f"VM {vm.vmid} qmp command '{cmd}' failed - {exc}") from None

        if command == "exec":
            argv = values.get("command") or []
            argv = [argv] if isinstance(argv, str) else list(argv)
            args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
            if values.get("input-data"):
                args["input-data"] = base64.b64encode(str(values["input-data"]).encode()).decode()
            return await asyncio.to_thread(ask, "guest-exec", args)
        if command == "exec-status":
            result: dict[str, Any] = dict(await asyncio.to_thread(ask, "guest-exec-status",
                                                                  {"pid": int(values["pid"])}))
            for key in ("out-data", "err-data"):
                if key in result:
                    result[key] = base64.b64decode(result[key]).decode(errors="replace")
            return result
        if command == "file-read":
            return await asyncio.to_thread(self._relay_file_read, vm, ask, str(values["file"]))
        if command not in RELAYED:
            raise PveError(500, f"VM {vm.vmid} qmp command 'guest-{command}' failed - not supported by the lab")
        answer = await asyncio.to_thread(ask, "guest-" + command)
        if command == "network-get-interfaces":
            answer = self._with_lab_address(vm, proc, answer)
        return {"result": answer}

    @staticmethod
    def _relay_file_read(vm: FakeVm, ask: Any, path: str) -> dict[str, Any]:
        """PVE's agent/file-read: guest-file-open, -read (up to 16 MiB), -close; content decoded."""
        handle = ask("guest-file-open", {"path": path, "mode": "r"})
        try:
            chunk = ask("guest-file-read", {"handle": handle, "count": FILE_READ_MAX})
        finally:
            ask("guest-file-close", {"handle": handle})
        data = base64.b64decode(chunk.get("buf-b64", ""))
        answer: dict[str, Any] = {"content": data.decode(errors="replace")}
        if not chunk.get("eof", True):
            answer["truncated"] = True
        return answer

    def _with_lab_address(self, vm: FakeVm, proc: vmrunner.VmProcess, interfaces: Any) -> Any:
        """Add the VM's lab address to the guest NIC that has the first NIC's MAC, once the guest has given that
        NIC an IPv4 address of its own: the host reaches the guest's port 22 there (qemu's 1:1 forward to that
        address), as it would reach the guest's own address on a LAN. A guest whose network setup failed (no
        address of its own) shows none, as the real one would."""
        if not proc.nics:
            return interfaces
        mac = proc.nics[0][1].lower()
        lab_ip = {"ip-address": vmrunner.vm_address(self.spec.slot, vm.vmid), "ip-address-type": "ipv4",
                  "prefix": 32}
        for iface in interfaces or []:
            own = list(iface.get("ip-addresses") or [])
            if str(iface.get("hardware-address", "")).lower() == mac and any(
                    a.get("ip-address-type") == "ipv4" for a in own):
                iface["ip-addresses"] = [lab_ip, *own]
        return interfaces

    def _interfaces(self, vm: FakeVm, proc: vmrunner.VmProcess | None) -> list[dict[str, Any]]:
        """What the guest has: its NICs with the MACs qemu gives them; the first one is reachable from
        the host at the VM's lab address (a 1:1 forward of port 22 to the guest)."""
        out: list[dict[str, Any]] = [{
            "name": "lo", "hardware-address": "00:00:00:00:00:00",
            "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8}],
        }]
        nics = proc.nics if proc is not None else vmrunner.nics_of(vm.config)
        # A real guest's agent answers before DHCP has given it an address: so does the lab's, for the
        # first AGENT_ADDRESS_DELAY PVE seconds after the start.
        addressed = proc is not None or (time.time() - float(getattr(vm, "started_at", None) or 0)
                                         >= AGENT_ADDRESS_DELAY * self.time_scale)
        for n, (_key, mac) in enumerate(nics):
            item: dict[str, Any] = {"name": f"eth{n}", "hardware-address": mac.lower(), "ip-addresses": []}
            if n == 0 and addressed:
                item["ip-addresses"].append({"ip-address": vmrunner.vm_address(self.spec.slot, vm.vmid),
                                             "ip-address-type": "ipv4", "prefix": 32})
            out.append(item)
        return out

