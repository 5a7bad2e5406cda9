"""Clones and templates: full and linked clones with real disk copies, destroy and template conversion."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from fakepve import FakeVm, TaskError
from fakepve.qemu import DRIVE_KEY, drives_of, join_drive, split_drive, volume_ref

from image_factory.lab.pve.base import (
    CLOUDINIT_SIZE,
    TPMSTATE_SIZE,
    LabNodeBase,
    convert_into,
    copy_efi_vars,
    efi_vars_template,
    qemu_img_info,
    run_tool,
)


class Clones(LabNodeBase):  # a concern of LabPve (node.py)
    async def _qm_clone(self, v: dict[str, Any], user: str) -> str:
        node, vmid, newid = v["node"], int(v["vmid"]), int(v["newid"])
        src = self.find(node, vmid)
        snapname = v.get("snapname")
        old = src.snapshots[snapname] if snapname and snapname in src.snapshots else src.config
        full = v.get("full")
        full = (not src.template) if full is None else str(full) in ("1", "true", "True")
        storage = v.get("storage")
        sources = {opt: split_drive(str(val))[0] for opt, val in old.items() if DRIVE_KEY.match(opt)}
        self._check_bridge_access(user, old)  # qemu-server clone_vm: check_bridge_access on the source config
        upid: str = await super()._qm_clone(v, user)
        new = self.vm(newid)
        if new is None or self.tasks[upid]["status"] == "stopped":
            return upid

        async def io() -> None:
            made: list[str] = []
            # The clone holds the target storage's lock while it allocates and copies (cfs_lock_storage).
            lock_sid = storage or next((volume_ref(v)[0] for v in sources.values() if volume_ref(v)[0]), "local")
            holder = f"clone {newid}"
            try:
                await self.storage_lock(lock_sid, holder)
                try:
                    await self.duration("clone_full" if full else "clone_linked")
                    for opt, _vol, props in drives_of(dict(new.config)):
                        if opt in sources:
                            await self._clone_disk(new, opt, sources[opt], dict(props), storage, full, made)
                finally:
                    self.storage_unlock(lock_sid, holder)
            except BaseException:
                for volid in made:
                    self._qm_free(volid)
                raise

        self._pending_io.setdefault(newid, []).append(io)
        return upid

    async def _clone_disk(self, new: FakeVm, opt: str, src_vol: str, props: dict[str, str], storage: str | None,
                          full: bool, made: list[str]) -> None:
        """One drive of a clone: a fresh cloud-init volume; a full copy (and always of the TPM state); or a
        qcow2 overlay of the template's base file."""
        if re.search(r"vm-\d+-cloudinit", src_vol):
            sid = storage or volume_ref(src_vol)[0]
            fmt = "qcow2" if self.storages[sid].get("type") == "dir" else "raw"
            volid = self._alloc_named(sid, new.vmid, f"vm-{new.vmid}-cloudinit", fmt, CLOUDINIT_SIZE)
            made.append(volid)
            new.config[opt] = join_drive(volid, props)
            return
        dst_vol = split_drive(new.config[opt])[0]
        if opt == "tpmstate0" and not full:
            dst_vol = self._full_tpm_volume(new, src_vol, dst_vol, made)
        src_path, dst_path = self.volume_file(src_vol), self.volume_file(dst_vol)
        if src_path is None or dst_path is None or not src_path.exists():
            return
        sid = volume_ref(dst_vol)[0]
        info = await asyncio.to_thread(qemu_img_info, src_path)
        if full and opt == "efidisk0":  # clone_disk: the vars template's size (efisize), `qemu-img dd osize=`
            fmt = self._volumes(sid).get(volume_ref(dst_vol)[1], {}).get("format") or "raw"
            size = efi_vars_template(props).stat().st_size
            await asyncio.to_thread(copy_efi_vars, src_path, str(info["format"]), dst_path, fmt, size)
        elif full or opt == "tpmstate0":
            fmt = self._volumes(sid).get(volume_ref(dst_vol)[1], {}).get("format") or "raw"
            await asyncio.to_thread(convert_into, src_path, str(info["format"]), dst_path, fmt)
        else:
            dst_path.parent.mkdir(parents=True, exist_ok=True)
            rel = Path("..") / src_path.parent.name / src_path.name
            await asyncio.to_thread(run_tool, ["qemu-img", "create", "-q", "-f", "qcow2", "-F",
                                               str(info["format"]), "-b", str(rel), str(dst_path)])

    def _full_tpm_volume(self, new: FakeVm, src_vol: str, linked_vol: str, made: list[str]) -> str:
        """qemu-server clone_vm: a linked clone still copies the TPM state in full (8.3.3 "always do a full clone
        of tpmstate volumes"; raw before 9.0.26): the linked volume fakepve made is replaced by a plain one."""
        sid, name = volume_ref(src_vol)
        assert sid is not None
        fmt = "raw" if not self.qemu_at_least(9, 0, 26) else self._volumes(sid).get(name, {}).get("format")
        self._qm_free(linked_vol)
        volid, _fmt = self._qm_alloc(sid, new.vmid, fmt, TPMSTATE_SIZE)
        made.append(volid)
        new.config["tpmstate0"] = join_drive(volid, dict(split_drive(new.config["tpmstate0"])[1]))
        return volid

    async def _qm_destroy(self, v: dict[str, Any], user: str) -> str:
        """qemu-server's destroy_vm refuses a template whose base volume still backs a linked clone, before it
        removes anything (PVE::Storage::volume_is_base_and_used). A dir storage sees its clones (their volume
        names carry the base's); LVM-thin's list_images does not, so there the template goes and its clones
        stay whole (see _qm_free)."""
        vm = self.find(v["node"], v["vmid"])
        used = [volume for _key, volume, _props in drives_of(vm.config)
                if vm.template and self._base_in_use(volume)]
        if used and vm.status != "running":
            async def refuse() -> None:
                raise TaskError(f"base volume '{used[0]}' is still in use by linked cloned")
            upid: str = await self.task(vm.node, "qmdestroy", vm.vmid, user, refuse, vm=vm)
            return upid
        result: str = await super()._qm_destroy(v, user)
        return result

    def _base_in_use(self, volid: str) -> bool:
        sid, name = volume_ref(volid)
        if sid not in self.storages or self.storages[sid].get("type") != "dir":
            return False
        if not re.search(r"(^|/)base-\d+-disk-\d+", name):
            return False
        prefix = "/".join(name.split("/")[-2:]) + "/"
        return any(vol.startswith(prefix) for vol in self.storages[sid].get("volumes", {}))

    async def _qm_template(self, v: dict[str, Any], user: str) -> str:
        vm = self.find(v["node"], v["vmid"])
        self._check_lock(vm)
        upid: str = await super()._qm_template(v, user)
        return upid

