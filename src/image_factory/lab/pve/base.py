"""The node every concern of LabPve builds on: its release, durations, storages and the disk tools."""

from __future__ import annotations

import asyncio
import contextvars
import copy
import hashlib
import json
import logging
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

from aiohttp import web
from fakepve import FakePve, FakeVm, TaskError

from image_factory.lab import vmrunner
from image_factory.lab.spec import RELEASES, THIN_STORAGE, NodeSpec, release_of, version_tuple

log = logging.getLogger("image_factory.lab")
# Warnings of the task worker running in this context (PVE's log_warn): the task ends "WARNINGS: n".
TASK_WARNINGS: contextvars.ContextVar[list[str]] = contextvars.ContextVar("lab_task_warnings")
IMPORT_NAME = re.compile(r"^[a-zA-Z0-9\-.+=_]+\.(ova|qcow2|raw|vmdk)$")
IMPORT_LIST = re.compile(r"^[^/\s]+\.(ova|ovf|qcow2|raw|vmdk)$")
ISO_NAME = re.compile(r"^[a-zA-Z0-9\-.+=_]+\.(iso|img)$")
VZTMPL_NAME = re.compile(r"^[a-zA-Z0-9\-.+=_]+\.tar\.(gz|xz|zst|bz2)$")
CLOUDINIT_SIZE = 4 * 1024 ** 2
THIN_POOL_SIZE = 100 * 1024 ** 3  # a lab node's LVM-thin pool (control op thin_pool sets another)
# PVE-like durations (PVE seconds) when durations are on.
DURATIONS = {"clone_full": 8.0, "clone_linked": 2.0, "import": 6.0, "template": 2.0, "start": 2.0, "stop": 1.0,
             "create": 1.0, "imgcopy": 2.0}
LOCAL_CONTENT = "backup,images,import,iso,rootdir,snippets,vztmpl"
TPMSTATE_SIZE = 4 * 1024 ** 2  # Drive.pm TPMSTATE_DISK_SIZE
SHARED_CONTENT = "images,import"  # a cluster's shared storage


def qemu_img_info(path: Path) -> dict[str, Any]:
    proc = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise TaskError(
            f"could not parse qemu-img info command output for '{path}' - {proc.stderr.strip() or 'no output'}"
        )
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def run_tool(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TaskError(f"{argv[0]} failed: {proc.stderr.strip()}")


def convert_into(src: Path, src_fmt: str, dest: Path, fmt: str) -> None:
    """Copy a disk as PVE's QemuImage::convert does: into the volume vdisk_alloc already made (``-n``), so
    a raw target stays the sparse volume it was and is not created a second time."""
    keep = ["-n"] if dest.exists() else []
    run_tool(["qemu-img", "convert", "-q", *keep, "-f", src_fmt, "-O", fmt, str(src), str(dest)])


class StorageLock:
    """PVE's per-storage allocation lock (a flock with a timeout)."""

    def __init__(self) -> None:
        self.holder: str | None = None
        self.released = asyncio.Event()


def config_digest(vm: FakeVm) -> str:
    """qemu-server's parse_vm_config: the SHA-1 of the whole config file as write_vm_config lays it out (the
    description as comment lines, the current keys, then the [PENDING] section and each snapshot's), so a
    pending change or a snapshot changes the digest as much as a current value does."""
    def section(conf: dict[str, Any]) -> list[str]:
        lines = [f"#{line}" for line in str(conf.get("description") or "").splitlines()]
        return lines + [f"{key}: {value}" for key, value in sorted(conf.items())
                        if key != "description" and value is not None]

    text = section(vm.config)
    if vm.pending:
        deleted = sorted(key for key, value in vm.pending.items() if value is None)
        text += ["", "[PENDING]", *section(vm.pending)] + ([f"delete: {','.join(deleted)}"] if deleted else [])
    for name, snap in sorted((vm.snapshots or {}).items()):
        text += ["", f"[{name}]", *section(snap)]
    return hashlib.sha1("\n".join(text).encode() + b"\n").hexdigest()  # noqa: S324 - PVE's digest is SHA-1


class LabNodeBase(FakePve):  # fakepve is untyped
    def __init__(self, spec: NodeSpec):
        root_password = spec.root_password_file.read_text().strip()
        super().__init__(user="root@pam", password=root_password, host=spec.address, port=spec.port)
        self.spec = spec
        self.nodes = {spec.node: {"online": True}}
        self.cluster_name = ""
        self.set_release(spec.version)
        self.time_scale = spec.time_scale
        self.client_max_size = 16 * 1024 ** 2
        self.body_timeout = 600.0
        secret = spec.token_secret_file.read_text().strip()
        self.apitokens = {spec.token_id: secret}
        user = spec.token_id.split("!")[0]
        for path, privs in spec.privileges.items():
            self.grant(user, path, *privs)
            self.grant(spec.token_id, path, *privs)
        self._initial_acl: dict[str, list[Any]] | None = copy.deepcopy(self.acl)
        spec.storage_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("import", "images", "template/iso", "template/cache", "snippets", "dump"):
            (spec.storage_dir / sub).mkdir(parents=True, exist_ok=True)
        spec.staging_dir.mkdir(parents=True, exist_ok=True)
        spec.vms_dir.mkdir(parents=True, exist_ok=True)
        self.storages: dict[str, dict[str, Any]] = {
            "local": {"type": "dir", "active": 1, "content": LOCAL_CONTENT, "files": set(),
                      "path": str(spec.storage_dir), "volumes": {}},
            # a default install's LVM-thin pool: raw vm-<id>-disk-<n>, base-<id>-disk-<n>, flat linked clones
            THIN_STORAGE: {"type": "lvmthin", "vgname": "pve", "thinpool": "data", "active": 1,
                           "content": "images,rootdir", "files": set(), "volumes": {}},
        }
        # the pool's volumes as files where the node shows them (/dev/<vg>/<lv>) in the host's tree
        self.thin_dir = spec.thin_pool_dir
        self.thin_dir.mkdir(parents=True, exist_ok=True)
        self.storage_locks: dict[str, StorageLock] = {}
        # a cluster's node (lab/cluster.py): its peers by node name (itself included) once the cluster is joined
        # (members.join), the shared storage, and the locks of shared storages (cluster-wide, as cfs_lock_storage)
        self.cluster_spec: dict[str, Any] = dict(spec.extra.get("cluster") or {})
        self.peers: dict[str, LabNodeBase] = {}
        self.shared_locks: dict[str, StorageLock] = {}
        if self.cluster_spec:
            shared = Path(self.cluster_spec["shared_dir"])
            for sub in ("import", "images"):
                (shared / sub).mkdir(parents=True, exist_ok=True)
            self.storages[self.cluster_spec["shared_storage"]] = {
                "type": "dir", "active": 1, "shared": 1, "content": SHARED_CONTENT, "files": set(),
                "path": str(shared), "volumes": {}}
        self.cluster_options: dict[str, str] = {}  # datacenter.cfg as stored: no tag policy on a fresh install
        # vmid -> coroutine factories to run at the I/O step of the VM's running task
        self._pending_io: dict[int, list[Any]] = {}
        # pve-edk2-firmware 4.2025.05+: the Microsoft-keyed vars template holds the 2023 CAs (control op edk2_vars)
        self.edk2_ms_2023 = bool(spec.extra.get("edk2_ms_2023", True))
        self._after_io: dict[int, list[Any]] = {}
        self.runners: dict[int, vmrunner.VmProcess] = {}
        self._control_runner: web.AppRunner | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self.extra_durations: dict[str, float] = {}
        self.bridge_vlans: dict[str, dict[str, Any]] = {}  # bridge -> VLAN fields a test set (bridge_vlans)
        self._state_write_lock = threading.Lock()
        self._saved_state = ""
        self._restore_or_wipe()

    def set_release(self, manager: str) -> None:
        """Run this pve-manager release: what /version reports is pve-manager's; each behaviour is keyed on the
        package that owns it (qemu-server, pve-storage), in the versions that shipped with it (spec.RELEASES)."""
        self.version = manager
        self.release_version = ".".join(manager.split(".")[:2])
        self.major = int(manager.split(".")[0])
        self.packages = release_of(manager)
        self.qemu_server = version_tuple(self.packages.qemu_server)

    def switch_release(self, manager: str) -> None:
        """An admin's in-place `apt full-upgrade` (or downgrade) to another release of the node's major. Across
        majors the role's grants would be wrong (VM.Monitor on 8, VM.GuestAgent.* on 9): that takes a new lab."""
        if manager not in RELEASES:
            raise ValueError(f"release {manager!r} is not one the lab models (pve-manager {', '.join(RELEASES)})")
        if int(manager.split(".")[0]) != int(self.spec.version.split(".")[0]):
            raise ValueError(f"release {manager!r} is of another major than the node's {self.spec.version}: the "
                             "role grants per major; set pve_version in lab.json instead")
        self.set_release(manager)

    def qemu_at_least(self, *version: int) -> bool:
        """qemu-server (not pve-manager) is at least this release: it owns the VM endpoints."""
        return self.qemu_server >= version

    async def duration(self, kind: str) -> None:
        secs = self.extra_durations.get(kind, DURATIONS.get(kind, 0.0) if self.spec.durations else 0.0)
        await self.pause(secs)

