"""Power: start, stop, reboot and the QMP actions of a VM, with a real qemu where the VM boots for real."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from fakepve import FakeVm, PveError, TaskError
from fakepve.qemu import drives_of

from image_factory.lab import vmrunner
from image_factory.lab.pve.base import (
    LabNodeBase,
)


class Power(LabNodeBase):  # a concern of LabPve (node.py)
    def _boots_for_real(self, vm: FakeVm) -> bool:
        rb = self.spec.real_boot
        if rb == "all":
            return True
        if rb == "none":
            return False
        return vm.name in rb

    async def _do_start(self, vm: FakeVm, user: str, p: dict[str, Any]) -> str:
        self.check_own_schema("POST", "/nodes/{node}/qemu/{vmid}/status/start", p)  # fakepve validates none

        async def body() -> None:
            if vm.template:
                raise TaskError("you can't start a vm if it's a template")
            if vm.lock and vm.lock != "suspended":
                raise TaskError(f"VM is locked ({vm.lock})")
            if vm.status == "running":
                raise TaskError(f"VM {vm.vmid} already running")
            await self.duration("start")
            if vm.start_error:
                raise TaskError(vm.start_error)
            vm.apply_pending()
            self.check_cicustom_files(vm)
            if self._boots_for_real(vm):
                proc = await asyncio.to_thread(self._launch, vm)
                self.runners[vm.vmid] = proc
            vm.status = vm.qmpstatus = "running"
            vm.started_at = time.time()
        upid: str = await self.task(vm.node, "qmstart", vm.vmid, user, body, vm=vm)
        return upid

    def _launch(self, vm: FakeVm) -> vmrunner.VmProcess:
        disks = {}
        for key, volume, props in drives_of(vm.config):
            path = self.volume_file(volume)
            disks[key] = (volume, props, path)
        try:
            return vmrunner.launch(
                vmid=vm.vmid, name=vm.name, config=dict(vm.config), disks=disks,
                address=vmrunner.vm_address(self.spec.slot, vm.vmid), vms_dir=self.spec.vms_dir,
                log_dir=self.spec.log_dir, memory_cap=self.spec.vm_memory_cap, node=self.spec.node,
                vendor_data=self.vendor_data(vm),
            )
        except vmrunner.LaunchError as e:
            raise TaskError(str(e)) from e

    def _stop_runner(self, vm: FakeVm) -> None:
        proc = self.runners.pop(vm.vmid, None)
        if proc is not None:
            proc.stop()

    async def _do_reboot(self, vm: FakeVm, user: str, p: dict[str, Any]) -> str:
        """Guest power-off (ACPI), then a fresh qemu with the pending changes and a new cloud-init seed."""
        self._need_running(vm)
        self._check_lock(vm)

        async def body() -> None:
            await self._powerdown(vm, p)
            vm.apply_pending()
            if self._boots_for_real(vm):
                self.runners[vm.vmid] = await asyncio.to_thread(self._launch, vm)
            vm.status = vm.qmpstatus = "running"
            vm.started_at = time.time()
        upid: str = await self.task(vm.node, "qmreboot", vm.vmid, user, body, vm=vm)
        return upid

    async def _qmp_action(self, vm: FakeVm, user: str, ttype: str, command: str, state: str | None) -> str:
        self._need_running(vm)
        if ttype != "qmresume":
            self._check_lock(vm)

        async def body() -> None:
            proc = self.runners.get(vm.vmid)
            if proc is not None:
                try:
                    await asyncio.to_thread(proc.qmp_command, command)
                except OSError as exc:
                    raise TaskError(f"VM {vm.vmid} qmp command '{command}' failed - {exc}") from None
            if state is not None:
                vm.qmpstatus = state
            else:
                vm.started_at = time.time()
        upid: str = await self.task(vm.node, ttype, vm.vmid, user, body, vm=vm)
        return upid

    async def _do_reset(self, vm: FakeVm, user: str, p: dict[str, Any]) -> str:
        return await self._qmp_action(vm, user, "qmreset", "system_reset", None)

    async def _do_suspend(self, vm: FakeVm, user: str, p: dict[str, Any]) -> str:
        if str(p.get("todisk", "0")) in ("1", "true"):
            raise PveError(500, "suspend to disk is not supported by the lab")
        return await self._qmp_action(vm, user, "qmsuspend", "stop", "paused")

    async def _do_resume(self, vm: FakeVm, user: str, p: dict[str, Any]) -> str:
        return await self._qmp_action(vm, user, "qmresume", "cont", "running")

    async def _do_stop(self, vm: FakeVm, user: str, p: dict[str, Any]) -> str:
        if not p.get("skiplock"):
            self._check_lock(vm)

        async def body() -> None:
            await self.duration("stop")
            await asyncio.to_thread(self._stop_runner, vm)
            vm.status = vm.qmpstatus = "stopped"
        upid: str = await self.task(vm.node, "qmstop", vm.vmid, user, body, vm=vm)
        return upid

    async def _powerdown(self, vm: FakeVm, p: dict[str, Any]) -> str | None:
        proc = self.runners.get(vm.vmid)
        if proc is None:
            result: str | None = await super()._powerdown(vm, p)
            return result
        timeout = int(p.get("timeout") or self.shutdown_default_timeout)
        if await asyncio.to_thread(proc.powerdown, timeout * (self.time_scale or 1)):
            self.runners.pop(vm.vmid, None)
            vm.status = vm.qmpstatus = "stopped"
            return None
        if str(p.get("forceStop", "0")) in ("1", "true"):
            await asyncio.to_thread(self._stop_runner, vm)
            vm.status = vm.qmpstatus = "stopped"
            return "VM still running - terminating now with SIGTERM"
        raise TaskError("VM quit/powerdown failed - got timeout")

    async def _reconcile(self) -> None:
        """A guest that powers itself off stops its qemu: the VM is stopped, as PVE shows it."""
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(OSError, TypeError, ValueError):
                await self.persist_state()
            for vmid, proc in list(self.runners.items()):
                if not proc.alive():
                    self.runners.pop(vmid, None)
                    vm = self.vm(vmid)
                    if vm is not None:
                        vm.status = vm.qmpstatus = "stopped"

