"""Act on a plan: clone, configure, resize, start, wait; remove what a failure half-made."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

from image_factory.deploy.desired import (
    DATA_DISK_KEYS,
    boot_disk,
    check_placement,
    describe,
    desired_config,
    disk_update_value,
    is_cdrom,
    select_vms,
)
from image_factory.deploy.gather import effective_config, plan_vms
from image_factory.deploy.model import DEFAULT_TIMEOUT, DeployPlan, DeployReport, NotReady, VmPlan, VmResult
from image_factory.deploy.present import progress_reporter
from image_factory.deploy.ready import wait_ready
from image_factory.deploy.run import ClientFactory, LockFactory, Run, SnippetWriter, ssh_host_lock
from image_factory.errors import FactoryError, Problem, RemoteError, ValidationFailed
from image_factory.ownership import INCOMPLETE_TAG, Marker
from image_factory.pve.client import ApiError, PveClient, TaskFailed, explain, retry_on_lock
from image_factory.pve.codec import NetSpec, format_tags, parse_props, parse_size, parse_tags
from image_factory.pve.hostlock import DEFAULT_WAIT, HostGuard, LockLost, owner_line
from image_factory.pve.sshlink import HostKeyMismatch
from image_factory.pve.templates import TemplateInfo
from image_factory.settings import Settings
from image_factory.site.inventory import Hypervisor, Site, Vm

TASK_POLL_INTERVAL = 0.25
CLONE_POLL_INTERVAL = 0.1  # the clone holds the host's clone lock: its end is on every later clone's path
LOCK_RETRY_ATTEMPTS = 5
LOCK_RETRY_DELAY = 2.0
MAX_WORKERS = 16


def _wait(client: PveClient, upid: Any, timeout: float, interval: float = TASK_POLL_INTERVAL) -> None:
    if isinstance(upid, str) and upid.startswith("UPID:"):
        client.wait_task(upid, timeout=timeout, interval=interval)


def _retry() -> AbstractContextManager[Callable[[Callable[[], Any]], Any]]:
    return retry_on_lock(attempts=LOCK_RETRY_ATTEMPTS, delay=LOCK_RETRY_DELAY)


def _exists(client: PveClient, vmid: int) -> dict[str, Any] | None:
    for e in client.list_vms():
        if int(e["vmid"]) == vmid:
            return e
    return None


def remove_vm(client: PveClient, vmid: int, *, timeout: float, guard: Callable[[str], None]) -> None:
    """Stop (if running) and destroy a VM with its disks; ``guard`` runs before each write."""
    if client.vm_status(vmid).get("status") == "running":
        guard(f"stopping VM {vmid}")
        with _retry() as retry:
            retry(lambda: _wait(client, client.stop_vm(vmid), timeout))
    guard(f"destroying VM {vmid}")
    with _retry() as retry:
        retry(lambda: _wait(client, client.destroy_vm(vmid), timeout))


def _clone(run: Run, client: PveClient, hv: Hypervisor, vm: Vm, template: TemplateInfo, timeout: float) -> None:
    params: dict[str, Any] = {"newid": vm.vmid, "name": vm.name, "full": 1 if vm.clone_mode == "full" else 0,
                              "description": describe(vm, template, run.run_id, incomplete=True)}

    source = client
    if hv.cluster is not None and template.node != hv.node:
        # A template on another node of the cluster, on shared storage: cloned where it is, to this node
        # (qemu-server clone_vm: target is allowed only from shared storage).
        params["target"] = hv.node
        source = client.on(template.node)

    def attempt() -> None:
        run.guard(hv, f"cloning {vm.name}")
        try:
            _wait(client, source.clone_vm(template.vmid, **params), timeout, CLONE_POLL_INTERVAL)
        except (ApiError, TaskFailed):
            # PVE removes a failed clone itself; make sure before a retry reuses the VMID.
            _remove_own_leftover(run, client, hv, vm, timeout)
            raise

    with run.clone_lock(hv), _retry() as retry:
        retry(attempt)


def _remove_own_leftover(run: Run, client: PveClient, hv: Hypervisor, vm: Vm, timeout: float) -> bool:
    """Destroy the VM only while this run holds the host lock and the VM's sealed marker names this run.

    After a lost lock another run may be re-creating the same VMID: its clone must never be removed.
    """
    if not run.holds(hv) or _exists(client, vm.vmid) is None:
        return False
    marker = Marker.parse(client.vm_config(vm.vmid).get("description"), vm.vmid)
    if not (marker.managed and marker.sealed and marker.run_id == run.run_id):
        return False
    remove_vm(client, vm.vmid, timeout=timeout, guard=lambda doing: run.guard(hv, doing))
    return True


def _configure(run: Run, client: PveClient, hv: Hypervisor, vm: Vm, template: TemplateInfo, only: set[str] | None,
               timeout: float) -> list[str]:
    """One config update (digest from a fresh GET); returns the keys PVE left pending (running VM)."""
    want = desired_config(vm, hv, template, run.run_id)
    config, _, digest = effective_config(client, vm.vmid)
    for disk in vm.disks:
        if config.get(disk.slot):
            if is_cdrom(config[disk.slot]):
                del want[disk.slot]  # another drive holds the slot: reported as unsafe drift, never replaced
            else:
                want[disk.slot] = disk_update_value(disk, str(config[disk.slot]))  # options only: no new volume
    extra_nets = [k for k in config if re.fullmatch(r"net\d+", k) and int(k[3:]) >= len(vm.nics)]
    deletes = extra_nets + [k for k in ("nameserver", "searchdomain", "sshkeys") if k not in want and k in config]
    if "cicustom" in config and "cicustom" not in want and (only is None or "cicustom" in only):
        deletes.append("cicustom")  # the inventory dropped its vendor data
    if "cicustom" in want and (only is None or "cicustom" in only):
        _put_vendor_snippet(run, hv, vm)
    params: dict[str, Any] = dict(want) if only is None else {k: v for k, v in want.items() if k in only}
    if deletes:
        params["delete"] = ",".join(deletes)
    if not params:
        return []
    run.guard(hv, f"configuring {vm.name}")
    with _retry() as retry:
        retry(lambda: client.update_vm_config(vm.vmid, digest=digest, timeout=timeout, **params))
    pending = client.vm_pending(vm.vmid)
    return sorted(str(i["key"]) for i in pending if "pending" in i or int(i.get("delete") or 0))


def _resize(run: Run, client: PveClient, hv: Hypervisor, vm: Vm, timeout: float) -> bool:
    disk = boot_disk(client.vm_config(vm.vmid))
    if disk is None or disk[1] >= vm.disk_gb * 1024**3:
        return False
    run.guard(hv, f"growing {vm.name}'s disk")
    with _retry() as retry:
        retry(lambda: _wait(client, client.resize_vm_disk(vm.vmid, disk[0], f"{vm.disk_gb}G"), timeout))
    return True


def _put_vendor_snippet(run: Run, hv: Hypervisor, vm: Vm) -> None:
    """The VM's vendor data into the host's snippets directory (by SSH: PVE's upload API refuses snippets), before
    ``cicustom`` names it; the file is named by its content, so one already there is this very file."""
    vendor = vm.cloudinit.vendor
    assert vendor is not None
    run.guard(hv, f"uploading {vm.name}'s vendor data")
    run.say(vm.name, f"vendor data {vendor.file} -> {vendor.snippet_name}")
    run.snippets(hv, vendor.snippet_name, vendor.text.encode())


def _grow_data_disks(run: Run, client: PveClient, hv: Hypervisor, vm: Vm, timeout: float) -> list[str]:
    """Grow every data disk smaller than the inventory's size (never shrink); returns what was grown."""
    config = client.vm_config(vm.vmid)
    grown = []
    for disk in vm.disks:
        value = config.get(disk.slot)
        if not value or is_cdrom(value) or not DATA_DISK_KEYS.match(disk.slot):
            continue
        if parse_size(parse_props(str(value), "file").get("size", "0")) >= disk.size_gb * 1024**3:
            continue
        run.guard(hv, f"growing {vm.name}'s {disk.slot}")
        grow = functools.partial(client.resize_vm_disk, vm.vmid, disk.slot, f"{disk.size_gb}G")
        with _retry() as retry:
            retry(lambda: _wait(client, grow(), timeout))  # noqa: B023 - called at once, inside this iteration
        grown.append(f"{disk.slot} grown to {disk.size_gb}G")
    return grown


def _start(run: Run, client: PveClient, hv: Hypervisor, vm: Vm, timeout: float) -> None:
    if client.vm_status(vm.vmid).get("status") == "running":
        return
    run.guard(hv, f"starting {vm.name}")
    with _retry() as retry:
        retry(lambda: _wait(client, client.start_vm(vm.vmid), timeout))



def _read_back_macs(client: PveClient, vm: Vm) -> list[str]:
    config, _, _ = effective_config(client, vm.vmid)
    macs = []
    for i in range(len(vm.nics)):
        raw = config.get(f"net{i}")
        macs.append((NetSpec.parse(str(raw)).mac or "") if raw else "")
    return macs


def _mark_incomplete(run: Run, client: PveClient, hv: Hypervisor, vm: Vm, template: TemplateInfo) -> bool:
    """Seal the state "incomplete" into the description (the next run re-creates it once it is stopped);
    the tag is only a hint for humans in the PVE UI."""
    try:
        run.guard(hv, f"marking {vm.name} incomplete")
        cfg = client.vm_config(vm.vmid)
        tags = format_tags([*parse_tags(cfg.get("tags")), INCOMPLETE_TAG])
        client.set_vm_config(vm.vmid, tags=tags, description=describe(vm, template, run.run_id, incomplete=True))
        return True
    except FactoryError:
        return False


class _Timer:
    def __init__(self, result: VmResult):
        self.result = result

    def phase(self, name: str) -> AbstractContextManager[None]:
        result = self.result

        class _P:
            def __enter__(self) -> None:
                self.t = time.monotonic()

            def __exit__(self, *exc: Any) -> None:
                result.phases[name] = result.phases.get(name, 0.0) + time.monotonic() - self.t

        return _P()


def _create(run: Run, client: PveClient, hv: Hypervisor, vm: Vm, template: TemplateInfo, result: VmResult,
            *, wait: bool, timeout: float) -> None:
    t = _Timer(result)
    run.say(vm.name, f"cloning {template.name} ({vm.clone_mode})")
    with t.phase("clone"):
        _clone(run, client, hv, vm, template, timeout)
    try:
        run.say(vm.name, "configuring (MACs, cloud-init, tags)")
        with t.phase("config"):
            _configure(run, client, hv, vm, template, None, timeout)
        with t.phase("resize"):
            if _resize(run, client, hv, vm, timeout):
                result.notes.append(f"disk grown to {vm.disk_gb}G")
        run.say(vm.name, "starting")
        with t.phase("start"):
            _start(run, client, hv, vm, timeout)
    except FactoryError as exc:
        result.error = explain(str(exc))
        if isinstance(exc, LockLost) or not run.holds(hv):
            result.cleanup = "not-touched"
            result.notes.append("the host lock was lost: the VM was left as it is (another run may own it now)")
            raise
        run.say(vm.name, "failed, removing the half-made VM")
        try:
            result.cleanup = "removed" if _remove_own_leftover(run, client, hv, vm, timeout) else "not-ours"
        except FactoryError as exc2:
            marked = _mark_incomplete(run, client, hv, vm, template)
            result.cleanup = "left-incomplete" if marked else "left-unmarked"
            result.notes.append(f"removal failed: {exc2}; VM left marked incomplete; a re-run re-creates it "
                                "once it is stopped")
        raise
    result.macs = _read_back_macs(client, vm)
    if wait:
        run.say(vm.name, "waiting for the guest agent")
        with t.phase("ready"):
            result.address = wait_ready(client, vm, timeout=timeout)


def _execute(run: Run, plan: VmPlan, vm: Vm, *, wait: bool, timeout: float) -> VmResult:
    result = VmResult(plan)
    started = time.monotonic()
    try:
        if plan.action == "blocked":
            result.state = "blocked"
            return result
        hv = run.site.hypervisors[plan.host]
        client = run.client(hv)
        template = run.templates.get((plan.host, plan.template_vmid)) if plan.template_vmid is not None else None
        if plan.action == "create":
            assert template is not None
            _create(run, client, hv, vm, template, result, wait=wait, timeout=timeout)
            result.state = "created"
        elif plan.action == "recreate":
            assert template is not None
            run.say(vm.name, "destroying for re-creation")
            with _Timer(result).phase("destroy"):
                remove_vm(client, vm.vmid, timeout=timeout, guard=lambda doing: run.guard(hv, doing))
            _create(run, client, hv, vm, template, result, wait=wait, timeout=timeout)
            result.state = "recreated"
        elif plan.action == "in-sync":
            result.state = "unchanged"
            result.macs = _read_back_macs(client, vm)
        elif plan.action == "drift":
            _correct(run, client, hv, vm, plan, template, result, wait=wait, timeout=timeout)
    except NotReady as exc:
        result.state = "not-ready"
        result.error = str(exc)
    except FactoryError as exc:
        result.state = "failed"
        result.error = result.error or explain(str(exc))
    except Exception as exc:  # a bug must not take the other VMs' threads down with it
        result.state = "failed"
        result.error = result.error or f"{type(exc).__name__}: {exc}"
    finally:
        result.phases["total"] = time.monotonic() - started
        run.say(vm.name, result.state)
    return result


def _correct(run: Run, client: PveClient, hv: Hypervisor, vm: Vm, plan: VmPlan, template: TemplateInfo | None,
             result: VmResult, *, wait: bool, timeout: float) -> None:
    t = _Timer(result)
    fields = {d.field for d in plan.safe_diffs}
    only = set()
    for f in fields:
        if f.endswith(".size"):
            continue
        if f.startswith("net") or DATA_DISK_KEYS.match(f.split(".")[0]):
            only.add(f.split(".")[0])
        elif f in ("template", "status"):
            continue
        else:
            only.add(f)
    if template is not None and "description" in fields:
        only.add("description")
    lineage_tpl = template
    if template is None or any(d.field == "template" for d in plan.diffs):
        # keep the recorded lineage in the description: a config update must not rewrite history
        lineage_tpl = None
    if only:
        run.say(vm.name, "correcting " + ", ".join(sorted(only)))
        with t.phase("config"):
            tpl = lineage_tpl or _recorded_template(client, vm)
            if lineage_tpl is None and not tpl.vmid:
                only.discard("description")
            pending = _configure(run, client, hv, vm, tpl, only, timeout)
        result.pending_restart = pending
        if pending:
            result.notes.append("takes effect at the next start: " + ", ".join(pending))
    if any(d.field.endswith(".size") and d.safe for d in plan.diffs):
        with t.phase("resize"):
            if _resize(run, client, hv, vm, timeout):
                result.notes.append(f"disk grown to {vm.disk_gb}G")
            result.notes.extend(_grow_data_disks(run, client, hv, vm, timeout))
    if "status" in fields:
        run.say(vm.name, "starting")
        with t.phase("start"):
            _start(run, client, hv, vm, timeout)
        if wait:
            with t.phase("ready"):
                result.address = wait_ready(client, vm, timeout=timeout)
    result.macs = _read_back_macs(client, vm)
    result.state = "drift-unresolved" if plan.unsafe else "corrected"


def _recorded_template(client: PveClient, vm: Vm) -> TemplateInfo:
    marker = Marker.parse(client.vm_config(vm.vmid).get("description"), vm.vmid)
    return TemplateInfo.recorded(marker.template_vmid or 0, marker.template or "unknown")


def deploy_vms(
    settings: Settings | None, site: Site, names: Iterable[str] | None = None, *, plane: str | None = None,
    dry_run: bool = False, wait: bool = True, timeout: float = DEFAULT_TIMEOUT, recreate: bool = False,
    allow_mgmt: bool = False, progress: bool = True, client_factory: ClientFactory | None = None,
    max_workers: int = MAX_WORKERS, lock_wait: int = DEFAULT_WAIT, lock_factory: LockFactory | None = None,
    run_id: str | None = None, snippet_writer: SnippetWriter | None = None,
) -> DeployReport:
    """Plan, then converge every selected VM.

    A real run first takes the host lock of every hypervisor it will change (in name order, so two
    runs never wait on each other crosswise), then reads and plans under those locks: a second run
    waits up to ``lock_wait`` seconds or stops with whom it waited for, having changed nothing. A dry
    run takes no lock and writes nothing anywhere.

    Each hypervisor has its own pool of ``max_workers`` threads (so one busy host never starves the
    other); on a host, clones run one at a time (the host's clone lock), while config, start and the
    readiness wait of VMs whose clone has finished overlap.
    """
    del settings
    started = time.monotonic()
    vms = select_vms(site, names, plane=plane)
    check_placement(site, vms)
    with progress_reporter(progress, vms) as say:
        run = Run(site, client_factory=client_factory, progress=say, run_id=run_id, snippet_writer=snippet_writer)
        if dry_run:
            plan = plan_vms(run, vms, recreate, allow_mgmt)
            results = [VmResult(p, "blocked" if p.action == "blocked" else "planned") for p in plan.vms]
            return DeployReport(results, True, time.monotonic() - started)
        try:
            _take_host_locks(run, vms, lock_factory or ssh_host_lock, lock_wait, say)
            plan = plan_vms(run, vms, recreate, allow_mgmt)
            results = _converge(run, plan, vms, wait=wait, timeout=timeout, max_workers=max_workers, say=say)
        finally:
            for guard in run.guards.values():
                guard.release()
    return DeployReport(results, False, time.monotonic() - started)


def _holder(run: Run, vm: Vm) -> Hypervisor | None:
    """The host the VM is on: its one candidate, or the one policy-placing candidate that holds its VMID."""
    hosts = run.site.candidates(vm)
    if len(hosts) == 1:
        return hosts[0]
    holding = [hv for hv in hosts if _exists(run.client(hv), vm.vmid) is not None]
    if len(holding) > 1:
        raise RemoteError(", ".join(h.name for h in holding), f"VMID {vm.vmid} exists on each of them: refusing "
                                                              f"to guess which is {vm.name}")
    return holding[0] if holding else None


def _take_host_locks(run: Run, vms: list[Vm], lock_factory: LockFactory, wait: int,
                     say: Callable[[str, str], None]) -> None:
    def waiting(host: str) -> None:
        for vm in vms:
            say(vm.name, f"waiting for the host lock of {host}")

    _lock_hosts(run, sorted({hv.name for vm in vms for hv in run.site.candidates(vm)}), lock_factory, wait, waiting)


def _lock_hosts(run: Run, hosts: list[str], lock_factory: LockFactory, wait: int,
                waiting: Callable[[str], None] = lambda host: None) -> None:
    owner = owner_line(run.run_id)
    by_cluster: dict[str, HostGuard] = {}
    for host in hosts:
        hv = run.site.hypervisors[host]
        if hv.cluster is None:
            waiting(host)
            run.guards[host] = _acquired(lock_factory(hv, owner, wait))
            continue
        if hv.cluster not in by_cluster:  # one lock for the cluster's nodes, through the first that answers
            waiting(hv.cluster)
            by_cluster[hv.cluster] = _cluster_guard(
                [run.site.hypervisors[h] for h in hosts if run.site.hypervisors[h].cluster == hv.cluster],
                lambda node: _acquired(lock_factory(node, owner, wait)))
        run.guards[host] = by_cluster[hv.cluster]


def _acquired(guard: HostGuard) -> HostGuard:
    guard.acquire()
    return guard


def _cluster_guard(nodes: list[Hypervisor], take: Callable[[Hypervisor], HostGuard]) -> HostGuard:
    """The cluster lock, taken through the first of the nodes that can be reached (a node may be down)."""
    unreached: list[str] = []
    for node in nodes:
        try:
            return take(node)
        except HostKeyMismatch:
            raise  # never a reason to try another node: the inventory or the network is wrong
        except RemoteError as exc:  # no connection (LockBusy is not one: the lock is there, and taken)
            unreached.append(str(exc))
    raise RemoteError(str(nodes[0].cluster), "cannot take the cluster lock through any node: " + "; ".join(unreached))


def _converge(run: Run, plan: DeployPlan, vms: list[Vm], *, wait: bool, timeout: float, max_workers: int,
              say: Callable[[str, str], None]) -> list[VmResult]:
    for p in plan.vms:
        say(p.vm, p.action if p.action != "blocked" else f"blocked: {p.reason}")
    by_name = {v.name: v for v in vms}
    by_host: dict[str, list[VmPlan]] = {}
    for p in plan.vms:
        by_host.setdefault(p.host, []).append(p)
    pools = {h: ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(ps))), thread_name_prefix=f"deploy-{h}")
             for h, ps in by_host.items()}
    try:
        futures = {p.vm: pools[p.host].submit(_execute, run, p, by_name[p.vm], wait=wait, timeout=timeout)
                   for p in plan.vms}
        return [futures[p.vm].result() for p in plan.vms]
    finally:
        for pool in pools.values():
            pool.shutdown(wait=True)


def destroy_vm(
    settings: Settings | None, site: Site, name: str, *, allow_mgmt: bool = False, timeout: float = DEFAULT_TIMEOUT,
    client_factory: ClientFactory | None = None, lock_wait: int = DEFAULT_WAIT, lock_factory: LockFactory | None = None,
) -> str:
    """Destroy one inventory VM this tool made; mgmt VMs only with ``allow_mgmt``. Returns what happened."""
    del settings
    vm = select_vms(site, [name])[0]
    check_placement(site, [vm])
    if vm.plane == "mgmt" and not allow_mgmt:
        raise ValidationFailed([Problem(site.vm_sources.get(vm.name, str(site.inventory_path)), vm.name, "",
                                        "is a mgmt VM (infrastructure-critical): destroying it needs "
                                        "--i-know-this-is-mgmt")])
    run = Run(site, client_factory=client_factory)
    hv = _holder(run, vm)
    if hv is None:
        return (f"{vm.name} ({vm.vmid}) does not exist on any of "
                f"{', '.join(h.name for h in site.candidates(vm))}: nothing to do")
    client = run.client(hv)
    client.version()  # TLS and token before the lock file is touched
    try:
        _lock_hosts(run, [hv.name], lock_factory or ssh_host_lock, lock_wait)
        if _exists(client, vm.vmid) is None:
            return f"{vm.name} ({vm.vmid}) does not exist on {hv.name}: nothing to do"
        marker = Marker.parse(client.vm_config(vm.vmid).get("description"), vm.vmid)
        if not marker.managed or marker.vm_name != vm.name:
            why = f" ({marker.problem})" if marker.problem else ""
            raise RemoteError(hv.name, f"VMID {vm.vmid} was not made by this tool for {vm.name}{why}: refusing to "
                                       "destroy it")
        if not marker.sealed:
            raise RemoteError(hv.name, f"VMID {vm.vmid}'s marker predates sealing: run deploy.vm -n {vm.name} once to "
                                       "re-seal it, then destroy")
        remove_vm(client, vm.vmid, timeout=timeout, guard=lambda doing: run.guard(hv, doing))
    finally:
        for guard in run.guards.values():
            guard.release()
    return f"{vm.name} ({vm.vmid}) destroyed on {hv.name}"


