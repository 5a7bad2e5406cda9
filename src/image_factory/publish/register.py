"""Register an uploaded artifact as a template on one host, and remove guests publish owns.

PVE's "can't lock file ... got timeout" on create/template/destroy is retried (noted in the warnings); a
failure after create destroys the VM this run created (found by vmid + run id).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from image_factory.errors import RemoteError
from image_factory.platform import Platform
from image_factory.publish.decide import free_vmid
from image_factory.publish.gather import used_vmids
from image_factory.publish.model import Artifact, HostFailed, HostPlan, HostResult, PublishError
from image_factory.publish.names import template_description, template_tags
from image_factory.publish.send import HostContext
from image_factory.pve.client import ApiError, PveClient, retry_lock_timeouts
from image_factory.pve.codec import EfiDisk, MachineSpec, TpmState, format_tags
from image_factory.pve.templates import parse_description
from image_factory.site.inventory import Q35_CLOUDINIT_SLOT, Hypervisor

ALREADY_EXISTS_RE = re.compile(r"already exists", re.I)
CREATE_TIMEOUT = 1800.0
TASK_TIMEOUT = 600.0
CREATE_ATTEMPTS = 5
LOCK_RETRIES = 5
LOCK_RETRY_DELAY = 2.0
CLOUDINIT_SCSI = Q35_CLOUDINIT_SLOT
MS_2023_ENROLLED = "2023k"  # qemu-server 9.1.5+: Microsoft UEFI CA 2023, Windows UEFI CA 2023 and KEK 2K CA 2023

Guard = Callable[[str], None]  # raises LockLost when the host lock is gone before the named step


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def register(ctx: HostContext, plan: HostPlan, client: PveClient, result: HostResult, guard: Guard) -> None:
    """Create the VM from the import file, make it a template, and check it reads back as the one just made."""
    hv, art = ctx.hv, ctx.artifact
    assert plan.vmid is not None
    description = template_description(
        art.manifest, import_file=art.import_file, tested=art.tested, forced=art.forced, run_id=ctx.run_id,
        published_at=now(), efi_vars_file=art.efi_vars_file,
    )
    created: list[int] = []
    vmid = plan.vmid
    try:
        vmid = _create_on_a_free_id(ctx, plan.vmid, client, result, guard, description, created)
        ensure_ms_2023(client, vmid, art.manifest.platform, guard)
        guard(f"converting VM {vmid} to a template")
        task = retry_lock(lambda: _template(client, vmid), result, f"template {vmid}")
        if task is not None:
            result.warnings.extend(f"template {vmid}: {w}" for w in task.warnings)
        cfg = client.vm_config(vmid)
        meta = parse_description(str(cfg.get("description", "")))
        if str(cfg.get("template", "0")) != "1" or not meta or meta.get("digest") != art.manifest.digest:
            raise HostFailed(hv.name, f"VM {vmid} does not read back as the template just made")
    except BaseException:
        if created:
            cleanup_vm(client, created[-1], ctx.run_id, result)
        raise
    result.template_vmid, result.template_name = vmid, art.template_name


def _create_on_a_free_id(ctx: HostContext, planned: int, client: PveClient, result: HostResult, guard: Guard,
                         description: str, created: list[int]) -> int:
    """Create the VM; an id someone outside the lock took meanwhile (a human, another tool) moves it to the next
    free one. ``created`` gets the id once PVE accepted the create: from then on a failure cleans it up."""
    hv, art = ctx.hv, ctx.artifact
    tags = template_tags(art.manifest, art.tested)
    taken: set[int] = set()
    vmid = planned
    for _attempt in range(CREATE_ATTEMPTS):
        params = create_params(hv, art, vmid, description, tags)
        guard(f"creating VM {vmid}")
        try:
            task = retry_lock(lambda p=params: _create(client, p, created), result, f"create {vmid}")  # type: ignore[misc]
        except ApiError as exc:
            if ALREADY_EXISTS_RE.search(exc.pve_message):
                taken |= used_vmids(client) | {vmid}
                vmid = free_vmid(hv, taken)
                result.warnings.append(f"VMID {planned} was taken meanwhile; using {vmid}")
                continue
            raise
        result.warnings.extend(f"create {vmid}: {w}" for w in task.warnings)
        return vmid
    raise HostFailed(hv.name, f"could not find a free VMID after {CREATE_ATTEMPTS} attempts")


def _create(client: PveClient, params: dict[str, Any], created: list[int]) -> Any:
    upid = client.create_vm(**params)
    created.append(int(params["vmid"]))  # from here on the id is ours: clean it up on failure
    return client.wait_task(str(upid), timeout=CREATE_TIMEOUT)


def _template(client: PveClient, vmid: int) -> Any:
    upid = client.make_template(vmid)
    if isinstance(upid, str) and upid.startswith("UPID:"):
        return client.wait_task(upid, timeout=TASK_TIMEOUT)
    return None


def create_params(hv: Hypervisor, art: Artifact, vmid: int, description: str, tags: list[str]) -> dict[str, Any]:
    st = hv.storage
    params: dict[str, Any] = {
        "vmid": vmid,
        "name": art.template_name,
        "description": description,
        "tags": format_tags(tags),
        "ostype": "l26",
        "memory": min(art.image.memory, 2048),
        "cores": min(art.image.cpus, 2),
        "sockets": 1,
        "scsihw": "virtio-scsi-pci",
        "scsi0": f"{st.images}:0,import-from={st.import_}:import/{art.import_file}",
        "ide2": f"{st.cloudinit}:cloudinit",
        "boot": "order=scsi0",
        "serial0": "socket",
        "vga": "serial0",
        "agent": "enabled=1",
        "net0": f"virtio,bridge={hv.bridge}",
        **({"cpu": art.image.cpu} if art.image.cpu else {}),
    }
    for key, value in firmware_params(hv, art.manifest.platform, art.efi_vars_file).items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    return params


def firmware_params(hv: Hypervisor, ask: Platform, efi_vars_file: str = "") -> dict[str, Any]:
    """The create parameters of the template's firmware (docs/pve-facts.md, "UEFI, Secure Boot, vTPM"): OVMF
    with a 4m EFI vars volume (PVE copies its vars template in: Microsoft's and the distribution's keys with
    pre-enrolled-keys=1, none otherwise; or, for a key set PVE cannot make, the build's enrolled store, uploaded
    as ``efi_vars_file``, imported as it is), a TPM 2.0 state volume, the machine; the cloud-init drive of a q35
    template on SCSI. ms-cert is never written here: PVE marks 2023k itself when its vars hold the 2023 CAs,
    and a marker written by hand would claim certificates nobody enrolled (see ensure_ms_2023)."""
    st = hv.storage
    params: dict[str, Any] = {}
    if ask.machine != "pc":
        params["machine"] = MachineSpec(ask.machine).format()
    if ask.machine == "q35":
        params["ide2"] = None
        params[CLOUDINIT_SCSI] = f"{st.cloudinit}:cloudinit"
    if ask.firmware == "uefi":
        params["bios"] = "ovmf"
        if ask.own_store:
            if not efi_vars_file:
                raise PublishError(f"keys: {ask.keys}: the template needs the build's EFI variable store, and "
                                   "none was uploaded")
            params["efidisk0"] = EfiDisk.imported(st.images, f"{st.import_}:import/{efi_vars_file}").format()
        else:
            params["efidisk0"] = EfiDisk(f"{st.images}:1", "4m", ask.pre_enrolled_keys).format()
    if ask.tpm:
        params["tpmstate0"] = TpmState(f"{st.images}:1", "v2.0").format()
    return params


def ensure_ms_2023(client: PveClient, vmid: int, ask: Platform, guard: Guard) -> None:
    """Keys asking for Microsoft's 2023 CAs: the new VM's EFI disk must read ms-cert=2023k. PVE sets it at create
    when its OVMF vars template holds them (pve-edk2-firmware 4.2025.05+); otherwise setting ms-cert=2023 makes
    qemu-server (9.1.4+) enrol them with virt-fw-vars and write 2023k (OVMF.pm drive_change)."""
    if not ask.wants_ms_2023:
        return
    cfg = client.vm_config(vmid)
    efi = EfiDisk.parse(str(cfg.get("efidisk0", "")))
    if efi.ms_cert != MS_2023_ENROLLED:
        guard(f"enrolling Microsoft's 2023 UEFI CAs in VM {vmid}'s EFI disk")
        client.update_vm_config(vmid, digest=str(cfg.get("digest") or "") or None, timeout=TASK_TIMEOUT,
                                efidisk0=dataclasses.replace(efi, ms_cert="2023").format())
        efi = EfiDisk.parse(str(client.vm_config(vmid).get("efidisk0", "")))
    if efi.ms_cert != MS_2023_ENROLLED:
        raise PublishError(f"VM {vmid}: the EFI disk reads ms-cert={efi.ms_cert or '2011 (unset)'} after enrolling "
                           "Microsoft's 2023 CAs; update pve-edk2-firmware and qemu-server on the host")


def cleanup_vm(client: PveClient, vmid: int, run_id: str, result: HostResult) -> None:
    """Destroy the VM this run created (checked by its run id), whatever state it is in."""
    try:
        cfg = client.vm_config(vmid)
    except RemoteError:
        return  # PVE already removed it (a failed create cleans up after itself)
    meta = parse_description(str(cfg.get("description", "")))
    if not meta or meta.get("publish_run") != run_id:
        return
    try:
        destroy(client, vmid, result)
        result.cleaned_up.append(f"destroyed half-made VM {vmid}")
    except RemoteError as exc:
        result.cleaned_up.append(f"could NOT destroy half-made VM {vmid} ({exc}); the next publish removes it")


def retry_lock(fn: Callable[[], Any], result: HostResult, what: str) -> Any:
    """Run fn (a call and its task); retry PVE's "can't lock file ... got timeout", noting each retry."""

    def note(message: str) -> None:
        result.warnings.append(f"{what}: retrying after a lock timeout ({message.strip()[:160]})")

    return retry_lock_timeouts(fn, attempts=LOCK_RETRIES, delay=LOCK_RETRY_DELAY, on_retry=note)


def destroy(client: PveClient, vmid: int, result: HostResult) -> None:
    def once() -> Any:
        upid = client.destroy_vm(vmid)
        if isinstance(upid, str) and upid.startswith("UPID:"):
            return client.wait_task(upid, timeout=TASK_TIMEOUT)
        return None

    task = retry_lock(once, result, f"destroy {vmid}")
    if task is not None:
        result.warnings.extend(f"destroy {vmid}: {w}" for w in task.warnings)
