"""decide(): from what a host looks like to the plan for one VM; pure, no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from image_factory.deploy.desired import compare
from image_factory.deploy.model import FieldDiff, HostLoad, HostState, Observed, Placed, VmPlan
from image_factory.ownership import Marker
from image_factory.pve.livemacs import MacUse, mac_collisions
from image_factory.pve.templates import TemplateInfo
from image_factory.site.inventory import Hypervisor, Placement, Vm

MIB = 1024 * 1024


def place_vms(vms: Sequence[Vm], candidates: Mapping[str, Sequence[Hypervisor]], policies: Mapping[str, Placement],
              states: Mapping[str, HostState], failures: Mapping[str, str]) -> dict[str, Placed]:
    """Where each VM goes, in inventory order (a VM placed earlier weighs on the next): pure, no I/O.

    A VM with one candidate goes there. Otherwise a VM that already exists (its VMID on one candidate) stays
    where it is; a new one is placed by its plane's policy: ``spread`` takes the candidate with the fewest
    guests, ``fill`` the first candidate (inventory order) whose configured guest memory stays within its
    physical memory. An unreadable candidate may hold the VM, so nothing new is placed while one is.
    """
    guests = {h: st.load.guests for h, st in states.items()}
    committed = {h: st.load.memory_committed for h, st in states.items()}
    placed: dict[str, Placed] = {}
    for vm in vms:
        hosts = list(candidates[vm.name])
        names = [h.name for h in hosts]
        if len(hosts) == 1:
            placed[vm.name] = Placed(names[0], "")  # fixed by the inventory: nothing to explain
            continue
        present = [h for h in names if h in states and states[h].vms.get(vm.vmid, Observed(None)).entry is not None]
        unread = [h for h in names if h in failures]
        if len(present) > 1:
            placed[vm.name] = Placed(None, f"VMID {vm.vmid} exists on {' and '.join(present)}: which one is "
                                           "this VM is for you to decide (remove the other, or name vm.hypervisor)")
            continue
        if present:
            placed[vm.name] = Placed(present[0], f"already on {present[0]}")
            continue
        if unread:
            placed[vm.name] = Placed(None, "cannot place it: " + "; ".join(f"{h} could not be read ({failures[h]})"
                                                                         for h in unread)
                                     + " and may hold it")
            continue
        choice = _by_policy(vm, names, policies.get(vm.plane, "pinned"), guests, committed,
                            {h: st.load for h, st in states.items()})
        if choice.host is not None:
            guests[choice.host] += 1
            committed[choice.host] += vm.memory * MIB
        placed[vm.name] = choice
    return placed


def _by_policy(vm: Vm, names: list[str], policy: Placement, guests: Mapping[str, int], committed: Mapping[str, int],
               loads: Mapping[str, HostLoad]) -> Placed:
    if policy == "spread":
        host = min(names, key=lambda h: (guests[h], names.index(h)))
        others = ", ".join(f"{h} {guests[h]}" for h in names if h != host)
        return Placed(host, f"spread: fewest guests ({host} {guests[host]}; {others})")
    if policy == "fill":
        free = {h: loads[h].memory_total - committed[h] for h in names}
        for h in names:
            if free[h] >= vm.memory * MIB:
                return Placed(h, f"fill: first host with room ({free[h] // MIB} MiB unallocated)")
        room = ", ".join(f"{h} {max(free[h], 0) // MIB} MiB" for h in names)
        return Placed(None, f"fill: no {vm.plane} host has {vm.memory} MiB unallocated ({room})")
    return Placed(None, f"placement pinned but {len(names)} hosts fit: name vm.hypervisor")


def choose_template(host: str, vm: Vm, templates: list[TemplateInfo]) -> tuple[TemplateInfo | None, str]:
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



def decide(vm: Vm, hv: Hypervisor, state: HostState, macs: Mapping[str, list[MacUse]] | None, *,
           recreate: bool = False, allow_mgmt: bool = False) -> VmPlan:
    """The plan for one VM from what its host looks like: a pure function (no I/O).

    ``macs`` maps every MAC on every hypervisor to where it is; None means they could not all be read,
    and then nothing that writes a MAC is planned.
    """
    plan = VmPlan(vm.name, vm.plane, hv.name, hv.node, vm.vmid, "create", clone_mode=vm.clone_mode, macs=list(vm.macs))
    template, why = choose_template(hv.name, vm, state.templates.get(vm.image, []))
    if template is not None:
        plan.template, plan.template_vmid = template.name, template.vmid
        if hv.cluster is not None and template.node != hv.node:
            plan.template_node = template.node
    refusal = _mac_refusal(vm, hv, macs)
    if refusal:
        return _blocked(plan, refusal)
    seen = state.vms.get(vm.vmid, Observed(None))
    if seen.entry is None and vm.vmid in state.elsewhere:
        node = state.elsewhere[vm.vmid]
        return _blocked(plan, f"VMID {vm.vmid} is on node {node} of cluster {hv.cluster}, not on {hv.node} (moved?): "
                              f"name vm.hypervisor {hv.cluster}/{node}, or {hv.cluster} to let placement find it")
    if seen.entry is None:
        if plan.template_node:
            plan.notes.append(f"clones template {plan.template_vmid} of node {plan.template_node} to {hv.node} "
                              "(shared storage: target)")
        return _blocked(plan, why) if template is None else plan
    plan.running = seen.entry.get("status") == "running"
    marker, refusal = _ownership(vm, hv, seen)
    if refusal:
        return _blocked(plan, refusal)
    if seen.pending_keys:
        plan.notes.append("pending until next start: " + ", ".join(sorted(seen.pending_keys)))
    destroy_refusal = _destroy_refusal(vm, plan.running, recreate=recreate, allow_mgmt=allow_mgmt)
    if marker.incomplete:
        if template is None:
            return _blocked(plan, why)
        if plan.running and destroy_refusal:
            return _blocked(plan, f"marked incomplete by run {marker.run_id} but running: reported, not destroyed "
                                  f"({destroy_refusal})")
        plan.action, plan.reason = "recreate", f"left incomplete by run {marker.run_id}: destroy and re-create"
        return plan
    plan.diffs = compare(vm, hv, template, seen.config)
    if not plan.running:
        plan.diffs.append(FieldDiff("status", seen.entry.get("status"), "running", True))
    if template is None:
        plan.notes.append(f"lineage not checked: {why}")
    return _drift(plan, marker, template is not None, recreate=recreate, destroy_refusal=destroy_refusal)


def _blocked(plan: VmPlan, reason: str) -> VmPlan:
    plan.action, plan.reason = "blocked", reason
    return plan


def _mac_refusal(vm: Vm, hv: Hypervisor, macs: Mapping[str, list[MacUse]] | None) -> str:
    """Why no MAC of this VM may be written (unknown MACs elsewhere, or one already in use), or ""."""
    if macs is None:
        return "cannot check that its MACs are unique on every hypervisor (a host could not be read)"
    collisions = mac_collisions(vm, (hv.name,), macs)
    if collisions:
        return ("; ".join(f"MAC {vm.macs[i]} (nics[{i}]) is already used by {use}" for i, use in collisions)
                + ": refusing to write it (nothing changed)")
    return ""


def _ownership(vm: Vm, hv: Hypervisor, seen: Observed) -> tuple[Marker, str]:
    """The existing guest's marker, and why this run may not touch the guest ("" if it may)."""
    entry, config = seen.entry or {}, seen.config
    marker = Marker.parse(config.get("description"), vm.vmid)
    if int(entry.get("template") or 0):
        return marker, f"VMID {vm.vmid} on {hv.name} is a template, not this VM"
    lock = entry.get("lock") or config.get("lock")
    if lock:
        return marker, (f"VMID {vm.vmid} on {hv.name} is locked ({lock}): a PVE task is working on it; "
                        "re-run when it has finished")
    if not marker.managed:
        detail = marker.problem or "no managed-by marker"
        fix = ("; if it is yours, restore the description's factory block as the factory wrote it"
               if marker.problem else "")
        return marker, (f"VMID {vm.vmid} on {hv.name} exists ({config.get('name')!r}) and was not made by this "
                        f"tool ({detail}): left untouched{fix}")
    if marker.vm_name not in (None, vm.name):
        return marker, f"VMID {vm.vmid} on {hv.name} belongs to inventory VM {marker.vm_name!r}, not {vm.name!r}"
    return marker, ""


def _drift(plan: VmPlan, marker: Marker, has_template: bool, *, recreate: bool, destroy_refusal: str) -> VmPlan:
    """In sync, or drift: safe drift is corrected; unsafe drift re-creates the VM only where that is allowed."""
    if not plan.diffs:
        plan.action = "in-sync"
        return plan
    plan.action = "drift"
    if not plan.unsafe:
        return plan
    unsafe = "; ".join(str(d) for d in plan.unsafe)
    if recreate and has_template and marker.sealed and not destroy_refusal:
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


