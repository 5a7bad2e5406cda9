"""Loading the site: the inventory read by ansible-core, the catalogue, tenants and placement, each entry
validated and the whole site cross-checked; every problem is reported together before anything acts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from image_factory.errors import Problem, ValidationFailed
from image_factory.site import inventory_source
from image_factory.site.crosschecks import cross_checks, site_address_checks
from image_factory.site.formats import HYPERVISOR_GROUP, PLACEMENT_KEY, PLACEMENTS, PLANES, Placement, Plane
from image_factory.site.hypervisors import ClusterNodes, Hypervisor
from image_factory.site.images import Image
from image_factory.site.inventory_source import HostVars
from image_factory.site.model import Site
from image_factory.site.reading import pydantic_problems, yaml_file
from image_factory.site.tenants import TENANTS_KEY, Tenant, named_tenants, on_tenant_network, read_tenants, tenants_file
from image_factory.site.vms import Vm

HOST_KEYS = ("pve", "vm")


def read_inventory(path: Path, problems: list[Problem], groups: dict[str, Any] | None = None,
                    group_files: dict[str, dict[str, str]] | None = None) -> dict[str, HostVars]:
    """The hosts of the factory's groups, read by ansible-core; ``groups`` (if given) receives each group's own
    ``tenants``, ``group_files`` the file each came from."""
    found = inventory_source.read(path, problems, host_keys=HOST_KEYS, group_keys=(TENANTS_KEY, PLACEMENT_KEY),
                                  only_groups=(HYPERVISOR_GROUP, *PLANES))
    if groups is not None:
        groups.update(found.groups)
    if group_files is not None:
        group_files.update(found.group_sources)
    return found.hosts


def _read_images(path: Path, problems: list[Problem]) -> dict[str, Image]:
    data = yaml_file(path, problems)
    if data is None:
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        problems.append(Problem(str(path), "", "images", "the catalogue needs an 'images:' mapping"))
        return {}
    for key in sorted(set(data) - {"images", "defaults"}):
        problems.append(Problem(str(path), "", key, "unknown key (the catalogue takes images, defaults)"))
    defaults = data.get("defaults") or {}
    images: dict[str, Image] = {}
    for name, body in data["images"].items():
        if not isinstance(body, dict):
            problems.append(Problem(str(path), str(name), "", "an image must be a mapping"))
            continue
        try:
            images[name] = Image(name=name, **{**defaults, **body})
        except ValidationError as exc:
            problems.extend(pydantic_problems(str(path), str(name), "", exc))
        except TypeError as exc:
            problems.append(Problem(str(path), str(name), "", str(exc)))
    return images


def site_dir(inventory: Path) -> Path:
    """Where files the inventory names (cloud-init vendor data) are found: the directory holding the inventory
    (``ansible/`` for ``-i ansible/inventory``; a file inventory's own directory)."""
    return inventory.parent


def load_site(inventory: str | Path, images: str | Path) -> Site:
    """Load and validate the whole site model; raise ValidationFailed listing every problem."""
    inventory_path, images_path = Path(inventory), Path(images)
    problems: list[Problem] = []
    groups: dict[str, Any] = {}
    group_files: dict[str, dict[str, str]] = {}
    records = read_inventory(inventory_path, problems, groups, group_files)
    catalogue = _read_images(images_path, problems)
    tenants = read_tenants(groups, tenants_file(group_files, inventory_path), problems)
    placement = read_placement(groups, group_files, inventory_path, problems)
    entries = _read_entries(records, tenants, named_tenants(groups), site_dir(inventory_path), problems)
    if not problems:
        problems.extend(_missing_parts(entries, catalogue, inventory_path, images_path))
    hypervisors, vms, sources = entries.hypervisors, entries.vms, entries.sources
    problems.extend(cross_checks(hypervisors, vms, catalogue, sources, str(inventory_path), str(images_path),
                                 placement))
    problems.extend(site_address_checks(hypervisors, vms, tenants, sources, str(inventory_path)))
    if problems:
        raise ValidationFailed(problems)
    return Site(inventory_path, images_path, hypervisors, vms, catalogue, sources, tenants, placement)


@dataclass
class _Entries:
    """The hypervisors and VMs read from the inventory's hosts, and the file each VM's ``vm`` mapping came from."""

    hypervisors: dict[str, Hypervisor] = field(default_factory=dict)
    vms: dict[str, Vm] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def _read_entries(records: dict[str, HostVars], tenants: dict[str, Tenant], named: set[str], directory: Path,
                  problems: list[Problem]) -> _Entries:
    """Each host of group ``hypervisors`` as a Hypervisor, each host of group mgmt or tenant as a Vm."""
    entries = _Entries()
    for rec in records.values():
        planes = sorted(rec.groups & set(PLANES))
        is_hv = HYPERVISOR_GROUP in rec.groups
        if is_hv and planes:
            problems.append(Problem(rec.file, rec.name, "", "a host cannot be both a hypervisor and a VM"))
        elif is_hv:
            _read_hypervisor(rec, entries, problems)
        elif len(planes) > 1:
            problems.append(Problem(rec.file, rec.name, "", "a VM belongs to exactly one plane, not both"))
        elif planes:
            _read_vm(rec, planes[0], tenants, named, directory, entries, problems)
    return entries


def _read_hypervisor(rec: HostVars, entries: _Entries, problems: list[Problem]) -> None:
    body = rec.vars.get("pve")
    if not isinstance(body, dict):
        problems.append(Problem(rec.source("pve"), rec.name, "pve", "hypervisors need a 'pve' mapping"))
        return
    if "cluster" in body:
        problems.append(Problem(rec.source("pve"), rec.name, "pve.cluster", "unknown key (a whole cluster is one "
                                "entry that lists its nodes under pve.nodes)"))
        return
    if "nodes" in body:
        _read_cluster(rec, body, entries, problems)
        return
    if "cluster_lock_dir" in body:
        problems.append(Problem(rec.source("pve"), rec.name, "pve.cluster_lock_dir", "only for a cluster entry "
                                "(pve.nodes): a hypervisor of its own is locked on itself"))
        return
    try:
        entries.hypervisors[rec.name] = Hypervisor(name=rec.name, **body)
    except ValidationError as exc:
        problems.extend(pydantic_problems(rec.source("pve"), rec.name, "pve", exc))


# Per node in a cluster entry (each under pve.nodes.<node>), or not for a cluster at all.
_NOT_IN_A_CLUSTER_ENTRY = {
    "node": "a cluster entry names its nodes as the keys of pve.nodes",
    "ssh": "each node's SSH (with its own pinned host key) goes under pve.nodes.<node>.ssh",
    "install": "a host is installed as an entry of its own (invoke host.answer), then joined to the cluster",
}


def _read_cluster(rec: HostVars, body: dict[str, Any], entries: _Entries, problems: list[Problem]) -> None:
    """A whole cluster as one entry: each node of ``pve.nodes`` a hypervisor ``<entry>/<node>``, the rest shared."""
    source = rec.source("pve")
    misplaced = [Problem(source, rec.name, f"pve.{key}", f"not in a cluster entry: {why}")
                 for key, why in _NOT_IN_A_CLUSTER_ENTRY.items() if key in body]
    problems.extend(misplaced)
    try:
        spec = ClusterNodes(nodes=body["nodes"])
    except ValidationError as exc:
        problems.extend(pydantic_problems(source, rec.name, "pve", exc))
        return
    if misplaced:
        return
    shared = {k: v for k, v in body.items() if k != "nodes"}
    first, first_node = next(iter(spec.nodes.items()))
    try:
        cluster = Hypervisor(name=rec.name, node=first, ssh=first_node.ssh, cluster=rec.name, **shared)
    except ValidationError as exc:
        problems.extend(pydantic_problems(source, rec.name, "pve", exc))
        return
    for node, member in spec.nodes.items():
        hv = cluster.member(node, member)
        entries.hypervisors[hv.name] = hv


def _read_vm(rec: HostVars, plane_group: str, tenants: dict[str, Tenant], named: set[str], directory: Path,
             entries: _Entries, problems: list[Problem]) -> None:
    body = rec.vars.get("vm")
    if not isinstance(body, dict):
        problems.append(Problem(rec.source("vm"), rec.name, "vm", "VMs need a 'vm' mapping"))
        return
    try:
        plane: Plane = "mgmt" if plane_group == "mgmt" else "tenant"
        vm = Vm.model_validate({"name": rec.name, "plane": plane, **body}, context={"site_dir": directory})
        entries.vms[rec.name], found = on_tenant_network(vm, tenants, rec.source("vm"), named)
        problems.extend(found)
        entries.sources[rec.name] = rec.source("vm")
    except ValidationError as exc:
        problems.extend(pydantic_problems(rec.source("vm"), rec.name, "vm", exc))


def _missing_parts(entries: _Entries, catalogue: dict[str, Image], inventory: Path, images: Path) -> list[Problem]:
    """What a site that read without a problem still lacks: a hypervisor, a VM, an image."""
    if not entries.hypervisors:
        return [Problem(str(inventory), "", HYPERVISOR_GROUP,
                        "no hypervisor: the inventory needs hosts in group 'hypervisors' with a 'pve' mapping")]
    if not entries.vms:
        return [Problem(str(inventory), "", "mgmt/tenant",
                        "no VM: the inventory needs hosts in group 'mgmt' or 'tenant' with a 'vm' mapping")]
    if not catalogue:
        return [Problem(str(images), "", "images", "the catalogue has no image")]
    return []


def read_placement(groups: dict[str, Any], group_files: dict[str, dict[str, str]], inventory: Path,
                   problems: list[Problem]) -> dict[str, Placement]:
    """Each plane's ``placement`` (a variable of group mgmt or tenant): pinned, spread or fill."""
    policies: dict[str, Placement] = {}
    for plane in PLANES:
        raw = (groups.get(plane) or {}).get(PLACEMENT_KEY)
        if raw is None:
            continue
        if raw not in PLACEMENTS:
            problems.append(Problem(group_files.get(plane, {}).get(PLACEMENT_KEY, str(inventory)), f"group {plane}",
                                    f"vars.{PLACEMENT_KEY}", f"{raw!r} is not one of {', '.join(PLACEMENTS)}"))
            continue
        policies[plane] = raw
    return policies
