"""A node's /etc/pve: VM configs and volumes saved and restored across a restart of the lab."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

from fakepve import FakeVm

from image_factory.lab.pve.base import (
    LabNodeBase,
)


class StatePersistence(LabNodeBase):  # a concern of LabPve (node.py)
    @property
    def state_file(self) -> Path:
        return self.spec.vms_dir.parent / "api-state.json"

    def save_state(self) -> None:
        """Like a node's /etc/pve: VM configs and volumes survive a restart of the lab (lab.down, lab.up)."""
        self._write_state(self._state_text())

    async def persist_state(self) -> None:
        """save_state without holding up the API: the file is replaced in a thread, and only when it changed.
        Under the writeback of a large import, replacing a file waits on the filesystem's journal (a 0.23 s
        rename was measured on the event loop, and every request of that node waited with it)."""
        text = self._state_text()
        if text == self._saved_state:
            return
        await asyncio.to_thread(self._write_state, text)
        self._saved_state = text

    def _state_text(self) -> str:
        # a cluster node saves its own VMs and, of a shared storage, their volumes: its peers save theirs
        own = [vm for vm in self.vms if vm.node == self.spec.node]
        vms = [{"vmid": vm.vmid, "name": vm.name, "config": vm.config, "pending": vm.pending,
                "template": bool(vm.template), "snapshots": vm.snapshots, "lock": vm.lock} for vm in own]
        owned = {str(vm.vmid) for vm in own}
        volumes = {sid: {k: v for k, v in store.get("volumes", {}).items()
                         if not store.get("shared") or str(v.get("vmid")) in owned}
                   for sid, store in self.storages.items()}
        return json.dumps({"node": self.spec.node, "vms": vms, "volumes": volumes}, indent=1)

    def _write_state(self, text: str) -> None:
        # one writer at a time: shutdown's final save waits for a write still running in the thread
        with self._state_write_lock:
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(self.state_file)

    def _restore_or_wipe(self) -> None:
        """Restore the saved API state (VMs come back stopped); disks no VM owns any more are dropped."""
        keep: set[str] = set()
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("node") == self.spec.node:
            for item in state.get("vms", []):
                vm = FakeVm(int(item["vmid"]), item["name"], node=self.spec.node, config=item["config"],
                            pending=item.get("pending"), template=item.get("template", False),
                            lock=item.get("lock") if item.get("lock") not in ("clone", "create") else None)
                vm.snapshots = item.get("snapshots") or {}
                self.vms.append(vm)
                keep.add(str(vm.vmid))
            for sid, vols in (state.get("volumes") or {}).items():
                if sid in self.storages:
                    self.storages[sid]["volumes"] = {k: v for k, v in vols.items()
                                                     if str(v.get("vmid")) in keep}
        images = self.spec.storage_dir / "images"
        for entry in images.iterdir() if images.is_dir() else []:
            if entry.is_dir() and entry.name not in keep:
                shutil.rmtree(entry)
        for entry in self.thin_dir.iterdir() if self.thin_dir.is_dir() else []:
            owner = re.match(r"(?:vm|base)-(\d+)-", entry.name)
            if owner is None or owner[1] not in keep:
                entry.unlink()
        for entry in self.spec.staging_dir.glob("pveupload-*"):
            entry.unlink()

