"""Storage: the real files behind `local` (dir) and `local-lvm` (LVM-thin), their lock and space."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from fakepve import FakeVm, PveError, TaskError
from fakepve.lxc import to_base
from fakepve.qemu import volume_ref

from image_factory.lab.pve.base import (
    IMPORT_LIST,
    ISO_NAME,
    TASK_WARNINGS,
    THIN_POOL_SIZE,
    VZTMPL_NAME,
    LabNodeBase,
    StorageLock,
    convert_into,
    qemu_img_info,
    run_tool,
)

STORAGE_LOCK_WAIT = 10  # PVE seconds (cfs_lock_storage / lock_file timeout)


class Storage(LabNodeBase):  # a concern of LabPve (node.py)
    def volume_file(self, volid: str) -> Path | None:
        """The real file behind a volume id of a directory storage, or None."""
        sid, name = volume_ref(volid)
        store = self.storages.get(sid) if sid else None
        if store is not None and store.get("type") == "lvmthin":
            return self.thin_dir / name.split("/")[-1]
        if store is None or store.get("type") != "dir" or not store.get("path"):
            return None
        base = Path(store["path"])
        if name.startswith(("import/", "snippets/")):
            return base / name
        if name.startswith("iso/"):
            return base / "template" / name
        if name.startswith("vztmpl/"):
            return base / "template" / "cache" / name.split("/", 1)[1]
        if name.startswith("backup/"):
            return base / "dump" / name.split("/", 1)[1]
        parts = name.split("/")
        # <vmid>/<file> or, for a linked clone, <basevmid>/<basefile>/<vmid>/<file>
        return base / "images" / parts[-2] / parts[-1]

    def _volumes(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = dict(super()._volumes(name))
        store = self.storages[name]
        if store.get("type") != "dir" or not store.get("path"):
            return out
        base = Path(store["path"])
        for sub, content, pattern in (("import", "import", IMPORT_LIST), ("template/iso", "iso", ISO_NAME),
                                      ("template/cache", "vztmpl", VZTMPL_NAME)):
            folder = base / sub
            if not folder.is_dir():
                continue
            for entry in sorted(folder.iterdir()):
                if not entry.is_file() or not pattern.match(entry.name) or entry.name.endswith(".tmp"):
                    continue
                prefix = {"import": "import/", "iso": "iso/", "vztmpl": "vztmpl/"}[content]
                st = entry.stat()
                fmt = entry.name.rsplit(".", 1)[-1] if content == "import" else ("iso" if content == "iso" else
                                                                                  "tgz")
                out[prefix + entry.name] = {"content": content, "format": fmt, "size": st.st_size,
                                            "ctime": int(st.st_mtime)}
        # Real sizes of allocated image files.
        for volname, vol in list(out.items()):
            if vol.get("content") == "images":
                path = self.volume_file(f"{name}:{volname}")
                if path is not None and not path.exists():
                    continue
        return out

    def _parse_volname(self, store: dict[str, Any], volname: str) -> Any:
        if volname.startswith("import/"):
            if not IMPORT_LIST.match(volname.split("/", 1)[1]):
                raise PveError(500, f"unable to parse directory volume name '{volname}'")
            return "import", None, volname.rsplit(".", 1)[-1]
        return super()._parse_volname(store, volname)

    async def storage_lock(self, sid: str, holder: str) -> None:
        """PVE's storage lock (Plugin::cluster_lock_storage): a local storage's is a flock on the node
        (lock_file), a shared storage's the cluster's cfs lock ``storage-<sid>``, a directory in /etc/pve/priv/lock
        (cfs_lock_storage). Either waits up to 10 PVE seconds, then fails with PVE's timeout error."""
        lock = self._lock_table(sid).setdefault(sid, StorageLock())
        deadline = time.monotonic() + STORAGE_LOCK_WAIT * self.time_scale
        if lock.holder is not None and self.time_scale:
            while lock.holder is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                lock.released.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(lock.released.wait(), remaining)
        if lock.holder is not None:
            raise TaskError(self._lock_timeout(sid))
        lock.holder = holder
        try:
            await self._cfs_lock(sid, deadline)
        except TaskError:
            lock.holder = None
            lock.released.set()
            raise

    def _cfs_lock_dir(self, sid: str) -> Path | None:
        if not self.cluster_spec or not (self.storages.get(sid) or {}).get("shared"):
            return None
        return Path(self.cluster_spec["etc_pve"]) / "priv" / "lock" / f"storage-{sid}"

    async def _cfs_lock(self, sid: str, deadline: float) -> None:
        """cfs_lock: mkdir of the lock directory, retried until the deadline (a client holding it over SSH, as
        an admin's or the factory's own cluster lock would, keeps PVE waiting too)."""
        path = self._cfs_lock_dir(sid)
        while path is not None:
            try:
                path.mkdir()
                return
            except FileExistsError:
                remaining = deadline - time.monotonic()
                if not self.time_scale or remaining <= 0:
                    raise TaskError(self._lock_timeout(sid)) from None
                with contextlib.suppress(OSError):  # cfs_lock's unlock request (pmxcfs.py): a dead holder's goes
                    os.utime(path, (0, 0))
                await asyncio.sleep(min(0.1, remaining))

    def _lock_timeout(self, sid: str) -> str:
        if self._cfs_lock_dir(sid) is not None:
            return f"cfs-lock 'storage-{sid}' error: got lock request timeout"
        return f"can't lock file '/var/lock/pve-manager/pve-storage-{sid}' - got timeout"

    def _lock_table(self, sid: str) -> dict[str, StorageLock]:
        """A shared storage's lock is the cluster's (cfs_lock_storage locks shared storage in /etc/pve), a
        local one the node's own."""
        return self.shared_locks if (self.storages.get(sid) or {}).get("shared") else self.storage_locks

    def storage_unlock(self, sid: str, holder: str) -> None:
        lock = self._lock_table(sid).get(sid)
        if lock and lock.holder == holder:
            path = self._cfs_lock_dir(sid)
            if path is not None:
                with contextlib.suppress(OSError):
                    path.rmdir()
            lock.holder = None
            lock.released.set()

    async def hold_storage_lock(self, sid: str, secs: float | None) -> None:
        """Fault hook: another worker holds the storage lock for secs PVE seconds (None: until released)."""
        await self.storage_lock(sid, "scenario")
        if secs is not None:
            async def later() -> None:
                await self.pause(secs)
                self.storage_unlock(sid, "scenario")
            asyncio.ensure_future(later())

    def _space(self, store: dict[str, Any]) -> tuple[int, int, int]:
        """A directory storage reports its real filesystem, as PVE's dir plugin does; an LVM-thin pool its data
        space (LvmThinPlugin status: the pool's size and its data_percent): the blocks its volumes really hold,
        whatever their virtual sizes (thin volumes overcommit)."""
        if store.get("type") == "dir" and store.get("path") and Path(store["path"]).is_dir():
            usage = shutil.disk_usage(store["path"])
            return usage.total, usage.used, usage.free
        if store.get("type") == "lvmthin":
            total = int(store.get("pool_size") or THIN_POOL_SIZE)
            used = sum(e.stat().st_blocks * 512 for e in self.thin_dir.iterdir() if e.is_file()) \
                if self.thin_dir.is_dir() else 0
            return total, used, max(total - used, 0)
        result: tuple[int, int, int] = super()._space(store)
        return result

    def _qm_alloc(self, sid: str, vmid: int, fmt: str | None, size: int,
                  linked_from: str | None = None) -> tuple[str, str]:
        if linked_from is not None and self.storages[sid].get("type") == "dir":
            fmt = "qcow2"  # Plugin::clone_image: a qcow2 overlay whatever the base's format
        volid, fmt = super()._qm_alloc(sid, vmid, fmt, size, linked_from)
        path = self.volume_file(volid)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if linked_from is None:
                run_tool(["qemu-img", "create", "-q", "-f", fmt, str(path), str(max(size, 1024 * 1024))])
        return volid, fmt

    def _alloc_named(self, sid: str, vmid: int, volname_base: str, fmt: str, size: int) -> str:
        """Allocate a volume with a fixed name (vm-<id>-cloudinit)."""
        store = self.storages[sid]
        is_dir = store.get("type") == "dir"
        volname = f"{vmid}/{volname_base}.{fmt}" if is_dir else volname_base
        volumes = store.setdefault("volumes", {})
        if volname in volumes:
            raise PveError(500, f"disk image '{self._volume_path(sid, volname, 'images')}' already exists")
        volumes[volname] = {"content": "images", "format": fmt if is_dir else "raw", "size": size, "vmid": vmid,
                            "ctime": int(time.time())}
        volid = f"{sid}:{volname}"
        path = self.volume_file(volid)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            run_tool(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)])
        return volid

    def _qm_free(self, volid: str) -> None:
        sid, name = volume_ref(volid)
        if sid in self.storages and re.search(r"(^|/)base-\d+-disk-\d+", name):
            base = name.split("/")[-2:]
            prefix = "/".join(base) + "/"
            if any(v.startswith(prefix) for v in self.storages[sid].get("volumes", {})):
                # PVE: "base volume ... is still in use by linked cloned" -- destroy_vm only warns, the disk stays
                warnings = TASK_WARNINGS.get(None)
                if warnings is not None:
                    warnings.append(f"Could not remove disk '{volid}', check manually: base volume "
                                    f"'{name}' is still in use by linked cloned")
                return
        path = self.volume_file(volid)
        if sid in self.storages and self.storages[sid].get("type") == "lvmthin" and path is not None:
            self._detach_thin_snapshots(path)
        super()._qm_free(volid)
        if path is not None and path.exists() and ("/images/" in str(path) or path.parent == self.thin_dir):
            path.unlink()
            with contextlib.suppress(OSError):
                path.parent.rmdir()

    def _detach_thin_snapshots(self, base: Path) -> None:
        """LVM-thin keeps a linked clone (a thin snapshot) when its base volume is removed, and its volume id
        never names the base (LvmThinPlugin): the lab's clone is a qcow2 overlay, so it takes in the base's
        data first and stays whole."""
        for entry in sorted(self.thin_dir.iterdir()):
            if entry == base or not entry.is_file():
                continue
            info = qemu_img_info(entry)
            if info.get("format") == "qcow2" and Path(str(info.get("backing-filename", ""))).name == base.name:
                run_tool(["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", str(entry)])

    def _qm_rename_volume(self, volid: str) -> str:
        sid, name = volume_ref(volid)
        old_path, new_path = self.volume_file(volid), self.volume_file(f"{sid}:{to_base(name)}")
        if old_path is None or new_path is None or old_path == new_path:
            return str(super()._qm_rename_volume(volid))
        if new_path.exists():  # lvrename and a dir storage's rename both refuse an existing name
            raise TaskError(f"rename volume '{volid}' failed: '{new_path.name}' already exists")
        new: str = super()._qm_rename_volume(volid)
        if old_path.exists():
            old_path.rename(new_path)
            with contextlib.suppress(OSError):
                new_path.chmod(0o444)  # PVE makes base images read-only
        return new

    async def _copy_disk(self, src: Path, src_fmt: str, volid: str, fmt: str, sid: str, holder: str) -> None:
        dest = self.volume_file(volid)
        await self.storage_lock(sid, holder)
        try:
            await self.duration("import")
            if dest is not None:
                await asyncio.to_thread(convert_into, src, src_fmt, dest, fmt)
        finally:
            self.storage_unlock(sid, holder)

    async def ceph_io(self, vm: FakeVm, keys: Any = None) -> None:
        """fakepve calls this at the I/O step of create, clone and start tasks: the lab's real I/O runs here."""
        await super().ceph_io(vm, keys)
        work = self._pending_io.pop(vm.vmid, [])
        for job in work:
            await job()
        for job in self._after_io.pop(vm.vmid, []):
            await job()

