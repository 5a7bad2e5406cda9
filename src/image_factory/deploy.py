"""Deploy the inventory's VMs: clone a tested template, write the fixed MACs, start, wait, converge.

One code path for planning and doing: :func:`plan_deploy` reads each hypervisor and turns every
selected VM into a :class:`VmPlan` (create / in-sync / drift / recreate / blocked, with the differing
fields); :func:`deploy_vms` executes exactly those plans (``dry_run`` stops after planning).

PVE behaviour this relies on (shared/pve-facts.md): a clone always gets fresh random MACs, so the
inventory MACs are written by one config update after the clone task has ended; ``sshkeys`` is
percent-encoded with ``quote(keys, safe="")``; MACs are compared case-insensitively on the parsed
``netN`` property string; clones on one host contend for the storage lock (10 s), so clones are
serialised per host and retried on "can't lock file ... got timeout"; every task is awaited on the
node named in its UPID.

A VM this tool made carries a marker block in its description (``managed-by: deevnet-image-factory``,
the inventory name, the template lineage, and ``factory-state: incomplete`` until the config update
has landed). A VM without the marker is never touched. A half-made VM is removed (stop, destroy with
purge and unreferenced disks); if that fails too it is tagged ``factory-incomplete`` and reported, and
the next run recreates it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import quote, unquote

from .errors import FactoryError, Problem, RemoteError, ValidationFailed
from .fanout import per_host
from .hostlock import DEFAULT_WAIT, HostGuard, HostLock, LockLost, owner_line
from .inventory import Hypervisor, Site, StaticIp, Vm
from .livemacs import MacUse, host_mac_uses, mac_collisions
from .ownership import INCOMPLETE_TAG, Marker, marker_block, user_description, with_marker
from .pve import ApiError, PveClient, TaskFailed, retry_on_lock
from .pvecodec import NetSpec, format_tags, parse_props, parse_size, parse_tags
from .settings import Settings
from .sshlink import SshLink

DEFAULT_TIMEOUT = 600.0
TASK_POLL_INTERVAL = 0.25
CLONE_POLL_INTERVAL = 0.1  # the clone holds the host's clone lock: its end is on every later clone's path
READY_POLL_INTERVAL = 2.0
LOCK_RETRY_ATTEMPTS = 5
LOCK_RETRY_DELAY = 2.0
MAX_WORKERS = 16
SSH_PORT = 22
DISK_KEYS = re.compile(r"^(scsi|virtio|sata|ide)\d+$")

Action = Literal["create", "in-sync", "drift", "recreate", "blocked"]
ClientFactory = Callable[[Hypervisor], PveClient]


class DeployError(FactoryError):
    """A deploy step failed for one VM (carried in the report, not raised out of deploy_vms)."""


class NotReady(DeployError):
    """The VM is configured and started, but the guest did not show up in time (it is kept)."""


# ------------------------------------------------------------------------------- property strings


def nic_net(vm: Vm, hv: Hypervisor, index: int) -> NetSpec:
    nic = vm.nics[index]
    opts = {"bridge": nic.bridge or hv.bridge, "firewall": "1" if nic.firewall else "0"}
    if nic.vlan is not None:
        opts["tag"] = str(nic.vlan)
    return NetSpec(nic.model, nic.mac.lower(), tuple(sorted(opts.items())))


def encode_sshkeys(keys: Iterable[str]) -> str:
    """PVE wants the newline-separated keys percent-encoded, spaces as %20 (never '+')."""
    return quote("\n".join(keys), safe="")


def decode_sshkeys(value: str) -> list[str]:
    return [line.strip() for line in unquote(value).splitlines() if line.strip()]


def ipconfig_value(vm: Vm) -> str:
    ip = vm.cloudinit.ipconfig
    if isinstance(ip, StaticIp):
        return f"ip={ip.ip},gw={ip.gw}" if ip.gw else f"ip={ip.ip}"
    return "ip=dhcp"


# ------------------------------------------------------------------------------------ templates


@dataclass(frozen=True)
class TemplateRef:
    vmid: int
    name: str
    build_id: str
    tags: tuple[str, ...]
    digest: str = ""
    is_tested: bool | None = None

    @property
    def tested(self) -> bool:
        if self.is_tested is not None:
            return self.is_tested
        return "tested" in self.tags and "untested" not in self.tags


def find_templates(client: PveClient, image_name: str) -> list[TemplateRef]:
    """Factory templates of ``image_name`` on the client's node, newest first: the publish stage's own
    lookup (its description header, ``image-factory`` tag, newest by publish time then vmid)."""
    from .publish import find_templates as published

    return [TemplateRef(t.vmid, t.name, t.build_id, tuple(t.tags), t.digest, t.tested)
            for t in published(client, image_name)]


def choose_template(host: str, vm: Vm, templates: list[TemplateRef]) -> tuple[TemplateRef | None, str]:
    """The template to clone (the pinned one or the newest tested one), or None and why not."""
    if vm.template_vmid is not None:
        pinned = [t for t in templates if t.vmid == vm.template_vmid]
        if not pinned:
            return None, (f"pinned template_vmid {vm.template_vmid} is not a template of image {vm.image} "
                          f"on {host}")
        if not pinned[0].tested:
            return None, f"pinned template {pinned[0].name} ({pinned[0].vmid}) did not pass its image tests"
        return pinned[0], ""
    tested = [t for t in templates if t.tested]
    if not tested:
        have = ", ".join(f"{t.name} ({t.vmid}, untested)" for t in templates) or "none"
        return None, f"no tested template of image {vm.image} on {host} (found: {have}); publish one first"
    return tested[0], ""


# ------------------------------------------------------------------------------------ descriptions


def describe(vm: Vm, template: TemplateRef, run_id: str, *, incomplete: bool = False) -> str:
    """The inventory's description followed by the factory's sealed marker block (ownership.py)."""
    block = marker_block(vm_name=vm.name, vmid=vm.vmid, template=template.name, template_vmid=template.vmid,
                         run_id=run_id, incomplete=incomplete, template_digest=template.digest)
    return with_marker(vm.description, block)


# ----------------------------------------------------------------------------------- plan model


@dataclass
class FieldDiff:
    field: str
    current: Any
    desired: Any
    safe: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.field}: {self.current!r} -> {self.desired!r}" + ("" if self.safe else " (unsafe)")


@dataclass
class VmPlan:
    vm: str
    plane: str
    host: str
    node: str
    vmid: int
    action: Action
    reason: str = ""
    template: str | None = None
    template_vmid: int | None = None
    clone_mode: str = "full"
    macs: list[str] = field(default_factory=list)
    diffs: list[FieldDiff] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    running: bool | None = None

    @property
    def unsafe(self) -> list[FieldDiff]:
        return [d for d in self.diffs if not d.safe]

    @property
    def safe_diffs(self) -> list[FieldDiff]:
        return [d for d in self.diffs if d.safe]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["diffs"] = [x.to_dict() for x in self.diffs]
        return d


@dataclass
class DeployPlan:
    vms: list[VmPlan]
    recreate: bool = False

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for p in self.vms:
            counts[p.action] = counts.get(p.action, 0) + 1
        return {"vms": [p.to_dict() for p in self.vms], "counts": counts, "recreate": self.recreate}


State = Literal["planned", "created", "recreated", "corrected", "unchanged", "drift-unresolved", "blocked",
                "failed", "not-ready"]


@dataclass
class VmResult:
    plan: VmPlan
    state: State = "planned"
    error: str | None = None
    cleanup: str | None = None  # "removed" | "left-incomplete" | None
    macs: list[str] = field(default_factory=list)  # read back from the API after the run
    address: str | None = None
    pending_restart: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state not in ("failed", "blocked", "not-ready")

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.plan.vm, "host": self.plan.host, "vmid": self.plan.vmid, "plane": self.plan.plane,
            "action": self.plan.action, "state": self.state, "error": self.error, "cleanup": self.cleanup,
            "template": self.plan.template, "template_vmid": self.plan.template_vmid,
            "macs": self.macs or self.plan.macs, "address": self.address, "pending_restart": self.pending_restart,
            "phases": {k: round(v, 3) for k, v in self.phases.items()}, "notes": self.plan.notes + self.notes,
            "diffs": [d.to_dict() for d in self.plan.diffs], "reason": self.plan.reason,
        }


@dataclass
class DeployReport:
    results: list[VmResult]
    dry_run: bool = False
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "dry_run": self.dry_run, "wall_s": round(self.wall_s, 3),
                "vms": [r.to_dict() for r in self.results]}


# ------------------------------------------------------------------------------------ selection


def select_vms(site: Site, names: Iterable[str] | None = None, *, plane: str | None = None) -> list[Vm]:
    """The VMs to act on, in inventory order; unknown names and a plane mismatch are errors."""
    wanted = [n for n in (names or []) if n]
    if plane is not None and plane not in ("mgmt", "tenant"):
        raise ValidationFailed([Problem(str(site.inventory_path), "", "--plane", f"unknown plane {plane!r}")])
    unknown = [n for n in wanted if n not in site.vms]
    if unknown:
        raise ValidationFailed(
            Problem(str(site.inventory_path), n, "", f"no such VM in the inventory (have: {', '.join(site.vms)})")
            for n in unknown
        )
    vms = [site.vms[n] for n in dict.fromkeys(wanted)] if wanted else list(site.vms.values())
    if plane is not None:
        if wanted:
            other = [v.name for v in vms if v.plane != plane]
            if other:
                raise ValidationFailed(
                    Problem(str(site.inventory_path), n, "vm.plane", f"is not a {plane} VM") for n in other
                )
        vms = [v for v in vms if v.plane == plane]
    return vms


def check_placement(site: Site, vms: Iterable[Vm]) -> None:
    """Re-assert the placement policy per VM before any API call (load_site checked it too)."""
    problems = []
    for vm in vms:
        try:
            hv = site.hypervisor_for(vm)
        except (KeyError, StopIteration):
            problems.append(Problem(site.vm_sources.get(vm.name, str(site.inventory_path)), vm.name,
                                    "vm.hypervisor", f"no {vm.plane} hypervisor for this VM"))
            continue
        if hv.role != vm.plane:
            problems.append(Problem(
                site.vm_sources.get(vm.name, str(site.inventory_path)), vm.name, "vm.hypervisor",
                f"refused: {vm.plane} VMs may only run on the {vm.plane} hypervisor, but {hv.name} has role "
                f"{hv.role} (nothing was sent to any hypervisor)",
            ))
        elif vm.vmid not in hv.vm_vmids:
            problems.append(Problem(
                site.vm_sources.get(vm.name, str(site.inventory_path)), vm.name, "vm.vmid",
                f"refused: {vm.vmid} is outside {hv.name}'s vm_vmids {hv.vm_vmids.first}-{hv.vm_vmids.last}",
            ))
    if problems:
        raise ValidationFailed(problems)


# ----------------------------------------------------------------------------------- desired state


def desired_config(vm: Vm, hv: Hypervisor, template: TemplateRef, run_id: str) -> dict[str, str]:
    """The one config update written after the clone (strings as PVE takes them)."""
    cfg: dict[str, str] = {}
    for i in range(len(vm.nics)):
        cfg[f"net{i}"] = nic_net(vm, hv, i).format()
    cfg["name"] = vm.name
    cfg["cores"] = str(vm.cores)
    cfg["memory"] = str(vm.memory)
    ci = vm.cloudinit
    cfg["ciuser"] = ci.user
    if ci.ssh_keys:
        cfg["sshkeys"] = encode_sshkeys(ci.ssh_keys)
    cfg["ipconfig0"] = ipconfig_value(vm)
    if ci.nameserver:
        cfg["nameserver"] = ci.nameserver
    if ci.searchdomain:
        cfg["searchdomain"] = ci.searchdomain
    cfg["ciupgrade"] = "1" if ci.upgrade else "0"
    cfg["tags"] = format_tags(vm.all_tags)
    cfg["description"] = describe(vm, template, run_id)
    return cfg


def boot_disk(config: Mapping[str, Any]) -> tuple[str, int] | None:
    """(key, size in bytes) of the VM's boot disk: first in ``boot: order=``, else scsi0/virtio0/sata0/ide0."""
    order = parse_props(str(config.get("boot", "")), "legacy").get("order", "")
    candidates = [k for k in order.split(";") if DISK_KEYS.match(k)]
    candidates += [k for k in ("scsi0", "virtio0", "sata0", "ide0") if k not in candidates]
    for key in candidates:
        value = config.get(key)
        if not value:
            continue
        props = parse_props(str(value), "file")
        if props.get("media") == "cdrom" or "cloudinit" in props.get("file", ""):
            continue
        try:
            return key, parse_size(props.get("size", "0"))
        except ValueError:
            return key, 0
    return None


def _effective_config(client: PveClient, vmid: int) -> tuple[dict[str, Any], list[str], str]:
    """The config the next start will use (pending values applied), the pending keys, and the digest."""
    config = client.vm_config(vmid)
    digest = str(config.pop("digest", ""))
    pending_keys: list[str] = []
    try:
        pending = client.vm_pending(vmid)
    except ApiError:
        pending = []
    for item in pending or []:
        key = str(item.get("key"))
        if int(item.get("delete") or 0):
            config.pop(key, None)
            pending_keys.append(key)
        elif "pending" in item:
            config[key] = item["pending"]
            pending_keys.append(key)
    return config, pending_keys, digest


UNSAFE_NIC_KEYS = frozenset({"tag", "bridge"})


def compare(vm: Vm, hv: Hypervisor, template: TemplateRef | None, config: Mapping[str, Any]) -> list[FieldDiff]:
    """Differences between the VM's effective config and the inventory; ``safe`` ones a config update fixes."""
    diffs: list[FieldDiff] = []
    nets = sorted((k for k in config if re.fullmatch(r"net\d+", k)), key=lambda k: int(k[3:]))
    for i in range(len(vm.nics)):
        want = nic_net(vm, hv, i)
        have_raw = config.get(f"net{i}")
        if have_raw is None:
            diffs.append(FieldDiff(f"net{i}", None, want.format(), True))
            continue
        try:
            have = NetSpec.parse(str(have_raw))
        except ValueError:
            diffs.append(FieldDiff(f"net{i}", have_raw, want.format(), True))
            continue
        if (have.mac or "").lower() != (want.mac or "").lower():
            diffs.append(FieldDiff(f"net{i}.mac", have.mac, want.mac, True))
        if have.model != want.model:
            diffs.append(FieldDiff(f"net{i}.model", have.model, want.model, True))
        have_opts, want_opts = have.opts, want.opts
        have_opts.setdefault("firewall", "0")
        for key in sorted(set(have_opts) | set(want_opts)):
            if have_opts.get(key) != want_opts.get(key):
                # A NIC on another VLAN or bridge is on another network (another tenant's, maybe): reported,
                # never moved by a config update.
                diffs.append(FieldDiff(f"net{i}.{key}", have_opts.get(key), want_opts.get(key),
                                       key not in UNSAFE_NIC_KEYS))
    for key in nets:
        if int(key[3:]) >= len(vm.nics):
            diffs.append(FieldDiff(key, config[key], None, True))
    for key, want_v in (("name", vm.name), ("cores", str(vm.cores)), ("memory", str(vm.memory))):
        have_v = config.get(key)
        if have_v is None and key == "cores":
            have_v = "1"
        if str(have_v) != want_v:
            diffs.append(FieldDiff(key, have_v, want_v, True))
    ci = vm.cloudinit
    scalar = {
        "ciuser": ci.user, "nameserver": ci.nameserver, "searchdomain": ci.searchdomain,
        "ciupgrade": "1" if ci.upgrade else "0",
    }
    for key, want_s in scalar.items():
        have_s = config.get(key)
        if key == "ciupgrade" and have_s is None:
            have_s = "1"  # PVE's default
        if (None if have_s in (None, "") else str(have_s)) != want_s:
            diffs.append(FieldDiff(key, have_s, want_s, True))
    if decode_sshkeys(str(config.get("sshkeys", ""))) != list(ci.ssh_keys):
        diffs.append(FieldDiff("sshkeys", decode_sshkeys(str(config.get("sshkeys", ""))), list(ci.ssh_keys), True))
    have_ip = parse_props(str(config.get("ipconfig0", "")))
    if have_ip != parse_props(ipconfig_value(vm)):
        diffs.append(FieldDiff("ipconfig0", config.get("ipconfig0"), ipconfig_value(vm), True))
    have_tags, want_tags = parse_tags(config.get("tags")), parse_tags(vm.all_tags)
    if have_tags != want_tags:
        diffs.append(FieldDiff("tags", have_tags, want_tags, True))
    disk = boot_disk(config)
    want_bytes = vm.disk_gb * 1024**3
    if disk is not None and disk[1] < want_bytes:
        diffs.append(FieldDiff(f"{disk[0]}.size", _gib(disk[1]), f"{vm.disk_gb}G", True))
    elif disk is not None and disk[1] > want_bytes:
        diffs.append(FieldDiff(f"{disk[0]}.size", _gib(disk[1]), f"{vm.disk_gb}G (shrink: never done)", False))
    marker = Marker.parse(config.get("description"), vm.vmid)
    if template is not None and (marker.template, marker.template_vmid) != (template.name, template.vmid):
        have_t = f"{marker.template} ({marker.template_vmid})" if marker.template else None
        diffs.append(FieldDiff("template", have_t, f"{template.name} ({template.vmid})", False))
    elif user_description(config.get("description")) != vm.description.strip() or not marker.sealed:
        diffs.append(FieldDiff("description", "(differs)", "(inventory description + sealed marker)", True))
    return diffs


def _gib(n: int) -> str:
    return f"{n / 1024**3:g}G"


# ----------------------------------------------------------------------------------------- runner

LockFactory = Callable[[Hypervisor, str, int], HostGuard]


def ssh_host_lock(hv: Hypervisor, owner: str, wait: int) -> HostGuard:
    """The host lock publish takes too, held over the hypervisor's pinned SSH endpoint."""
    return HostLock(SshLink(hv.name, hv.ssh).connect(), hv.storage.import_dir, owner, wait=wait, owns_link=True)


class _Run:
    """Shared state of one plan/deploy run: clients, host locks, per-host clone locks, progress."""

    def __init__(self, site: Site, *, client_factory: ClientFactory | None, progress: Any = None,
                 run_id: str | None = None):
        self.site = site
        self.factory = client_factory or (lambda hv: PveClient(hv))
        self.clients: dict[str, PveClient] = {}
        self.clone_locks: dict[str, threading.Lock] = {}
        self.guards: dict[str, HostGuard] = {}
        self.templates: dict[tuple[str, int], TemplateRef] = {}  # (host, vmid) -> template seen while planning
        self._lock = threading.Lock()
        self.progress = progress
        self.run_id = run_id or uuid.uuid4().hex[:12]

    def client(self, hv: Hypervisor) -> PveClient:
        with self._lock:
            if hv.name not in self.clients:
                self.clients[hv.name] = self.factory(hv)
                self.clone_locks[hv.name] = threading.Lock()
            return self.clients[hv.name]

    def clone_lock(self, hv: Hypervisor) -> AbstractContextManager[Any]:
        self.client(hv)
        return self.clone_locks[hv.name]

    def guard(self, hv: Hypervisor, doing: str) -> None:
        """Before every write: this run must still hold the host lock (a dry run holds none and writes nothing)."""
        lock = self.guards.get(hv.name)
        if lock is None:
            raise AssertionError(f"write on {hv.name} without its host lock ({doing})")
        lock.ensure(doing)

    def holds(self, hv: Hypervisor) -> bool:
        lock = self.guards.get(hv.name)
        return lock is not None and lock.held

    def say(self, vm: str, text: str) -> None:
        if self.progress is not None:
            self.progress(vm, text)


@dataclass
class Observed:
    """What one host looks like for one inventory VM: the facts decide() needs, gathered by _gather_host."""

    entry: dict[str, Any] | None
    config: dict[str, Any] = field(default_factory=dict)
    pending_keys: list[str] = field(default_factory=list)


@dataclass
class HostState:
    templates: dict[str, list[TemplateRef]]
    vms: dict[int, Observed]
    macs: dict[str, list[MacUse]]


def _gather_host(run: _Run, hv: Hypervisor, vms: list[Vm]) -> HostState:
    client = run.client(hv)
    existing = {int(e["vmid"]): e for e in client.list_vms()}
    templates: dict[str, list[TemplateRef]] = {}
    observed: dict[int, Observed] = {}
    for vm in vms:
        if vm.image not in templates:
            templates[vm.image] = find_templates(client, vm.image)
            for t in templates[vm.image]:
                run.templates[(hv.name, t.vmid)] = t
        entry = existing.get(vm.vmid)
        if entry is None or int(entry.get("template") or 0):
            observed[vm.vmid] = Observed(entry)
            continue
        config, pending_keys, _ = _effective_config(client, vm.vmid)
        observed[vm.vmid] = Observed(entry, config, pending_keys)
    return HostState(templates, observed, host_mac_uses(client, hv.name, existing.values()))


def decide(vm: Vm, hv: Hypervisor, state: HostState, macs: Mapping[str, list[MacUse]] | None, *,
           recreate: bool = False, allow_mgmt: bool = False) -> VmPlan:
    """The plan for one VM from what its host looks like: a pure function (no I/O).

    ``macs`` maps every MAC on every hypervisor to where it is; None means they could not all be read,
    and then nothing that writes a MAC is planned.
    """
    plan = VmPlan(vm.name, vm.plane, hv.name, hv.node, vm.vmid, "create", clone_mode=vm.clone_mode, macs=list(vm.macs))

    def blocked(reason: str) -> VmPlan:
        plan.action, plan.reason = "blocked", reason
        return plan

    template, why = choose_template(hv.name, vm, state.templates.get(vm.image, []))
    if template is not None:
        plan.template, plan.template_vmid = template.name, template.vmid
    if macs is None:
        return blocked("cannot check that its MACs are unique on every hypervisor (a host could not be read)")
    collisions = mac_collisions(vm, hv.name, macs)
    if collisions:
        return blocked("; ".join(f"MAC {vm.macs[i]} (nics[{i}]) is already used by {use}" for i, use in collisions)
                       + ": refusing to write it (nothing changed)")
    seen = state.vms.get(vm.vmid, Observed(None))
    entry = seen.entry
    if entry is None:
        return blocked(why) if template is None else plan
    plan.running = entry.get("status") == "running"
    if int(entry.get("template") or 0):
        return blocked(f"VMID {vm.vmid} on {hv.name} is a template, not this VM")
    config = seen.config
    lock = entry.get("lock") or config.get("lock")
    if lock:
        return blocked(f"VMID {vm.vmid} on {hv.name} is locked ({lock}): a PVE task is working on it; "
                       "re-run when it has finished")
    marker = Marker.parse(config.get("description"), vm.vmid)
    if not marker.managed:
        detail = marker.problem or "no managed-by marker"
        fix = ("; if it is yours, restore the description's factory block as the factory wrote it"
               if marker.problem else "")
        return blocked(f"VMID {vm.vmid} on {hv.name} exists ({config.get('name')!r}) and was not made by this tool "
                       f"({detail}): left untouched{fix}")
    if marker.vm_name not in (None, vm.name):
        return blocked(f"VMID {vm.vmid} on {hv.name} belongs to inventory VM {marker.vm_name!r}, not {vm.name!r}")
    if seen.pending_keys:
        plan.notes.append("pending until next start: " + ", ".join(sorted(seen.pending_keys)))
    destroy_refusal = _destroy_refusal(vm, plan.running, recreate=recreate, allow_mgmt=allow_mgmt)
    if marker.incomplete:
        if template is None:
            return blocked(why)
        if plan.running and destroy_refusal:
            return blocked(f"marked incomplete by run {marker.run_id} but running: reported, not destroyed "
                           f"({destroy_refusal})")
        plan.action, plan.reason = "recreate", f"left incomplete by run {marker.run_id}: destroy and re-create"
        return plan
    plan.diffs = compare(vm, hv, template, config)
    if not plan.running:
        plan.diffs.append(FieldDiff("status", entry.get("status"), "running", True))
    if template is None:
        plan.notes.append(f"lineage not checked: {why}")
    if not plan.diffs:
        plan.action = "in-sync"
        return plan
    plan.action = "drift"
    if not plan.unsafe:
        return plan
    unsafe = "; ".join(str(d) for d in plan.unsafe)
    if recreate and template is not None and marker.sealed and not destroy_refusal:
        plan.action, plan.reason = "recreate", f"unsafe drift ({unsafe}), --recreate given"
    elif recreate and not marker.sealed:
        plan.reason = (f"unsafe drift is reported, not corrected: {unsafe} (its marker predates sealing: run "
                       "deploy.vm once without --recreate to re-seal it)")
    else:
        why = destroy_refusal or "re-create with --recreate"
        plan.reason = f"unsafe drift is reported, not corrected: {unsafe} ({why})"
    return plan


def _destroy_refusal(vm: Vm, running: bool | None, *, recreate: bool, allow_mgmt: bool) -> str:
    """Why this run may not destroy the VM, or "" (a running VM needs --recreate; mgmt also the mgmt flag)."""
    if not recreate:
        return "re-create only with --recreate" + (" --i-know-this-is-mgmt" if vm.plane == "mgmt" and running else "")
    if vm.plane == "mgmt" and running and not allow_mgmt:
        return "a running mgmt VM is re-created only with --recreate --i-know-this-is-mgmt"
    return ""


def _plan(run: _Run, vms: list[Vm], recreate: bool, allow_mgmt: bool = False) -> DeployPlan:
    by_host: dict[str, list[Vm]] = {h: [] for h in run.site.hypervisors}
    for vm in vms:
        by_host[run.site.hypervisor_for(vm).name].append(vm)
    gathered = per_host({h: (run.site.hypervisors[h], hvms) for h, hvms in by_host.items()},
                        lambda item: _gather_host(run, *item), name="deploy-gather")
    states, failures = gathered.results, gathered.failures
    macs: dict[str, list[MacUse]] | None = None
    if not failures:
        macs = {}
        for st in states.values():
            for mac, uses in st.macs.items():
                macs.setdefault(mac, []).extend(uses)
    plans: dict[str, VmPlan] = {}
    for host, hvms in by_host.items():
        hv = run.site.hypervisors[host]
        for vm in hvms:
            if host in failures:
                plans[vm.name] = VmPlan(vm.name, vm.plane, hv.name, hv.node, vm.vmid, "blocked",
                                        reason=f"cannot read {host}: {failures[host]}", clone_mode=vm.clone_mode,
                                        macs=list(vm.macs))
            else:
                plan = decide(vm, hv, states[host], macs, recreate=recreate, allow_mgmt=allow_mgmt)
                if macs is None:
                    plan.reason += " (" + "; ".join(f"{h}: {why}" for h, why in failures.items()) + ")"
                plans[vm.name] = plan
    return DeployPlan([plans[v.name] for v in vms], recreate)


def plan_deploy(
    settings: Settings | None, site: Site, names: Iterable[str] | None = None, *, plane: str | None = None,
    recreate: bool = False, allow_mgmt: bool = False, client_factory: ClientFactory | None = None,
) -> DeployPlan:
    """Read the hypervisors and plan every selected VM; changes nothing (takes no lock, writes nothing)."""
    del settings  # paths are already resolved into the site; kept for a uniform stage API
    vms = select_vms(site, names, plane=plane)
    check_placement(site, vms)
    return _plan(_Run(site, client_factory=client_factory), vms, recreate, allow_mgmt)


# ----------------------------------------------------------------------------------------- actions


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


def _clone(run: _Run, client: PveClient, hv: Hypervisor, vm: Vm, template: TemplateRef, timeout: float) -> None:
    params: dict[str, Any] = {"newid": vm.vmid, "name": vm.name, "full": 1 if vm.clone_mode == "full" else 0,
                              "description": describe(vm, template, run.run_id, incomplete=True)}

    def attempt() -> None:
        run.guard(hv, f"cloning {vm.name}")
        try:
            _wait(client, client.clone_vm(template.vmid, **params), timeout, CLONE_POLL_INTERVAL)
        except (ApiError, TaskFailed):
            # PVE removes a failed clone itself; make sure before a retry reuses the VMID.
            _remove_own_leftover(run, client, hv, vm, timeout)
            raise

    with run.clone_lock(hv), _retry() as retry:
        retry(attempt)


def _remove_own_leftover(run: _Run, client: PveClient, hv: Hypervisor, vm: Vm, timeout: float) -> bool:
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


def _configure(run: _Run, client: PveClient, hv: Hypervisor, vm: Vm, template: TemplateRef, only: set[str] | None,
               timeout: float) -> list[str]:
    """One config update (digest from a fresh GET); returns the keys PVE left pending (running VM)."""
    want = desired_config(vm, hv, template, run.run_id)
    config, _, digest = _effective_config(client, vm.vmid)
    extra_nets = [k for k in config if re.fullmatch(r"net\d+", k) and int(k[3:]) >= len(vm.nics)]
    deletes = extra_nets + [k for k in ("nameserver", "searchdomain", "sshkeys") if k not in want and k in config]
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


def _resize(run: _Run, client: PveClient, hv: Hypervisor, vm: Vm, timeout: float) -> bool:
    disk = boot_disk(client.vm_config(vm.vmid))
    if disk is None or disk[1] >= vm.disk_gb * 1024**3:
        return False
    run.guard(hv, f"growing {vm.name}'s disk")
    with _retry() as retry:
        retry(lambda: _wait(client, client.resize_vm_disk(vm.vmid, disk[0], f"{vm.disk_gb}G"), timeout))
    return True


def _start(run: _Run, client: PveClient, hv: Hypervisor, vm: Vm, timeout: float) -> None:
    if client.vm_status(vm.vmid).get("status") == "running":
        return
    run.guard(hv, f"starting {vm.name}")
    with _retry() as retry:
        retry(lambda: _wait(client, client.start_vm(vm.vmid), timeout))


def guest_address(interfaces: Any, mac: str) -> str | None:
    """The first usable IPv4 address the guest agent reports on the NIC with ``mac``."""
    for iface in interfaces or []:
        if str(iface.get("hardware-address", "")).lower() != mac.lower():
            continue
        for addr in iface.get("ip-addresses") or []:
            if addr.get("ip-address-type") != "ipv4":
                continue
            try:
                ip = ipaddress.IPv4Address(str(addr.get("ip-address")))
            except ValueError:
                continue
            # the NIC is matched by its MAC (never lo), so any routable-looking address will do
            if not (ip.is_link_local or ip.is_unspecified or ip.is_multicast):
                return str(ip)
    return None


def agent_configured(config: Mapping[str, Any]) -> bool:
    props = parse_props(str(config.get("agent", "0")), "enabled")
    return props.get("enabled", "0").lower() in ("1", "true", "on", "yes")


def known_address(vm: Vm) -> str | None:
    """NIC 0's address when the inventory knows it (nics[0].address or a static ipconfig)."""
    if vm.nics[0].address:
        return vm.nics[0].address
    ip = vm.cloudinit.ipconfig
    return ip.ip.split("/")[0] if isinstance(ip, StaticIp) else None


def ssh_answers(address: str, port: int | None = None, timeout: float = 3.0) -> bool:
    """True when an SSH server greets on address:port (reads the banner; sends nothing)."""
    try:
        with socket.create_connection((address, port or SSH_PORT), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def wait_ready(client: PveClient, vm: Vm, *, timeout: float, sleep: Callable[[float], None] = time.sleep) -> str:
    """Until the guest is ready; returns its address.

    With the guest agent configured (the factory's templates have it): the agent reports a NIC with
    the inventory MAC of nic 0 and an IPv4 address. Without an agent: SSH greets on the address the
    inventory gives nic 0 (static ipconfig or nics[0].address); with neither, refuse to guess.
    """
    deadline = time.monotonic() + timeout
    if not agent_configured(client.vm_config(vm.vmid)):
        address = known_address(vm)
        if address is None:
            raise NotReady(f"{vm.name}: no guest agent configured and no known address to check SSH on; "
                              "enable the agent in the template or deploy with --no-wait")
        while not ssh_answers(address):
            if time.monotonic() > deadline:
                raise NotReady(f"{vm.name}: not ready after {timeout:.0f}s: no SSH greeting on {address}")
            sleep(READY_POLL_INTERVAL)
        return address
    last = "no answer yet"
    while True:
        try:
            answer = client.vm_agent(vm.vmid, "network-get-interfaces")
            interfaces = answer.get("result") if isinstance(answer, dict) else answer
            ip = guest_address(interfaces, vm.nics[0].mac)
            if ip:
                return ip
            seen = [str(i.get("hardware-address", "")).lower() for i in interfaces or []]
            last = f"agent answers, but no NIC {vm.nics[0].mac} with an IPv4 address (NICs seen: {', '.join(seen)})"
        except ApiError as exc:
            if exc.status in (401, 403):
                raise NotReady(
                    f"{vm.name}: cannot read the guest agent: {exc.pve_message} (the API token needs VM.Monitor on "
                    "PVE 8, VM.GuestAgent.Audit on PVE 9; or deploy with --no-wait)"
                ) from None
            last = exc.pve_message
        if time.monotonic() > deadline:
            raise NotReady(f"{vm.name}: not ready after {timeout:.0f}s: {last}")
        sleep(READY_POLL_INTERVAL)


def _read_back_macs(client: PveClient, vm: Vm) -> list[str]:
    config, _, _ = _effective_config(client, vm.vmid)
    macs = []
    for i in range(len(vm.nics)):
        raw = config.get(f"net{i}")
        macs.append((NetSpec.parse(str(raw)).mac or "") if raw else "")
    return macs


def _mark_incomplete(run: _Run, client: PveClient, hv: Hypervisor, vm: Vm, template: TemplateRef) -> bool:
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


def _create(run: _Run, client: PveClient, hv: Hypervisor, vm: Vm, template: TemplateRef, result: VmResult,
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
        result.error = str(exc)
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


def _execute(run: _Run, plan: VmPlan, vm: Vm, *, wait: bool, timeout: float) -> VmResult:
    result = VmResult(plan)
    hv = run.site.hypervisors[plan.host]
    started = time.monotonic()
    try:
        if plan.action == "blocked":
            result.state = "blocked"
            return result
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
        result.error = result.error or str(exc)
    except Exception as exc:  # a bug must not take the other VMs' threads down with it
        result.state = "failed"
        result.error = result.error or f"{type(exc).__name__}: {exc}"
    finally:
        result.phases["total"] = time.monotonic() - started
        run.say(vm.name, result.state)
    return result


def _correct(run: _Run, client: PveClient, hv: Hypervisor, vm: Vm, plan: VmPlan, template: TemplateRef | None,
             result: VmResult, *, wait: bool, timeout: float) -> None:
    t = _Timer(result)
    fields = {d.field for d in plan.safe_diffs}
    only = set()
    for f in fields:
        if f.startswith("net"):
            only.add(f.split(".")[0])
        elif f in ("template", "status") or f.endswith(".size"):
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
    if "status" in fields:
        run.say(vm.name, "starting")
        with t.phase("start"):
            _start(run, client, hv, vm, timeout)
        if wait:
            with t.phase("ready"):
                result.address = wait_ready(client, vm, timeout=timeout)
    result.macs = _read_back_macs(client, vm)
    result.state = "drift-unresolved" if plan.unsafe else "corrected"


def _recorded_template(client: PveClient, vm: Vm) -> TemplateRef:
    marker = Marker.parse(client.vm_config(vm.vmid).get("description"), vm.vmid)
    return TemplateRef(marker.template_vmid or 0, marker.template or "unknown", "", ())


def deploy_vms(
    settings: Settings | None, site: Site, names: Iterable[str] | None = None, *, plane: str | None = None,
    dry_run: bool = False, wait: bool = True, timeout: float = DEFAULT_TIMEOUT, recreate: bool = False,
    allow_mgmt: bool = False, progress: bool = True, client_factory: ClientFactory | None = None,
    max_workers: int = MAX_WORKERS, lock_wait: int = DEFAULT_WAIT, lock_factory: LockFactory | None = None,
    run_id: str | None = None,
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
    with _progress(progress, vms) as say:
        run = _Run(site, client_factory=client_factory, progress=say, run_id=run_id)
        if dry_run:
            plan = _plan(run, vms, recreate, allow_mgmt)
            results = [VmResult(p, "blocked" if p.action == "blocked" else "planned") for p in plan.vms]
            return DeployReport(results, True, time.monotonic() - started)
        try:
            _take_host_locks(run, vms, lock_factory or ssh_host_lock, lock_wait, say)
            plan = _plan(run, vms, recreate, allow_mgmt)
            results = _converge(run, plan, vms, wait=wait, timeout=timeout, max_workers=max_workers, say=say)
        finally:
            for guard in run.guards.values():
                guard.release()
    return DeployReport(results, False, time.monotonic() - started)


def _take_host_locks(run: _Run, vms: list[Vm], lock_factory: LockFactory, wait: int,
                     say: Callable[[str, str], None]) -> None:
    owner = owner_line(run.run_id)
    for host in sorted({run.site.hypervisor_for(vm).name for vm in vms}):
        for vm in vms:
            say(vm.name, f"waiting for the host lock of {host}")
        guard = lock_factory(run.site.hypervisors[host], owner, wait)
        guard.acquire()
        run.guards[host] = guard


def _converge(run: _Run, plan: DeployPlan, vms: list[Vm], *, wait: bool, timeout: float, max_workers: int,
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
    hv = site.hypervisor_for(vm)
    run = _Run(site, client_factory=client_factory)
    client = run.client(hv)
    client.version()  # TLS and token before the lock file is touched
    try:
        _take_host_locks(run, [vm], lock_factory or ssh_host_lock, lock_wait, lambda vm, text: None)
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


# ------------------------------------------------------------------------------------------ output


def _progress(enabled: bool, vms: list[Vm]) -> AbstractContextManager[Callable[[str, str], None]]:
    if not enabled:
        return nullcontext(lambda vm, text: None)
    from contextlib import contextmanager

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .console import console, log_line

    if not console.is_terminal:
        return nullcontext(log_line)  # one timestamped line per VM step: spinners are for terminals

    @contextmanager
    def cm() -> Any:
        with Progress(SpinnerColumn(), TextColumn("{task.fields[vm]:<14}", markup=False),
                      TextColumn("{task.description}", markup=False),
                      TimeElapsedColumn(), console=console, transient=False) as prog:
            ids = {v.name: prog.add_task("planning", vm=v.name, total=None) for v in vms}
            lock = threading.Lock()

            def say(vm: str, text: str) -> None:
                with lock:
                    if vm in ids:
                        prog.update(ids[vm], description=text)
            yield say

    return cm()


def plan_table(plan: DeployPlan) -> Any:
    from rich.table import Table

    table = Table(title="deploy plan")
    for col in ("VM", "host", "VMID", "MACs", "template", "action", "details"):
        table.add_column(col, min_width=17 if col == "MACs" else None, overflow="fold")
    for p in plan.vms:
        details = p.reason or "; ".join(str(d) for d in p.diffs)
        if p.notes:
            details = "; ".join(filter(None, [details, *p.notes]))
        table.add_row(p.vm, p.host, str(p.vmid), "\n".join(p.macs), p.template or "-", p.action, details)
    return table


def report_table(report: DeployReport) -> Any:
    from rich.table import Table

    table = Table(title="deploy" + (" (dry run)" if report.dry_run else "") + f": {report.wall_s:.1f}s")
    for col in ("VM", "host", "VMID", "MACs", "template", "state", "details"):
        table.add_column(col, min_width=17 if col == "MACs" else None, overflow="fold")
    for r in report.results:
        p = r.plan
        details = "; ".join(filter(None, [
            r.error, p.reason, "; ".join(str(d) for d in p.diffs) if r.state not in ("created", "recreated") else "",
            f"cleanup: {r.cleanup}" if r.cleanup else "", f"ip {r.address}" if r.address else "", *p.notes, *r.notes,
        ]))
        table.add_row(p.vm, p.host, str(p.vmid), "\n".join(r.macs or p.macs), p.template or "-", r.state, details)
    return table
