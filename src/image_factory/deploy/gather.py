"""Gather each host's state (read-only) and plan every selected VM from it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from image_factory.deploy.decide import decide, place_vms
from image_factory.deploy.desired import check_placement, select_vms
from image_factory.deploy.model import DeployPlan, HostLoad, HostState, Observed, VmPlan
from image_factory.deploy.run import ClientFactory, Run
from image_factory.fanout import per_host
from image_factory.pve.client import ApiError, PveClient
from image_factory.pve.livemacs import MacUse, host_mac_uses
from image_factory.pve.templates import TemplateInfo, find_templates, shared_template_nodes
from image_factory.settings import Settings
from image_factory.site.inventory import Hypervisor, Site, Vm


def hosts_to_check(site: Site, names: list[str] | None, plane: str | None = None) -> list[str]:
    """The hypervisors a deploy of these VMs may touch (every candidate of each), for its preflight; a VM that
    cannot be placed fails here, before any host is read."""
    selected = select_vms(site, names, plane=plane)
    check_placement(site, selected)
    return sorted({hv.name for vm in selected for hv in site.candidates(vm)})


def effective_config(client: PveClient, vmid: int) -> tuple[dict[str, Any], list[str], str]:
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



def gather_host(run: Run, hv: Hypervisor, vms: list[Vm]) -> HostState:
    client = run.client(hv)
    listed = client.list_vms()
    existing = {int(e["vmid"]): e for e in listed}
    templates: dict[str, list[TemplateInfo]] = {}
    observed: dict[int, Observed] = {}
    shared = shared_template_nodes(client) if vms else ()
    for vm in vms:
        if vm.image not in templates:
            templates[vm.image] = find_templates(client, vm.image, nodes=shared)
            for t in templates[vm.image]:
                run.templates[(hv.name, t.vmid)] = t
        entry = existing.get(vm.vmid)
        if entry is None or int(entry.get("template") or 0):
            observed[vm.vmid] = Observed(entry)
            continue
        config, pending_keys, _ = effective_config(client, vm.vmid)
        observed[vm.vmid] = Observed(entry, config, pending_keys)
    elsewhere = ({vmid: node for vmid, node in client.cluster_guests().items() if node != hv.node}
                 if hv.cluster is not None and vms else {})
    return HostState(templates, observed, host_mac_uses(client, hv.name, existing.values()),
                     _load(client, listed) if any(run.site.placed_by_policy(vm) for vm in vms) else HostLoad(),
                     elsewhere)


def _load(client: PveClient, listed: list[dict[str, Any]]) -> HostLoad:
    """The node's guests and memory, read only where a policy places a VM (maxmem in bytes, in the qemu list and
    the node list; without Sys.Audit on the node the list has no maxmem and fill finds no room)."""
    guests = [e for e in listed if not int(e.get("template") or 0)]
    node = next((n for n in client.nodes() if n.get("node") == client.node), {})
    return HostLoad(len(guests), int(node.get("maxmem") or 0), sum(int(e.get("maxmem") or 0) for e in guests))


def plan_vms(run: Run, vms: list[Vm], recreate: bool, allow_mgmt: bool = False) -> DeployPlan:
    candidates = {vm.name: run.site.candidates(vm) for vm in vms}
    by_host: dict[str, list[Vm]] = {h: [] for h in run.site.hypervisors}
    for vm in vms:
        for hv in candidates[vm.name]:
            by_host[hv.name].append(vm)
    gathered = per_host({h: (run.site.hypervisors[h], hvms) for h, hvms in by_host.items()},
                        lambda item: gather_host(run, *item), name="deploy-gather")
    states, failures = gathered.results, gathered.failures
    macs: dict[str, list[MacUse]] | None = None
    if not failures:
        macs = {}
        for st in states.values():
            for mac, uses in st.macs.items():
                macs.setdefault(mac, []).extend(uses)
    placed = place_vms(vms, candidates, run.site.placement, states, failures)
    plans: dict[str, VmPlan] = {}
    for vm in vms:
        where = placed[vm.name]
        if where.host is None:
            plans[vm.name] = VmPlan(vm.name, vm.plane, "", "", vm.vmid, "blocked", reason=where.how,
                                    clone_mode=vm.clone_mode, macs=list(vm.macs), placement=where.how)
            continue
        host = where.host
        hv = run.site.hypervisors[host]
        if host in failures:
            plans[vm.name] = VmPlan(vm.name, vm.plane, hv.name, hv.node, vm.vmid, "blocked",
                                    reason=f"cannot read {host}: {failures[host]}", clone_mode=vm.clone_mode,
                                    macs=list(vm.macs))
        else:
            plan = decide(vm, hv, states[host], macs, recreate=recreate, allow_mgmt=allow_mgmt)
            if macs is None:
                plan.reason += " (" + "; ".join(f"{h}: {why}" for h, why in failures.items()) + ")"
            plans[vm.name] = plan
        plans[vm.name].placement = where.how
    return DeployPlan([plans[v.name] for v in vms], recreate)


def plan_deploy(
    settings: Settings | None, site: Site, names: Iterable[str] | None = None, *, plane: str | None = None,
    recreate: bool = False, allow_mgmt: bool = False, client_factory: ClientFactory | None = None,
) -> DeployPlan:
    """Read the hypervisors and plan every selected VM; changes nothing (takes no lock, writes nothing)."""
    del settings  # paths are already resolved into the site; kept for a uniform stage API
    vms = select_vms(site, names, plane=plane)
    check_placement(site, vms)
    return plan_vms(Run(site, client_factory=client_factory), vms, recreate, allow_mgmt)


