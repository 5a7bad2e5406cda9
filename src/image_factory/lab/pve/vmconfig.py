"""VM config: create, read and update a VM's config as qemu-server does, with its formats and privileges."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp import web
from fakepve import FakeVm, PveError, TaskError
from fakepve.qemu import DRIVE_KEY, NEW_DISK, split_drive, volume_ref
from fakepve.server import USER, ok
from fakepve.server import params as request_params

from image_factory.lab.pve.base import (
    LabNodeBase,
    config_digest,
)
from image_factory.lab.pve.props import format_tags, split_props
from image_factory.site.inventory import CPU_TYPES

# qemu-server API2/Qemu.pm: $cloudinitoptions and the $generaloptions fakepve does not already file as Options
CLOUDINIT_OPTIONS = frozenset({"cicustom", "cipassword", "citype", "ciuser", "ciupgrade", "nameserver",
                               "searchdomain", "sshkeys"})
GENERAL_OPTIONS = frozenset({"autostart", "bios", "keyboard", "localtime", "migrate_downtime", "migrate_speed",
                             "ostype", "reboot", "startdate", "tdf", "template"})
HWTYPE_OPTIONS = frozenset({"acpi", "hotplug", "kvm", "machine", "scsihw", "smbios1", "tablet", "vga", "watchdog",
                            "audio0", "rng0"})  # fakepve files scsihw under Disk (its name starts with scsi)
# qemu-server's validate_vm_cpu_conf (CPUConfig.pm) checks a VM's cputype against qemu-server's model list (the
# factory's copy: inventory.CPU_TYPES) -- the lab knows no custom- models; its keys are formats.FORMATS["cpu"].
CICUSTOM_KEYS = frozenset({"meta", "network", "user", "vendor"})  # pve-qm-cicustom (QemuServer.pm)


class VmConfig(LabNodeBase):  # a concern of LabPve (node.py)
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

    async def _config_get(self, request: web.Request) -> web.Response:
        """qemu-server's vm_config: the config with its pending changes applied (`current=1`: without), and the
        digest of the whole config file (load_current_config; parse_vm_config hashes the raw file)."""
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
        """The validators of formats fakepve leaves unchecked (HTTP 400 before the handler runs; each value's keys
        were already parsed with the node's own format, Access.check_own_schema): a VM's cpu (pve-vm-cpu-conf:
        validate_vm_cpu_conf) and cicustom (pve-qm-cicustom: volume ids)."""
        errors: dict[str, str] = {}
        if p.get("cpu") not in (None, ""):
            props = split_props(str(p["cpu"]), "cputype")
            if not props.get("cputype"):
                errors["cpu"] = "invalid format - CPU is missing cputype\n"
            elif props["cputype"] not in CPU_TYPES and not props["cputype"].startswith("custom-"):
                errors["cpu"] = (f"invalid format - Built-in cputype '{props['cputype']}' is not defined (missing "
                                 "'custom-' prefix?)\n")
            elif "reported-model" in props:
                errors["cpu"] = "invalid format - Property 'reported-model' not allowed in VM-specific CPU config.\n"
        if p.get("cicustom") not in (None, ""):
            props = split_props(str(p["cicustom"]), None)
            bad = [k for k in CICUSTOM_KEYS & set(props) if not re.fullmatch(r"[a-z][a-z0-9\-_.]*[a-z0-9]:.+",
                                                                               props[k], re.IGNORECASE)]
            if bad:  # pve-storage's parse_volume_id dies inside the format's check_object: a nested format error
                errors["cicustom"] = (f"invalid format - format error\ncicustom.{bad[0]}: invalid format - unable to "
                                      f"parse volume ID '{props[bad[0]]}'\n\n")
        if errors:
            raise PveError(400, "Parameter verification failed.", errors)

    def check_cicustom_files(self, vm: FakeVm) -> None:
        """At start qemu-server writes the cloud-init drive: each cicustom volume must be a snippet that exists
        (Cloudinit.pm read_cloudinit_snippets_file, pve-storage abs_filesystem_path)."""
        for volid in split_props(str(vm.config.get("cicustom") or ""), None).values():
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
        volid = split_props(str(vm.config.get("cicustom") or "")).get("vendor")
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

