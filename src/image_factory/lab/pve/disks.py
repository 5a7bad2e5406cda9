"""Disks: import-from, cloud-init, EFI vars and TPM state drives as qemu-server creates them; resize."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from fakepve import FakeVm, PveError, TaskError
from fakepve.qemu import DRIVE_KEY, NEW_DISK, join_drive, split_drive, volume_ref
from fakepve.routing import param_error

from image_factory.lab.pve.base import (
    CLOUDINIT_SIZE,
    EFI_VARS_SIZE,
    TPMSTATE_SIZE,
    LabNodeBase,
    config_digest,
    convert_into,
    copy_efi_vars,
    efi_vars_template,
    qemu_img_info,
    run_tool,
)
from image_factory.lab.pve.props import format_size, parse_size

# efidisk0's ms-cert values by the qemu-server that introduced them (debian/changelog 9.0.27, 9.1.4, 9.1.5).
MS_CERT_SINCE = {"2011": (9, 0, 27), "2023": (9, 0, 27), "2023w": (9, 1, 4), "2023k": (9, 1, 5)}


def check_untrusted_image(info: dict[str, Any], path: Path) -> None:
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


def _size_or_zero(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        return 0


class Disks(LabNodeBase):  # a concern of LabPve (node.py)
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
            info = qemu_img_info(src_path) if src_path.exists() else None
            if info is None:
                raise TaskError(f"volume '{source}' does not exist")
            self._check_import_source(info, source)
            if source.startswith("/") or volume_ref(source)[1].startswith("import/"):
                check_untrusted_image(info, src_path)
            if key == "efidisk0":
                return self._import_efi_vars(vmid, sid, src_path, str(info["format"]), props)
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
        """Qemu.pm check_drive_param (8.3.12 and 9.x, HTTP 400 before the task): import-from only on a new disk of
        size 0. The efidisk0 values of this qemu-server (the API schema fakepve checks is the newest; the node's own
        format refused an ms-cert before 9.0.27 already, formats.py): ms-cert's values as they came; with
        import-from, efitype and pre-enrolled-keys must be given."""
        for key, value in params.items():
            if DRIVE_KEY.match(key) and "import-from" in split_drive(str(value))[1]:
                found = NEW_DISK.match(split_drive(str(value))[0])
                if not found or float(found.group(2)) != 0:
                    raise param_error(**{key: "'import-from' requires special syntax - use <storage ID>:0,"
                                              "import-from=<source>"})
        if "efidisk0" not in params:
            return
        _volume, props = split_drive(str(params["efidisk0"]))
        cert = props.get("ms-cert")
        if cert is not None:
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
        vars_file = efi_vars_template(props)
        volid, fmt = self._qm_alloc(sid, vmid, fmt, EFI_VARS_SIZE)
        path = self.volume_file(volid)
        if path is not None:  # exactly the vars template's size: OVMF's second flash must match its code's layout
            path.unlink(missing_ok=True)
            convert_into(vars_file, "raw", path, fmt)
        props["size"] = format_size(EFI_VARS_SIZE)
        if keys and self.qemu_at_least(9, 1, 5) and self.edk2_ms_2023:
            props["ms-cert"] = "2023k"
        return join_drive(volid, props), [volid]

    def _import_efi_vars(self, vmid: int, sid: str, src: Path, src_fmt: str,
                         props: dict[str, str]) -> tuple[str, list[str]]:
        """create_disks' import-from for efidisk0 (qemu-server 8.3.12 and 9.x alike): clone_disk allocates the size
        of the vars template efitype/pre-enrolled-keys pick (get_efivars_size) and copies that many bytes of the
        source as they are (pve-qemu's ``qemu-img dd -n osize=``); PVE enrols nothing and writes no ms-cert."""
        size = efi_vars_template(props).stat().st_size
        volid, fmt = self._qm_alloc(sid, vmid, props.pop("format", None), size)
        props["size"] = format_size(size)
        dest = self.volume_file(volid)

        async def copy() -> None:
            await self.storage_lock(sid, f"import {vmid}")
            try:
                if dest is not None:
                    await asyncio.to_thread(copy_efi_vars, src, src_fmt, dest, fmt, size)
            finally:
                self.storage_unlock(sid, f"import {vmid}")
        self._pending_io.setdefault(vmid, []).append(copy)
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
        current = int(qemu_img_info(path)["virtual-size"]) if path is not None and path.exists() else \
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
                await asyncio.to_thread(run_tool, ["qemu-img", "resize", "-q", str(path), str(new)])
            props["size"] = format_size(new)
            vm.config[disk] = join_drive(volume, props)
            vol = self._volumes(sid).get(volume_ref(volume)[1]) if sid else None
            if vol is not None:
                vol["size"] = new
            return None
        upid: str = await self.task(vm.node, "resize", vm.vmid, user, body, vm=vm,
                                    log=[f"resize disk {disk} to {new} bytes"])
        return upid

