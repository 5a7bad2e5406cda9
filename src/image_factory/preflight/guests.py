"""Guest checks: the factory's VMID ranges hold only its own guests, no other VM carries an inventory MAC, and the
datacenter tag policy lets the token set the factory's tags."""

from __future__ import annotations

from typing import Any

from image_factory.ownership import FACTORY_TAG, tagged
from image_factory.preflight.access import effective_privileges
from image_factory.preflight.model import Outcome, failed, passed, token_user, warned
from image_factory.preflight.probe import HostProbe
from image_factory.pve.codec import parse_tags
from image_factory.pve.livemacs import site_collisions
from image_factory.site.inventory import Hypervisor


def _foreign_guest(hv: Hypervisor, guest: dict[str, Any]) -> str | None:
    """Why this guest in one of the factory's ranges is not the factory's ("" if it is; None outside the ranges)."""
    if guest.get("node") not in (None, hv.node):
        return None
    try:
        vmid = int(guest.get("vmid", -1))
    except (TypeError, ValueError):
        return None
    rng = "template_vmids" if vmid in hv.template_vmids else "vm_vmids" if vmid in hv.vm_vmids else None
    if rng is None:
        return None
    kind = str(guest.get("type", "qemu"))
    # A listing carries tags, not descriptions: the first half of ownership.owns_template, the half it can see.
    if kind == "qemu" and tagged(parse_tags(guest.get("tags"))):
        return ""
    what = "container" if kind == "lxc" else ("template" if guest.get("template") else "VM")
    return f"{what} {vmid} ({guest.get('name', '?')}) in {rng} is not tagged {FACTORY_TAG}"


def check_vmids(probe: HostProbe) -> Outcome:
    """The template and VM id ranges hold no guest the factory does not own (owned = tagged FACTORY_TAG)."""
    hv = probe.hv
    found = [_foreign_guest(hv, g) for g in probe.guests]
    foreign = [why for why in found if why]
    ranges = (f"templates {hv.template_vmids.first}-{hv.template_vmids.last}, "
              f"VMs {hv.vm_vmids.first}-{hv.vm_vmids.last}")
    if foreign:
        return failed("; ".join(foreign),
            f"the factory only touches guests it made: move those guests out of the ranges on {hv.node} "
            f"or change pve.template_vmids / pve.vm_vmids in the inventory ({ranges})",
        )
    return passed(f"{ranges}: free or factory-owned ({found.count('')} owned)")


def check_macs(probe: HostProbe) -> Outcome:
    """No VM on the node but the inventory VM itself carries an inventory MAC (foreign VMs and templates included;
    each host is checked against the whole inventory)."""
    collisions = site_collisions(probe.site, probe.mac_uses)
    if collisions:
        return failed("; ".join(str(c) for c in collisions),
                      "an inventory MAC must be on its own VM only: give the inventory VM a free MAC "
                      "(invoke mac.generate --vm NAME) or change the other VM's NIC")
    count = sum(len(vm.nics) for vm in probe.site.vms.values())
    return passed(f"none of the {count} inventory MACs is on another VM of {probe.hv.node}")


def factory_tags(probe: HostProbe) -> set[str]:
    """The tags the factory sets on this host: its marker and test states, the planes, the inventory's
    roles and tags. Image and build tags are made per build and can never be listed in advance."""
    tags = {FACTORY_TAG, "tested", "untested"}
    for vm in probe.site.vms_on(probe.hv.name):
        tags.update(vm.all_tags)
    return tags


def tag_policy(options: dict[str, Any]) -> tuple[str, set[str], set[str]]:
    """(user-allow, user-allow-list, registered-tags) from a Sys.Audit caller's GET /cluster/options, where
    absent means PVE's default (free, none registered). Raises ValueError naming a field of another shape."""
    access = options.get("user-tag-access") or {}
    if not isinstance(access, dict):
        raise ValueError(f"user-tag-access is {access!r}, not an object")
    allow = str(access.get("user-allow") or "free")
    listed = access.get("user-allow-list") or []
    registered = options.get("registered-tags") or []
    for name, value in (("user-tag-access.user-allow-list", listed), ("registered-tags", registered)):
        if not isinstance(value, list):
            raise ValueError(f"{name} is {value!r}, not an array")
    return allow, {str(t).lower() for t in listed}, {str(t).lower() for t in registered}


def check_tags(probe: HostProbe) -> Outcome:
    """GET /cluster/options answers every user, but holds the tag policy (`user-tag-access`, an object, and
    `registered-tags`, an array) only for a caller with Sys.Audit on / (pve-manager API2/Cluster.pm
    get_options): without it the policy is unknown, never "free" (docs/pve-facts.md, Templates)."""
    hv = probe.hv
    options = probe.cluster_options
    held = effective_privileges(probe.permissions("/"), "/")
    if "Sys.Modify" in held:
        return passed("the token holds Sys.Modify on /: it may set any tag whatever the datacenter tag policy")
    if not isinstance(options, dict):
        return failed(f"GET /cluster/options answered {options!r}, not an object",
                      f"check that {hv.api_url} is the PVE API of node {hv.node}")
    if "Sys.Audit" not in held:
        return warned(
            "datacenter tag policy unknown (needs Sys.Audit on /): if `user-tag-access` is not free or a "
            "factory tag is registered, deploy fails configuring a clone and, from qemu-server 9.2.0, every "
            "publish fails creating its VM (Sys.Modify for modifying tag)",
            f"on {hv.node} as root, check `pvesh get /cluster/options` shows no user-tag-access (free) and "
            f"none of {', '.join(sorted(factory_tags(probe)))} in registered-tags; or let preflight read it: "
            f"pveum acl modify / --tokens '{hv.token_id}' --users {token_user(hv.token_id)} "
            "--roles PVEAuditor --propagate 0")
    try:
        policy = tag_policy(options)
    except ValueError as exc:
        return failed(f"GET /cluster/options: {exc}", f"check that {hv.api_url} is the PVE API of node {hv.node}")
    return _tag_policy_outcome(policy, factory_tags(probe))


def _tag_policy_outcome(policy: tuple[str, set[str], set[str]], ours: set[str]) -> Outcome:
    allow, allowed, registered = policy
    problems = []
    if allow in ("none", "existing"):
        problems.append(f"user-tag-access user-allow={allow}: new tags (image, build-<id>) cannot be set")
    elif allow == "list":
        problems.append(f"user-tag-access user-allow=list ({', '.join(sorted(allowed)) or 'empty'}): per-build "
                        "tags (image, build-<id>) are never on the list"
                        + (f", nor are {', '.join(sorted(ours - allowed))}" if ours - allowed else ""))
    elif allow != "free":
        problems.append(f"user-tag-access user-allow={allow} is not a policy this tool knows")
    if ours & registered:
        problems.append(f"registered-tags holds {', '.join(sorted(ours & registered))}")
    if not problems:
        return passed(f"user-tag-access user-allow={allow}; no factory tag is registered")
    return failed("; ".join(problems) + ": setting the factory's tags needs Sys.Modify on /, which "
                  "the token does not hold",
                  "on the node as root: pvesh set /cluster/options --user-tag-access user-allow=free"
                  + (f" and take {', '.join(sorted(ours & registered))} out of registered-tags"
                     if ours & registered else "") + " (Datacenter > Options > User Tag Access)")
