"""LabPve: fakepve 0.5.0 made to behave like the PVE 8.4 node the tool drives (pve-facts.md).

fakepve keeps its state in memory. The lab backs the node's ``local`` directory storage with a
real directory tree (the same tree the node's sshd writes into) and closes the gaps between
fakepve and PVE 8.4 that publish and deploy rely on, by subclassing -- never by patching
site-packages:

- one node (the hypervisor's name), PVE 8.4.1, one privilege-separated API token whose rights
  are the intersection of the user's and the token's ACLs;
- ``local`` is a ``dir`` storage whose path is real: files in ``import/`` list as
  ``local:import/<file>``; VM disks are real qcow2/raw files under ``images/<vmid>/``;
- ``POST .../upload`` with ``content=import``: PVE's filename rule, fields before the file
  part, Content-Length required, staged in the node's var/tmp, checksum checked in the task;
- ``import-from=<volid>`` really checked with ``qemu-img info`` and converted into the target
  storage (sized from the source); absolute paths refused for everyone but root@pam;
- cloud-init volumes are ``vm-<id>-cloudinit``; a clone gets its own; clones get fresh
  BC:24:11 MACs (fakepve); template conversion renames the disk files to ``base-...``;
  linked clones are qcow2 overlays of the template's base file;
- disk allocation and copies take the storage lock, waiting at most 10 PVE seconds:
  ``can't lock file '/var/lock/pve-manager/pve-storage-<sid>' - got timeout``;
- optional PVE-like task durations;
- starting a VM launches a real qemu (vmrunner), the guest agent answers from it;
- a control endpoint (unix socket) for fault hooks and resets.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import hashlib
import json
import logging
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from fakepve import FakePve, FakeVm, PveError, TaskError
from fakepve.lxc import random_mac, to_base
from fakepve.qemu import DRIVE_KEY, NEW_DISK, drives_of, join_drive, split_drive, volume_ref
from fakepve.routing import param_error
from fakepve.server import params as request_params
from fakepve.storage import parse_name_dir

from image_factory.lab import vmrunner
from image_factory.lab.privileges import catalogue
from image_factory.lab.spec import RELEASES, THIN_STORAGE, NodeSpec, release_of, version_tuple
from image_factory.pve.codec import format_size, format_tags, parse_props, parse_size
from image_factory.site.inventory import CPU_TYPES

log = logging.getLogger("image_factory.lab")

# Warnings of the task worker running in this context (PVE's log_warn): the task ends "WARNINGS: n".
TASK_WARNINGS: contextvars.ContextVar[list[str]] = contextvars.ContextVar("lab_task_warnings")
IMPORT_NAME = re.compile(r"^[a-zA-Z0-9\-.+=_]+\.(ova|qcow2|raw|vmdk)$")
IMPORT_LIST = re.compile(r"^[^/\s]+\.(ova|ovf|qcow2|raw|vmdk)$")
ISO_NAME = re.compile(r"^[a-zA-Z0-9\-.+=_]+\.(iso|img)$")
VZTMPL_NAME = re.compile(r"^[a-zA-Z0-9\-.+=_]+\.tar\.(gz|xz|zst|bz2)$")
CHECKSUMS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")
CLOUDINIT_SIZE = 4 * 1024 ** 2
THIN_POOL_SIZE = 100 * 1024 ** 3  # a lab node's LVM-thin pool (control op thin_pool sets another)
STORAGE_LOCK_WAIT = 10  # PVE seconds (cfs_lock_storage / lock_file timeout)
# PVE-like durations (PVE seconds) when durations are on.
DURATIONS = {"clone_full": 8.0, "clone_linked": 2.0, "import": 6.0, "template": 2.0, "start": 2.0, "stop": 1.0,
             "create": 1.0, "imgcopy": 2.0}
LOCAL_CONTENT = "backup,images,import,iso,rootdir,snippets,vztmpl"
# Guest-agent commands relayed to the real agent as guest-<command> without arguments.
FILE_READ_MAX = 16 * 1024 * 1024  # PVE's agent/file-read limit
AGENT_ADDRESS_DELAY = 1.0  # PVE seconds from start until a started VM's agent reports an address
# qemu-server API2/Qemu.pm: $cloudinitoptions and the $generaloptions fakepve does not already file as Options
CLOUDINIT_OPTIONS = frozenset({"cicustom", "cipassword", "citype", "ciuser", "ciupgrade", "nameserver",
                               "searchdomain", "sshkeys"})
GENERAL_OPTIONS = frozenset({"autostart", "bios", "keyboard", "localtime", "migrate_downtime", "migrate_speed",
                             "ostype", "reboot", "startdate", "tdf", "template"})
HWTYPE_OPTIONS = frozenset({"acpi", "hotplug", "kvm", "machine", "scsihw", "smbios1", "tablet", "vga", "watchdog",
                            "audio0", "rng0"})  # fakepve files scsihw under Disk (its name starts with scsi)
# Parameters of the endpoints PveClient calls that a node's own qemu-server does not know yet: (method, path
# template) -> {parameter: the first qemu-server release whose schema has it}. From the API schemas of
# qemu-server 8.3.12 and 9.2.0 diffed (docs/pve-facts.md, "Schemas by version"); pve-manager's and pve-storage's
# endpoints the client calls did not change. fakepve validates against the newest schema; a node refuses these as
# its own (older) schema does.
_CONFIG_KEYS_SINCE: dict[str, tuple[int, ...]] = {"intel-tdx": (9, 0, 25), "allow-ksm": (9, 0, 27)}
NEWER_PARAMETERS: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {
    ("POST", "/nodes/{node}/qemu"): {"ha-managed": (9, 0, 24), **_CONFIG_KEYS_SINCE},
    ("POST", "/nodes/{node}/qemu/{vmid}/config"): _CONFIG_KEYS_SINCE,
    ("PUT", "/nodes/{node}/qemu/{vmid}/config"): _CONFIG_KEYS_SINCE,
    ("POST", "/nodes/{node}/qemu/{vmid}/status/start"): {"with-conntrack-state": (9, 0, 10),
                                                         "nets-host-mtu": (9, 0, 20)},
    ("GET", "/nodes/{node}/qemu/{vmid}/agent/file-read"): {"count": (9, 1, 5), "decode": (9, 1, 5),
                                                           "offset": (9, 1, 5)},
}
# qemu-server's pve-vm-cpu-conf (CPUConfig.pm): the keys a VM's cpu takes; its cputype is checked against the
# factory's copy of qemu-server's model list (inventory.CPU_TYPES) -- the lab knows no custom- models.
CPU_KEYS = frozenset({"cputype", "flags", "hidden", "hv-vendor-id", "phys-bits", "guest-phys-bits"})
CICUSTOM_KEYS = frozenset({"meta", "network", "user", "vendor"})  # pve-qm-cicustom (QemuServer.pm)
# pve-edk2-firmware's vars templates, as qemu-server's OVMF.pm picks them for efitype=4m on q35 (SMM): the
# Microsoft + distribution keys with pre-enrolled-keys=1; Debian's ovmf package ships the same names.
OVMF_VARS_DIR = Path("/usr/share/OVMF")
OVMF_VARS = {False: "OVMF_VARS_4M.fd", True: "OVMF_VARS_4M.ms.fd"}
EFI_VARS_SIZE = 528 * 1024  # what qemu-server records as size= of a 4m EFI disk
TPMSTATE_SIZE = 4 * 1024 ** 2  # Drive.pm TPMSTATE_DISK_SIZE
# efidisk0's ms-cert values by the qemu-server that introduced them (debian/changelog 9.0.27, 9.1.4, 9.1.5).
MS_CERT_SINCE = {"2011": (9, 0, 27), "2023": (9, 0, 27), "2023w": (9, 1, 4), "2023k": (9, 1, 5)}
RELAYED = ("ping", "info", "get-host-name", "get-osinfo", "network-get-interfaces", "get-time", "get-timezone",
           "get-users", "get-vcpus", "get-fsinfo")


def _qemu_img_info(path: Path) -> dict[str, Any]:
    proc = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise TaskError(
            f"could not parse qemu-img info command output for '{path}' - {proc.stderr.strip() or 'no output'}"
        )
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TaskError(f"{argv[0]} failed: {proc.stderr.strip()}")


def _convert_into(src: Path, src_fmt: str, dest: Path, fmt: str) -> None:
    """Copy a disk as PVE's QemuImage::convert does: into the volume vdisk_alloc already made (``-n``), so
    a raw target stays the sparse volume it was and is not created a second time."""
    keep = ["-n"] if dest.exists() else []
    _run(["qemu-img", "convert", "-q", *keep, "-f", src_fmt, "-O", fmt, str(src), str(dest)])


class StorageLock:
    """PVE's per-storage allocation lock (a flock with a timeout)."""

    def __init__(self) -> None:
        self.holder: str | None = None
        self.released = asyncio.Event()


class LabPve(FakePve):  # fakepve is untyped
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
        vms = [{"vmid": vm.vmid, "name": vm.name, "config": vm.config, "pending": vm.pending,
                "template": bool(vm.template), "snapshots": vm.snapshots, "lock": vm.lock} for vm in self.vms]
        volumes = {sid: store.get("volumes", {}) for sid, store in self.storages.items()}
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

    # ---------------------------------------------------------------- access

    def allowed(self, user: str, path: str, priv: str) -> bool:
        """Privilege-separated tokens: the intersection of the token's and the user's rights."""
        if self.acl is None or (user or "").split("!")[0] == "root@pam":
            return True
        if "|" in priv:  # PVE's check_vm_perm(..., any=1): one of them suffices
            return any(self.allowed(user, path, one) for one in priv.split("|"))
        if "!" in user:
            return self._holds(user, path, priv) and self._holds(user.split("!")[0], path, priv)
        return self._holds(user, path, priv)

    def _holds(self, who: str, path: str, priv: str) -> bool:
        """fakepve's path logic (a grant covers the path and everything under it), for one ACL subject."""
        paths = [path]
        if path.startswith("/vms/"):
            vmid = int(path.split("/")[2])
            paths += ["/vms"] + ["/pool/" + name for name, ids in self.pools.items() if vmid in ids]
        for granted, privs in (self.acl or {}).get(who, []):
            if priv in privs and (granted == "/" or any(p == granted or p.startswith(granted + "/") for p in paths)):
                return True
        return False

    async def _permissions(self, v: dict[str, Any], user: str) -> dict[str, dict[str, int]]:
        """GET /access/permissions of a privilege-separated token: its effective rights (token's ACL
        intersected with its user's), per ACL path, or for exactly `path` when given."""
        who = v.get("userid") or user
        if self.acl is None or "!" not in who or who.split("!")[0] == "root@pam":
            result: dict[str, dict[str, int]] = await super()._permissions(v, user)
            return result
        owner = who.split("!")[0]
        if v.get("path") is not None:
            paths = [str(v["path"])]
        else:
            paths = sorted({p for p, _ in self.acl.get(who, [])} | {p for p, _ in self.acl.get(owner, [])})
        out: dict[str, dict[str, int]] = {}
        for path in paths:
            try:
                held = sorted(priv for priv in catalogue(self.major) if self.allowed(who, path, priv))
            except ValueError:
                held = []
            if held or v.get("path") is not None:
                out[path] = dict.fromkeys(held, 1)
        return out

    def _verify(self, request: web.Request, values: dict[str, Any], drop: Any = ()) -> Any:
        match = self.resolve(request, "/api2/json")
        if match is not None:
            self.check_own_schema(request.method, match.template, values)
        return super()._verify(request, values, drop)

    async def answer(self, request: web.Request, match: Any, params: dict[str, Any], user: str,
                     call: Any = None) -> Any:
        if match is not None:
            self.check_own_schema(request.method, match.template, params)
        return await super().answer(request, match, params, user, call)

    def check_own_schema(self, method: str, template: str, values: dict[str, Any]) -> None:
        """PVE's JSON schema refuses what its own version does not define (additionalProperties 0): a parameter
        newer than this node's qemu-server is a 400, as on the real node."""
        newer = NEWER_PARAMETERS.get((method, template), {})
        unknown = sorted(k for k in values if k in newer and not self.qemu_at_least(*newer[k]))
        if unknown:
            raise PveError(400, "Parameter verification failed.", dict.fromkeys(
                unknown, "property is not defined in schema and the schema does not allow additional properties"))

    def check_permissions(self, user: str, perms: Any, values: dict[str, Any], declared: Any = None) -> None:
        """pve-access-control's check_api2_permissions: `user => 'all'` admits every authenticated user before
        any `check` (which the method then evaluates itself, e.g. get_options' Sys.Audit for the full answer)."""
        if user is not None and (perms or {}).get("user") in ("all", "world"):
            return
        super().check_permissions(user, perms, values, declared)

    def _check(self, user: str, check: Any, values: dict[str, Any], declared: Any = None) -> Any:
        """PVE 8.4's guest-agent permission: fakepve's schema is PVE 9's (VM.GuestAgent.*); 8.4 checks
        VM.Monitor on /vms/{vmid} for every agent command. A 9.x node checks what the schema says."""
        if self.major < 9 and check and check[0] == "perm" and any(
                str(p).startswith("VM.GuestAgent.") for p in check[2]):
            check = ["perm", check[1], ["VM.Monitor"]]
        return super()._check(user, check, values, declared)

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
        from fakepve.server import USER, ok
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

    # ------------------------------------------------------------- durations

    async def duration(self, kind: str) -> None:
        secs = self.extra_durations.get(kind, DURATIONS.get(kind, 0.0) if self.spec.durations else 0.0)
        await self.pause(secs)

    # ---------------------------------------------------------------- storage

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
        """cfs_lock_storage: wait up to 10 PVE seconds, then PVE's timeout error."""
        lock = self.storage_locks.setdefault(sid, StorageLock())
        if lock.holder is not None and self.time_scale:
            deadline = time.monotonic() + STORAGE_LOCK_WAIT * self.time_scale
            while lock.holder is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                lock.released.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(lock.released.wait(), remaining)
        if lock.holder is not None:
            raise TaskError(f"can't lock file '/var/lock/pve-manager/pve-storage-{sid}' - got timeout")
        lock.holder = holder

    def storage_unlock(self, sid: str, holder: str) -> None:
        lock = self.storage_locks.get(sid)
        if lock and lock.holder == holder:
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

    # ---------------------------------------------------------------- upload

    async def _read_body(self, request: web.Request) -> bytes:
        # Uploads are streamed by the upload handler itself, never read whole into memory.
        if request.method == "POST" and request.path.endswith("/upload"):
            return b""
        body: bytes = await super()._read_body(request)
        return body

    async def _upload(self, request: web.Request) -> web.Response:
        from fakepve.server import USER, ok
        name, store = self._file_storage(request, "upload")
        user = request[USER]
        self.require(user, "/storage/" + name, "Datastore.AllocateTemplate")
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower() or \
                request.headers.get("Content-Length") is None:
            raise PveError(400, "upload without Content-Length (chunked encoding) is not supported")
        if request.content_type != "multipart/form-data":
            raise PveError(400, "bad upload request - not multipart/form-data")
        fields: dict[str, str] = {}
        reader = await request.multipart()
        staged: Path | None = None
        filename = None
        digest_algo = None
        hasher = None
        try:
            while True:
                part = await reader.next()
                if part is None:
                    break
                if isinstance(part, BodyPartReader) and staged is not None:
                    # pve-http-server writes everything up to the closing boundary into the file: a part after
                    # the file part ends up inside it
                    boundary = re.search(r'boundary="?([^";]+)', request.headers.get("Content-Type", ""))
                    extra = (f"\r\n--{boundary[1] if boundary else ''}\r\nContent-Disposition: form-data; "
                             f'name="{part.name}"\r\n\r\n'.encode() + await part.read(decode=False))
                    with staged.open("ab") as out:
                        out.write(extra)
                    if hasher is not None:
                        hasher.update(extra)
                    continue
                if isinstance(part, BodyPartReader) and part.filename is not None and part.name != "filename":
                    raise PveError(500, f"wrong field name '{part.name}' for file upload, expected 'filename'")
                if isinstance(part, BodyPartReader) and part.filename is not None:
                    if len(part.filename) > 255:
                        raise param_error(filename="value may only be 255 characters long")
                    self._check_field_order(list(fields))
                    # PVE 8.4's upload endpoint rewrites every character outside [a-zA-Z0-9_.-] (+ and = too)
                    filename = re.sub(r"[^a-zA-Z0-9_.-]", "_", Path(part.filename).name)
                    self._check_upload_fields(fields, filename, store, name)
                    digest_algo = fields.get("checksum-algorithm")
                    hasher = hashlib.new(digest_algo) if digest_algo else None
                    self.spec.staging_dir.mkdir(parents=True, exist_ok=True)
                    staged = self.spec.staging_dir / f"pveupload-{time.time_ns()}"
                    with staged.open("wb") as out:
                        while True:
                            chunk = await part.read_chunk(1024 * 1024)
                            if not chunk:
                                break
                            out.write(chunk)
                            if hasher is not None:
                                hasher.update(chunk)
                elif isinstance(part, BodyPartReader):
                    fields[str(part.name)] = (await part.read(decode=False)).decode()
        except PveError:
            if staged is not None:
                staged.unlink(missing_ok=True)
            raise
        except (ValueError, UnicodeDecodeError, ConnectionError, asyncio.IncompleteReadError) as exc:
            if staged is not None:
                staged.unlink(missing_ok=True)
            raise PveError(400, f"bad upload request - {exc}") from None
        except OSError as exc:  # e.g. no space left in the staging directory (PVE's /var/tmp)
            if staged is not None:
                staged.unlink(missing_ok=True)
            raise PveError(500, f"error writing upload to {staged}: {exc.strerror or exc}") from None
        if staged is None or filename is None:
            self._check_upload_fields(fields, None, store, name)
            raise param_error(filename="property is missing and it is not optional")
        content = fields["content"]
        expected = fields.get("checksum")
        got = hasher.hexdigest() if hasher is not None else None
        dest_dir = {"import": "import", "iso": "template/iso", "vztmpl": "template/cache"}[content]
        dest = Path(store["path"]) / dest_dir / filename
        size = staged.stat().st_size

        async def body() -> str | None:
            await self.duration("imgcopy")
            try:
                if expected is not None and got != expected.lower():
                    raise TaskError(f"checksum mismatch: got '{got}' != expect '{expected}'")
                # PVE copies (cp) the staged file into place and removes it afterwards: both copies exist
                # at once, twice the image where /var/tmp and the storage share a filesystem.
                await asyncio.to_thread(shutil.copyfile, str(staged), str(dest))
            except OSError as exc:
                dest.unlink(missing_ok=True)
                raise TaskError(f"copy '{staged}' to '{dest}' failed: {exc.strerror or exc}") from None
            finally:
                staged.unlink(missing_ok=True)
            return f"target file: {dest}"

        log_lines = [f"starting file import from: {staged}", f"target node: {self.spec.node}",
                     f"target file: {dest}", f"file size is: {size}"]
        if got is not None:
            log_lines.append("calculating checksum...OK, checksum verified" if got == (expected or "").lower()
                             else "calculating checksum...")
        return ok(await self.task(self.spec.node, "imgcopy", "", user, body, log=log_lines))

    @staticmethod
    def _check_field_order(names: list[str]) -> None:
        """pve-http-server's file_upload_multipart takes, before the file part, `content`, `checksum-algorithm`
        and `checksum` in this order, each at the head of what is left: a field out of order or of another name
        makes its Content-Disposition pattern span two parts, which it refuses (HTTP 500)."""
        expected = ["content", "checksum-algorithm", "checksum"]
        for name in names:
            if name not in expected:
                raise PveError(500, f"wrong Content-Disposition 'form-data; name=\"{name}\"' in multipart, "
                                    "expected 'form-data'")
            expected = expected[expected.index(name) + 1:]

    def _check_upload_fields(self, fields: dict[str, str], filename: str | None, store: dict[str, Any],
                             name: str) -> None:
        content = fields.get("content")
        errors: dict[str, str] = {}
        if content is None:
            errors["content"] = "property is missing and it is not optional"
        elif content not in ("iso", "vztmpl", "import"):
            errors["content"] = "value 'x' does not have a value in the enumeration 'iso, vztmpl, import'".replace(
                "'x'", f"'{content}'")
        algo = fields.get("checksum-algorithm")
        if algo is not None and algo not in CHECKSUMS:
            errors["checksum-algorithm"] = f"value '{algo}' does not have a value in the enumeration " \
                                           f"'{', '.join(CHECKSUMS)}'"
        if (algo is None) != (fields.get("checksum") is None):
            errors["checksum" if algo else "checksum-algorithm"] = \
                "'checksum' and 'checksum-algorithm' must be given together"
        if errors:
            raise PveError(400, "Parameter verification failed.", errors)
        if filename is not None:
            if content == "import" and not IMPORT_NAME.match(filename):
                raise param_error(filename="invalid filename or wrong extension")
            if content == "iso" and not ISO_NAME.match(filename):
                raise param_error(filename="wrong file extension")
            if content == "vztmpl" and not VZTMPL_NAME.match(filename):
                raise param_error(filename="wrong file extension")
        if content not in str(store.get("content", "")).split(","):
            raise PveError(500, f"storage '{name}' does not support '{content}' content")

    # ------------------------------------------------------- disk allocation

    def _qm_alloc(self, sid: str, vmid: int, fmt: str | None, size: int,
                  linked_from: str | None = None) -> tuple[str, str]:
        if linked_from is not None and self.storages[sid].get("type") == "dir":
            fmt = "qcow2"  # Plugin::clone_image: a qcow2 overlay whatever the base's format
        volid, fmt = super()._qm_alloc(sid, vmid, fmt, size, linked_from)
        path = self.volume_file(volid)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if linked_from is None:
                _run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(max(size, 1024 * 1024))])
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
            _run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)])
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
            info = _qemu_img_info(entry)
            if info.get("format") == "qcow2" and Path(str(info.get("backing-filename", ""))).name == base.name:
                _run(["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", str(entry)])

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

    def _source_of_import(self, user: str, source: str, key: str) -> Path:
        """Checks PVE makes of an import-from source before the task: volume id, type and access."""
        if source.startswith("/"):
            if user != "root@pam":
                raise PveError(500, "Only root can pass arbitrary filesystem paths.")
            return Path(source)
        sid, name = volume_ref(source)
        if sid is None:
            raise param_error(**{key: f"unable to parse volume ID '{source}'"})
        store = self._store(sid)
        vtype, owner, _fmt = self._parse_volname(store, name)
        if vtype not in ("images", "import"):
            raise param_error(**{key: f"{source} has wrong type '{vtype}' - needs to be 'images' or 'import'"})
        if owner:
            self.require(user, f"/vms/{owner}", "VM.Clone")
        else:
            self._check_access(user, sid, vtype, owner, source)
        path = self.volume_file(source)
        if path is None:
            raise PveError(500, f"storage '{sid}' is not a file based storage")
        return path

    def _qm_check_drive(self, user: str, vmid: int, pool: str | None, key: str, value: str,
                        default: str | None) -> None:
        volume, props = split_drive(value)
        if "import-from" in props:
            self._source_of_import(user, props["import-from"], key)
            found = NEW_DISK.match(volume)
            if not found:
                raise param_error(**{key: "'import-from' requires special syntax - use <storage ID>:0,"
                                          "import-from=<source>"})
            sid = found.group(1) or default
            if not sid:
                raise PveError(500, "no storage ID specified (and no default storage)")
            self._qm_image_store(sid, user)
            return
        if volume.endswith(":cloudinit"):
            sid = volume_ref(volume)[0] or default
            if sid:
                self._qm_image_store(sid, user)
            return
        super()._qm_check_drive(user, vmid, pool, key, value, default)

    def _qm_new_drive(self, vmid: int, key: str, value: str, default: str | None) -> tuple[str, list[str]]:
        volume, props = split_drive(value)
        props = dict(props)
        if volume.endswith(":cloudinit"):
            sid = volume_ref(volume)[0] or default
            assert sid is not None
            fmt = props.pop("format", None) or ("qcow2" if self.storages[sid].get("type") == "dir" else "raw")
            volid = self._alloc_named(sid, vmid, f"vm-{vmid}-cloudinit", fmt, CLOUDINIT_SIZE)
            props["media"] = "cdrom"
            return join_drive(volid, props), [volid]
        if key in ("efidisk0", "tpmstate0") and NEW_DISK.match(volume) and "import-from" not in props:
            return self._new_firmware_drive(vmid, key, volume, props, default)
        if "import-from" in props:
            source = props.pop("import-from")
            found = NEW_DISK.match(volume)
            assert found is not None
            sid = found.group(1) or default
            assert sid is not None
            src_path = self._source_of_import("root@pam", source, key) if not source.startswith("/") \
                else Path(source)
            info = _qemu_img_info(src_path) if src_path.exists() else None
            if info is None:
                raise TaskError(f"volume '{source}' does not exist")
            self._check_import_source(info, source)
            if source.startswith("/") or volume_ref(source)[1].startswith("import/"):
                _check_untrusted_image(info, src_path)
            size = int(info["virtual-size"])
            fmt = props.pop("format", None)
            volid, fmt = self._qm_alloc(sid, vmid, fmt, size)
            props["size"] = format_size(size)
            self._pending_io.setdefault(vmid, []).append(
                lambda: self._copy_disk(src_path, str(info["format"]), volid, fmt, sid, f"import {vmid}")
            )
            return join_drive(volid, props), [volid]
        return tuple(super()._qm_new_drive(vmid, key, value, default))

    def _check_drive_formats(self, params: dict[str, Any]) -> None:
        """The efidisk0 format of this qemu-server (the API schema fakepve checks is the newest): ms-cert from
        9.0.27, its values as they came; with import-from, efitype and pre-enrolled-keys must be given."""
        if "efidisk0" not in params:
            return
        _volume, props = split_drive(str(params["efidisk0"]))
        cert = props.get("ms-cert")
        if cert is not None:
            if not self.qemu_at_least(*MS_CERT_SINCE["2011"]):
                raise param_error(efidisk0="invalid format - invalid key in comma-separated list property: "
                                           "ms-cert\n")
            known = [v for v, since in MS_CERT_SINCE.items() if self.qemu_at_least(*since)]
            if cert not in known:
                raise param_error(efidisk0=f"invalid format - format error\nefidisk0.ms-cert: value '{cert}' does "
                                           f"not have a value in the enumeration '{', '.join(known)}'\n")
        if "import-from" in props:
            for required in ("efitype", "pre-enrolled-keys"):
                if required not in props:
                    raise param_error(efidisk0=f"need to specify '{required}' when using 'import-from'")

    def _new_firmware_drive(self, vmid: int, key: str, volume: str, props: dict[str, str],
                            default: str | None) -> tuple[str, list[str]]:
        """qemu-server's create_disks for the two fixed-size drives (the SIZE_IN_GiB is ignored): efidisk0 gets a
        copy of the OVMF vars template its efitype/pre-enrolled-keys pick (OVMF.pm create_efidisk), ms-cert=2023k
        from 9.1.5 when that template holds Microsoft's 2023 CAs; tpmstate0 4 MiB, raw before qemu-server 9.0.26
        (#4693), the storage's format from then on."""
        found = NEW_DISK.match(volume)
        assert found is not None
        sid = found.group(1) or default
        if not sid:
            raise TaskError("no storage ID specified (and no default storage)")
        fmt = props.pop("format", None)
        if key == "tpmstate0":
            if not self.qemu_at_least(9, 0, 26):
                fmt = "raw"
            volid, fmt = self._qm_alloc(sid, vmid, fmt, TPMSTATE_SIZE)
            props["size"] = format_size(TPMSTATE_SIZE)
            return join_drive(volid, props), [volid]
        keys = props.get("pre-enrolled-keys", "0") in ("1", "true", "on", "yes")
        vars_file = OVMF_VARS_DIR / (OVMF_VARS[keys] if props.get("efitype") == "4m" else "OVMF_VARS.fd")
        if not vars_file.exists():
            raise TaskError(f"EFI vars image '{vars_file}' not found")
        volid, fmt = self._qm_alloc(sid, vmid, fmt, EFI_VARS_SIZE)
        path = self.volume_file(volid)
        if path is not None:  # exactly the vars template's size: OVMF's second flash must match its code's layout
            path.unlink(missing_ok=True)
            _convert_into(vars_file, "raw", path, fmt)
        props["size"] = format_size(EFI_VARS_SIZE)
        if keys and self.qemu_at_least(9, 1, 5) and self.edk2_ms_2023:
            props["ms-cert"] = "2023k"
        return join_drive(volid, props), [volid]

    @staticmethod
    def _prohibit_tpm_version_change(vm: FakeVm, updates: dict[str, Any]) -> None:
        """qemu-server prohibit_tpm_version_change: the same TPM state volume keeps its version (v1.2 unset)."""
        if "tpmstate0" not in updates or not vm.config.get("tpmstate0"):
            return
        old_vol, old_props = split_drive(str(vm.config["tpmstate0"]))
        new_vol, new_props = split_drive(str(updates["tpmstate0"]))
        if old_vol == new_vol and old_props.get("version", "v1.2") != new_props.get("version", "v1.2"):
            raise PveError(500, "cannot change TPM state version after creation")

    def _enrol_ms_2023(self, vm: FakeVm, updates: dict[str, Any]) -> None:
        """OVMF.pm drive_change (qemu-server 9.1.4+): ms-cert newly set to 2023* on the same volume enrols
        Microsoft's 2023 CAs (virt-fw-vars) and records 2023k; before 9.1.4 the marker is only written."""
        if "efidisk0" not in updates or not vm.config.get("efidisk0"):
            return
        old_vol, old_props = split_drive(str(vm.config["efidisk0"]))
        new_vol, new_props = split_drive(str(updates["efidisk0"]))
        cert = new_props.get("ms-cert") or ""
        if (old_vol == new_vol and cert != old_props.get("ms-cert") and cert.startswith("2023")
                and self.qemu_at_least(9, 1, 4) and new_props.get("pre-enrolled-keys") in ("1", "true")):
            new_props["ms-cert"] = "2023k" if self.qemu_at_least(9, 1, 5) else "2023w"
            updates["efidisk0"] = join_drive(new_vol, new_props)

    @staticmethod
    def _check_import_source(info: dict[str, Any], source: str) -> None:
        fmt = info.get("format")
        if fmt not in ("qcow2", "raw", "vmdk"):
            raise TaskError(f"import source '{source}' has unsupported format '{fmt}'")
        ext = source.rsplit(".", 1)[-1]
        if ext in ("qcow2", "raw", "vmdk") and ext != fmt:
            raise TaskError(f"image '{source}' has format '{fmt}', but its extension says '{ext}'")

    async def _copy_disk(self, src: Path, src_fmt: str, volid: str, fmt: str, sid: str, holder: str) -> None:
        dest = self.volume_file(volid)
        await self.storage_lock(sid, holder)
        try:
            await self.duration("import")
            if dest is not None:
                await asyncio.to_thread(_convert_into, src, src_fmt, dest, fmt)
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

    def _check_bridge_access(self, user: str, params: dict[str, Any]) -> None:
        """qemu-server's check_bridge_access: every netN's bridge (and VLAN tag) needs SDN.Use on
        /sdn/zones/localnetwork/<bridge>[/<tag>] for the calling user or token."""
        for key, value in params.items():
            if not re.fullmatch(r"net\d+", key):
                continue
            props = dict(p.split("=", 1) for p in str(value).split(",") if "=" in p)
            bridge = props.get("bridge")
            if bridge:
                path = f"/sdn/zones/localnetwork/{bridge}" + (f"/{props['tag']}" if props.get("tag") else "")
                self.require(user, path, "SDN.Use")

    def qemu_at_least(self, *version: int) -> bool:
        """qemu-server (not pve-manager) is at least this release: it owns the VM endpoints."""
        return self.qemu_server >= version

    # ------------------------------------------------------------ tag policy

    def tag_policy(self) -> tuple[str, set[str], set[str]]:
        """datacenter.cfg's user-tag-access (user-allow, user-allow-list) and registered-tags."""
        access = dict(p.split("=", 1) for p in self.cluster_options.get("user-tag-access", "").split(",") if "=" in p)
        allow_list = {t for t in access.get("user-allow-list", "").split(";") if t}
        registered = {t for t in self.cluster_options.get("registered-tags", "").split(";") if t}
        return access.get("user-allow", "free"), allow_list, registered

    def assert_tag_permissions(self, user: str, vmid: int, old: Any, new: Any) -> None:
        """pve-guest-common's assert_tag_permissions: VM.Config.Options on the VM; every tag added or removed
        needs Sys.Modify on / unless the policy lets users set it (free, on the list, or existing on a guest
        the user can see) and it is not registered."""
        self.require(user, f"/vms/{vmid}", "VM.Config.Options")
        if self.allowed(user, "/", "Sys.Modify"):
            return
        allow, _allow_list, registered = self.tag_policy()
        allowed = self.allowed_tags(user)
        before, after = _split_tags(old), _split_tags(new)
        for tag in sorted(set(before) | set(after)):
            if before.count(tag) == after.count(tag):
                continue
            if (tag not in allowed and allow != "free") or tag in registered:
                raise PveError(403, f"Permission check failed (/, Sys.Modify for modifying tag '{tag}')")

    def tag_policy_restrictive(self) -> bool:
        allow, _allow_list, registered = self.tag_policy()
        return allow != "free" or bool(registered)

    async def _qm_create(self, v: dict[str, Any], user: str) -> str:
        """`start=1`: the new VM boots (a real qemu) once its disks are made, inside the create task.

        Tags: qemu-server before 9.1.17 stores them verbatim on create (fakepve normalises, as 9.1.17+); from
        9.2.0 the create task checks the tag policy (assert_tag_permissions) before it writes the config."""
        self._check_bridge_access(user, v)
        self.check_vm_formats(v)
        self._check_drive_formats(v)
        vmid = int(v["vmid"])
        if v.get("tags") and self.qemu_at_least(9, 2, 0):
            tags = v["tags"]

            async def check_tags() -> None:
                self.assert_tag_permissions(user, vmid, "", tags)
            self._pending_io.setdefault(vmid, []).insert(0, check_tags)
        if v.get("tags") and not self.qemu_at_least(9, 1, 17):
            verbatim = str(v["tags"])

            async def keep_verbatim() -> None:
                vm = self.vm(vmid)
                if vm is not None:
                    vm.config["tags"] = verbatim
            self._pending_io.setdefault(vmid, []).append(keep_verbatim)
        if v.get("start") and str(v.get("start")) not in ("0", "false"):
            async def launch() -> None:
                vm = self.vm(vmid)
                if vm is not None and self._boots_for_real(vm):
                    vm.name = vm.config.get("name") or vm.name
                    self.runners[vmid] = await asyncio.to_thread(self._launch, vm)
            self._after_io.setdefault(vmid, []).append(launch)
        try:
            upid: str = await super()._qm_create(v, user)
        except BaseException:
            self._after_io.pop(vmid, None)
            self._pending_io.pop(vmid, None)
            raise
        return upid

    # ------------------------------------------------------------ config

    async def _config_get(self, request: web.Request) -> web.Response:
        """qemu-server's vm_config: the config with its pending changes applied (`current=1`: without), and the
        digest of the whole config file (load_current_config; parse_vm_config hashes the raw file)."""
        from fakepve.server import ok
        p = self._verify(request, await request_params(request))
        vm = self._vm(request, "VM.Audit")
        cfg = dict(vm.config)
        if str(p.get("current") or "0") not in ("1", "true"):
            for key, value in vm.pending.items():
                if value is None:
                    cfg.pop(key, None)
                else:
                    cfg[key] = value
        if "memory" in cfg:
            cfg["memory"] = str(cfg["memory"])  # PVE sends it as a string
        cfg["digest"] = config_digest(vm)
        return ok(cfg)

    async def _config_post(self, request: web.Request) -> web.Response:
        """qemu-server's update_vm_api. Every version checks the keys' privileges, the bridges, a stale digest
        and a `lock:` flag before the qmconfig task forks (HTTP 403/500). Before 9.1.19 it also takes the
        config lock and checks the tag policy first, so a lock timeout or a refused tag is an HTTP error too;
        9.1.19+ forks before locking, and both become the task's failure."""
        from fakepve.server import USER
        p = await request_params(request)
        self._verify(request, p)
        vm = self._vm(request)
        user = request[USER]
        self.check_vm_formats(p)
        self._check_config_privileges(user, vm, p)
        self._check_bridge_access(user, p)
        self._check_drive_formats(p)
        if p.get("digest") and p["digest"] != config_digest(vm):
            raise PveError(500, "checksum mismatch (file change by other user?)")
        if not p.get("skiplock"):
            self._check_lock(vm)
        if not self.qemu_at_least(9, 1, 19):
            try:
                await self.acquire(vm, "config-api")
            except TaskError as e:
                raise PveError(500, str(e)) from e
            try:
                self._check_config_tags(user, vm, p)
            finally:
                self.release(vm, "config-api")
        response: web.Response = await super()._config_post(request)
        return response

    def _check_config_privileges(self, user: str, vm: FakeVm, p: dict[str, Any]) -> None:
        keys = [k for k in p if k not in ("node", "vmid", "digest", "skiplock", "background_delay", "delete",
                                          "revert", "force")]
        keys += [k for k in str(p.get("delete") or "").split(",") if k]
        for key in keys:
            priv = self._config_priv(key)
            if priv == "root":
                if user != "root@pam":
                    raise PveError(403, f"only root can set '{key}' config")
            elif not DRIVE_KEY.match(key):
                self.require(user, f"/vms/{vm.vmid}", priv)

    def _config_priv(self, key: str) -> str:
        """qemu-server's check_vm_modify_config_perm groups (fakepve files ostype and cloud-init under HWType):
        ostype is a general option (VM.Config.Options); cloud-init options and ipconfigN need VM.Config.Cloudinit
        or VM.Config.Network; netN VM.Config.Network."""
        if key in CLOUDINIT_OPTIONS or re.fullmatch(r"ipconfig\d+", key):
            return "VM.Config.Cloudinit|VM.Config.Network"
        if key in GENERAL_OPTIONS:
            return "VM.Config.Options"
        if key in HWTYPE_OPTIONS:
            return "VM.Config.HWType"
        return str(super()._config_priv(key))

    def _check_config_tags(self, user: str, vm: FakeVm, p: dict[str, Any]) -> None:
        deleted = "tags" in str(p.get("delete") or "").split(",")
        if "tags" in p or deleted:
            self.assert_tag_permissions(user, vm.vmid, vm.config.get("tags"), "" if deleted else p.get("tags"))

    @staticmethod
    def check_vm_formats(p: dict[str, Any]) -> None:
        """The API schema's formats fakepve leaves unchecked (HTTP 400 before the handler runs): a VM's cpu
        (pve-vm-cpu-conf: validate_vm_cpu_conf) and cicustom (pve-qm-cicustom: volume ids)."""
        errors: dict[str, str] = {}
        if p.get("cpu") not in (None, ""):
            props = parse_props(str(p["cpu"]), "cputype")
            unknown = sorted(set(props) - CPU_KEYS)
            if unknown:
                errors["cpu"] = f"invalid format - property '{unknown[0]}' is not defined in this format"
            elif not props.get("cputype"):
                errors["cpu"] = "CPU is missing cputype"
            elif props["cputype"] not in CPU_TYPES and not props["cputype"].startswith("custom-"):
                errors["cpu"] = f"Built-in cputype '{props['cputype']}' is not defined (missing 'custom-' prefix?)"
        if p.get("cicustom") not in (None, ""):
            props = parse_props(str(p["cicustom"]), None)
            unknown = sorted(set(props) - CICUSTOM_KEYS)
            bad = [k for k in CICUSTOM_KEYS & set(props) if not re.fullmatch(r"[a-z][a-z0-9\-_.]*[a-z0-9]:.+",
                                                                               props[k], re.IGNORECASE)]
            if unknown:
                errors["cicustom"] = f"invalid format - property '{unknown[0]}' is not defined in this format"
            elif bad:
                errors["cicustom"] = f"invalid format - {bad[0]}: unable to parse volume ID '{props[bad[0]]}'"
        if errors:
            raise PveError(400, "Parameter verification failed.", errors)

    def check_cicustom_files(self, vm: FakeVm) -> None:
        """At start qemu-server writes the cloud-init drive: each cicustom volume must be a snippet that exists
        (Cloudinit.pm read_cloudinit_snippets_file, pve-storage abs_filesystem_path)."""
        for volid in parse_props(str(vm.config.get("cicustom") or ""), None).values():
            sid, name = volume_ref(volid)
            if sid not in self.storages:
                raise TaskError(f"storage '{sid}' does not exist")
            if not name.startswith("snippets/"):
                raise TaskError(f"{volid} is not in the snippets directory")
            path = self.volume_file(volid)
            if path is None or not path.is_file():
                raise TaskError(f"can't find file '{volid}'")

    def vendor_data(self, vm: FakeVm) -> str:
        """What qemu-server writes as the cloud-init drive's vendor-data: the cicustom vendor snippet, else ''."""
        volid = parse_props(str(vm.config.get("cicustom") or "")).get("vendor")
        path = self.volume_file(volid) if volid else None
        return path.read_text() if path is not None and path.is_file() else ""

    async def _apply_config(self, vm: FakeVm, user: str, p: dict[str, Any]) -> None:
        self.check_vm_formats(p)
        updates = dict(p)
        digest = updates.pop("digest", None)  # checked here over the whole file (fakepve's ignores [PENDING])
        if digest and digest != config_digest(vm):
            raise PveError(500, "checksum mismatch (file change by other user?)")
        self._check_lock(vm)
        self._check_bridge_access(user, updates)
        self._check_config_tags(user, vm, updates)
        self._prohibit_tpm_version_change(vm, updates)
        self._enrol_ms_2023(vm, updates)
        if updates.get("tags"):
            # every version sorts and lowercases tags on update (the datacenter default tag-style)
            updates["tags"] = format_tags(updates["tags"])
        made: list[str] = []
        try:
            for key in sorted(updates):
                if not DRIVE_KEY.match(key):
                    continue
                volume, props = split_drive(str(updates[key]))
                current = split_drive(str(vm.config.get(key, "")))[0]
                if volume.endswith(":cloudinit") and re.fullmatch(
                        rf"{re.escape(volume_ref(volume)[0] or '')}:(\d+/)?vm-{vm.vmid}-cloudinit(\.\w+)?", current):
                    updates[key] = vm.config[key]  # already this storage's cloud-init drive: no change
                    continue
                if not (volume.endswith(":cloudinit") or "import-from" in props or
                        (NEW_DISK.match(volume) and props.get("media") != "cdrom")):
                    continue
                self.require(user, f"/vms/{vm.vmid}", "VM.Config.Disk")
                self._qm_check_drive(user, vm.vmid, None, key, str(updates[key]), None)
                try:
                    updates[key], volids = self._qm_new_drive(vm.vmid, key, str(updates[key]), None)
                except TaskError as e:
                    raise PveError(500, str(e)) from e
                made.extend(volids)
                old_vol, old_props = split_drive(str(vm.config.get(key, "")))
                if old_vol and old_props.get("media") != "cdrom" and volume_ref(old_vol)[0]:
                    # PVE keeps a replaced disk as unusedN
                    n = 0
                    while f"unused{n}" in vm.config or f"unused{n}" in updates:
                        n += 1
                    updates[f"unused{n}"] = old_vol
            try:
                await self.ceph_io(vm)
            except TaskError as e:
                raise PveError(500, str(e)) from e
            await super()._apply_config(vm, user, updates)
        except BaseException:
            self._pending_io.pop(vm.vmid, None)
            for volid in made:
                self._qm_free(volid)
            raise

    # ------------------------------------------------------- clone, template

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
            try:
                await copy(made)
            except BaseException:
                for volid in made:
                    self._qm_free(volid)
                raise

        async def copy(made: list[str]) -> None:
            # The clone holds the target storage's lock while it allocates and copies (cfs_lock_storage).
            lock_sid = storage or next((volume_ref(v)[0] for v in sources.values() if volume_ref(v)[0]), "local")
            holder = f"clone {newid}"
            await self.storage_lock(lock_sid, holder)
            try:
                await self.duration("clone_full" if full else "clone_linked")
                await copy_disks(made)
            finally:
                self.storage_unlock(lock_sid, holder)

        async def copy_disks(made: list[str]) -> None:
            for opt, _vol, props in drives_of(dict(new.config)):
                src_vol = sources.get(opt)
                if src_vol is None:
                    continue
                if re.search(r"vm-\d+-cloudinit", src_vol):
                    sid = storage or volume_ref(src_vol)[0]
                    fmt = "qcow2" if self.storages[sid].get("type") == "dir" else "raw"
                    volid = self._alloc_named(sid, newid, f"vm-{newid}-cloudinit", fmt, CLOUDINIT_SIZE)
                    made.append(volid)
                    new.config[opt] = join_drive(volid, dict(props))
                    continue
                dst_vol = split_drive(new.config[opt])[0]
                if opt == "tpmstate0" and not full:
                    dst_vol = self._full_tpm_volume(new, src_vol, dst_vol, made)
                src_path, dst_path = self.volume_file(src_vol), self.volume_file(dst_vol)
                if src_path is None or dst_path is None or not src_path.exists():
                    continue
                sid = volume_ref(dst_vol)[0]
                info = await asyncio.to_thread(_qemu_img_info, src_path)
                if full or opt == "tpmstate0":
                    fmt = self._volumes(sid).get(volume_ref(dst_vol)[1], {}).get("format") or "raw"
                    await asyncio.to_thread(_convert_into, src_path, str(info["format"]), dst_path, fmt)
                else:
                    dst_path.parent.mkdir(parents=True, exist_ok=True)
                    rel = Path("..") / src_path.parent.name / src_path.name
                    await asyncio.to_thread(_run, ["qemu-img", "create", "-q", "-f", "qcow2", "-F",
                                                   str(info["format"]), "-b", str(rel), str(dst_path)])

        self._pending_io.setdefault(newid, []).append(io)
        return upid

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

    # ------------------------------------------------------------ node, cluster

    async def _nodes(self, request: web.Request) -> web.Response:
        """GET /nodes: this node, with its real certificate fingerprint."""
        from fakepve.server import ok

        from image_factory.lab.pki import cert_fingerprint
        response: web.Response = await super()._nodes(request)
        data = json.loads(response.text or "{}").get("data") or []
        with contextlib.suppress(OSError, ValueError):
            fp = cert_fingerprint(self.spec.cert)
            for item in data:
                item["ssl_fingerprint"] = fp
        return ok(data)

    async def _cluster_status(self, request: web.Request) -> web.Response:
        """A node that is not in a cluster lists only itself."""
        from fakepve.server import ok
        return ok([{"type": "node", "id": f"node/{self.spec.node}", "name": self.spec.node, "nodeid": 0,
                    "ip": self.spec.address, "local": 1, "online": 1, "level": ""}])

    # ------------------------------------------------------- resize, network

    def _routes_lab(self) -> list[tuple[str, str, Any]]:
        return [("GET", "/cluster/options", self._cluster_options_get),
                ("PUT", "/cluster/options", self._cluster_options_set),
                ("PUT", "/nodes/{node}/qemu/{vmid}/resize", self._qm_resize),
                ("GET", "/nodes/{node}/network", self._network_list),
                ("GET", "/nodes/{node}/status", self._node_status)]

    async def _cluster_options_get(self, v: dict[str, Any], user: str) -> dict[str, Any]:
        """pve-manager's get_options (API2/Cluster.pm): 200 to every user. Without Sys.Audit on / only
        `console` and `tag-style`; with it all of datacenter.cfg as PVE::DataCenterConfig parses it (tag-style
        and user-tag-access as objects, user-allow-list and registered-tags as arrays). Always `allowed-tags`."""
        stored = dict(self.cluster_options)
        if not self.allowed(user, "/", "Sys.Audit"):
            stored = {k: val for k, val in stored.items() if k in ("console", "tag-style")}
        answer: dict[str, Any] = {}
        for key, val in stored.items():
            if key in ("tag-style", "user-tag-access"):
                parsed: dict[str, Any] = dict(p.split("=", 1) for p in str(val).split(",") if "=" in p)
                if "user-allow-list" in parsed:
                    parsed["user-allow-list"] = [t for t in parsed["user-allow-list"].split(";") if t]
                if "case-sensitive" in parsed:
                    parsed["case-sensitive"] = int(parsed["case-sensitive"] in ("1", "true"))
                answer[key] = parsed
            elif key == "registered-tags":
                answer[key] = [t for t in str(val).split(";") if t]
            else:
                answer[key] = val
        answer["allowed-tags"] = sorted(self.allowed_tags(user))
        return answer

    def allowed_tags(self, user: str) -> set[str]:
        """pve-guest-common's get_allowed_tags: the tags this user may set and see."""
        privileged = self.allowed(user, "/", "Sys.Modify")
        allow, allow_list, registered = self.tag_policy()
        tags = set(allow_list) if allow != "none" or privileged else set()
        if allow in ("free", "existing") or privileged:
            for vm in self.vms:
                if privileged or self.allowed(user, f"/vms/{vm.vmid}", "VM.Audit"):
                    tags.update(_split_tags(vm.config.get("tags")))
        return tags | registered if privileged else tags - registered

    async def _cluster_options_set(self, v: dict[str, Any], user: str) -> None:
        self.require(user, "/", "Sys.Modify")
        for key in ("user-tag-access", "registered-tags", "tag-style"):
            if key in v:
                self.cluster_options[key] = str(v[key])
        for key in str(v.get("delete", "")).split(","):
            self.cluster_options.pop(key.strip(), None)

    async def _node_status(self, v: dict[str, Any], user: str) -> dict[str, Any]:
        self.require(user, f"/nodes/{v['node']}", "Sys.Audit")
        root = shutil.disk_usage(self.spec.storage_dir)
        mem = 32 * 1024 ** 3
        return {
            "pveversion": f"pve-manager/{self.version}/ec5affc9e41f1d79",
            "kversion": "Linux 6.8.12-9-pve #1 SMP PREEMPT_DYNAMIC PMX 6.8.12-9 (2025-03-16T19:18Z)",
            "current-kernel": {"sysname": "Linux", "release": "6.8.12-9-pve", "machine": "x86_64",
                               "version": "#1 SMP PREEMPT_DYNAMIC PMX 6.8.12-9 (2025-03-16T19:18Z)"},
            "boot-info": {"mode": "efi", "secureboot": 0},
            "uptime": 86400, "cpu": 0.02, "wait": 0.0, "loadavg": ["0.10", "0.12", "0.09"],
            "cpuinfo": {"model": "lab CPU", "cpus": 8, "cores": 8, "sockets": 1, "mhz": "3000.000",
                        "hvm": "1", "flags": "", "user_hz": 100},
            "memory": {"total": mem, "used": mem // 8, "free": mem - mem // 8, "available": mem - mem // 8},
            "swap": {"total": 0, "used": 0, "free": 0},
            "rootfs": {"total": root.total, "used": root.used, "free": root.free, "avail": root.free},
            "ksm": {"shared": 0},
        }

    async def _qm_resize(self, v: dict[str, Any], user: str) -> str:
        """qemu-server resize_vm (a task since PVE 8): grow the disk file and its size= in the config."""
        vm = self.find(v["node"], v["vmid"])
        disk, size = str(v["disk"]), str(v["size"])
        if v.get("digest") and v["digest"] != config_digest(vm):
            raise PveError(500, "checksum mismatch (file change by other user?)")
        if v.get("skiplock") and user != "root@pam":
            raise param_error(skiplock="Only root may use this option.")
        self._check_lock(vm)
        if disk not in vm.config or not DRIVE_KEY.match(disk):
            raise PveError(500, f"disk '{disk}' does not exist")
        volume, props = split_drive(str(vm.config[disk]))
        if props.get("media") == "cdrom":
            raise PveError(500, "you can't resize a cdrom")
        sid = volume_ref(volume)[0]
        if sid:
            self.require(user, f"/storage/{sid}", "Datastore.AllocateSpace")
        path = self.volume_file(volume)
        current = int(_qemu_img_info(path)["virtual-size"]) if path is not None and path.exists() else \
            _size_or_zero(props.get("size", "0"))
        found = re.fullmatch(r"(\+)?(\d+(?:\.\d+)?)([KMGT]?)", size)
        if not found:
            raise param_error(size=f"unable to parse size '{size}'")
        amount = int(float(found.group(2)) * {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3,
                                               "T": 1024 ** 4}[found.group(3)])
        new = current + amount if found.group(1) else amount
        if new < current:
            raise PveError(500, "shrinking disks is not supported")

        async def body() -> str | None:
            if new == current:
                return None
            proc = self.runners.get(vm.vmid)
            if proc is not None:
                await asyncio.to_thread(proc.qmp_command, "block_resize", {"device": f"drive-{disk}", "size": new})
            elif path is not None and path.exists():
                await asyncio.to_thread(_run, ["qemu-img", "resize", "-q", str(path), str(new)])
            props["size"] = format_size(new)
            vm.config[disk] = join_drive(volume, props)
            vol = self._volumes(sid).get(volume_ref(volume)[1]) if sid else None
            if vol is not None:
                vol["size"] = new
            return None
        upid: str = await self.task(vm.node, "resize", vm.vmid, user, body, vm=vm,
                                    log=[f"resize disk {disk} to {new} bytes"])
        return upid

    async def _network_list(self, v: dict[str, Any], user: str) -> list[dict[str, Any]]:
        """The node's interfaces: a NIC and the bridges the lab inventory's VMs use. pve-manager's network index
        (API2/Network.pm) answers every user, but hides each bridge the caller holds neither SDN.Audit nor
        SDN.Use on (/sdn/zones/localnetwork/<bridge>, or a VLAN below it)."""
        kind = v.get("type")
        out: list[dict[str, Any]] = [{"iface": "eno1", "type": "eth", "method": "manual", "method6": "manual",
                                      "families": ["inet"], "priority": 2, "active": 1, "exists": 1}]
        for n, bridge in enumerate(self.spec.extra.get("bridges") or ["vmbr0"]):
            item: dict[str, Any] = {"iface": bridge, "type": "bridge", "method": "manual", "method6": "manual",
                                    "families": ["inet"], "priority": 3 + n, "active": 1, "autostart": 1,
                                    "exists": 1, "bridge_ports": "eno1" if n == 0 else "",
                                    "bridge_stp": "off", "bridge_fd": "0"}
            # As PVE's GUI writes a VLAN-aware bridge (bridge-vlan-aware yes, bridge-vids 2-4094); a test can
            # make one VLAN-unaware or narrow its VLANs (control op bridge_vlans).
            vlans = self.bridge_vlans.get(bridge, {"bridge_vlan_aware": 1, "bridge_vids": "2-4094"})
            item.update({k: v for k, v in vlans.items() if v is not None})
            if n == 0:
                item.update(method="static", address=self.spec.address, netmask="255.255.255.0",
                            cidr=f"{self.spec.address}/24")
            out.append(item)
        out = [i for i in out if i["type"] != "bridge" or self._may_see_bridge(user, i["iface"])]
        if kind in ("bridge", "any_bridge"):
            return [i for i in out if i["type"] == "bridge"]
        if kind == "eth":
            return [i for i in out if i["type"] == "eth"]
        return out

    def _may_see_bridge(self, user: str, bridge: str) -> bool:
        """pve-access-control's check_sdn_bridge(..., ['SDN.Audit', 'SDN.Use']): the bridge, or one of its VLANs."""
        path = f"/sdn/zones/localnetwork/{bridge}"
        if self.allowed(user, path, "SDN.Audit|SDN.Use"):
            return True
        vlans = {p for who in (user, user.split("!")[0]) for p, _ in (self.acl or {}).get(who, [])
                 if p.startswith(path + "/")}
        return any(self.allowed(user, vlan, "SDN.Audit|SDN.Use") for vlan in vlans)

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

    # --------------------------------------------------------------- power

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

    # --------------------------------------------------------- guest agent

    async def _agent_call(self, match: Any, values: dict[str, Any]) -> Any:
        vm = self.find(values["node"], values["vmid"])
        command = match.template.rsplit("/", 1)[1]
        agent = str(vm.config.get("agent", "0")).split(",")[0].split("=")[-1]
        if agent not in ("1", "true"):
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
        from fakepve import agent as guest_agent
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
                import base64
                args["input-data"] = base64.b64encode(str(values["input-data"]).encode()).decode()
            return await asyncio.to_thread(ask, "guest-exec", args)
        if command == "exec-status":
            import base64
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
        import base64

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

    # --------------------------------------------------------------- control

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


def _check_untrusted_image(info: dict[str, Any], path: Path) -> None:
    """pve-storage's file_size_info($path, ..., $untrusted = 1), which qemu-server runs on an `import` volume (and
    an absolute path) before it imports from it: no qcow2 external data file, no vmdk of several extents or
    children, no backing file. The task dies with the file's path in the message."""
    specific = info.get("format-specific") or {}
    data = specific.get("data") or {}
    if specific.get("type") == "qcow2" and data.get("data-file"):
        raise TaskError(f"{path}: 'data-file' references are not allowed!")
    if specific.get("type") == "vmdk" and (len(info.get("children") or []) > 1 or len(data.get("extents") or []) > 1):
        raise TaskError(f"{path}: multiple children or extents are not allowed!")
    if info.get("backing-filename"):
        raise TaskError(f"backing file not allowed for untrusted image '{path}'!")


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


def _split_tags(text: Any) -> list[str]:
    """PVE::Tools::split_list of a tags value."""
    return [t for t in re.split(r"[;,\s]+", str(text or "")) if t]


def _size_or_zero(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        return 0


__all__ = ["LabPve", "NodeSpec", "parse_name_dir", "random_mac"]

