"""What only the whole site shows: a VMID, MAC or address held twice, a VM no hypervisor can hold, cluster
nodes sharing VMIDs, a MAC claiming another tenant, a tenant on the mgmt plane's network or in its domain."""

from __future__ import annotations

import ipaddress
import re
from collections import defaultdict
from collections.abc import Generator, Iterator

from image_factory.errors import Problem
from image_factory.site.formats import Placement
from image_factory.site.hypervisors import Hypervisor
from image_factory.site.images import Image
from image_factory.site.model import hosts_for
from image_factory.site.tenants import Tenant
from image_factory.site.vms import StaticIp, Vm


def cross_checks(
    hypervisors: dict[str, Hypervisor], vms: dict[str, Vm], images: dict[str, Image],
    sources: dict[str, str], inv_file: str, img_file: str, placement: dict[str, Placement] | None = None,
) -> Iterator[Problem]:
    yield from _install_mac_checks(hypervisors, inv_file)
    yield from _cluster_checks(hypervisors, inv_file)
    by_vmid: dict[int, list[str]] = defaultdict(list)
    by_mac: dict[str, list[str]] = defaultdict(list)
    for vm in vms.values():
        by_vmid[vm.vmid].append(vm.name)
        for i, nic in enumerate(vm.nics):
            by_mac[nic.mac].append(f"{vm.name} nic {i}")
        policy = (placement or {}).get(vm.plane, "pinned")
        yield from _vm_checks(vm, hypervisors, images, sources[vm.name], img_file, policy)
    for vmid, names in by_vmid.items():
        if len(names) > 1:
            yield Problem(inv_file, ", ".join(sorted(names)), "vm.vmid", f"VM id {vmid} is used more than once")
    for mac, users in by_mac.items():
        if len(users) > 1:
            yield Problem(inv_file, ", ".join(sorted(users)), "vm.nics.mac", f"MAC {mac} is used more than once")


def _install_mac_checks(hypervisors: dict[str, Hypervisor], inv_file: str) -> Iterator[Problem]:
    host_macs: dict[str, list[str]] = defaultdict(list)
    for host in hypervisors.values():
        for mac in host.install.macs if host.install else ():
            host_macs[mac].append(host.name)
    for mac, names in host_macs.items():
        if len(names) > 1:
            yield Problem(inv_file, ", ".join(names), "pve.install.macs",
                          f"MAC {mac} is listed for more than one hypervisor (the answer server matches by MAC)")


def _vm_checks(vm: Vm, hypervisors: dict[str, Hypervisor], images: dict[str, Image], file: str, img_file: str,
               policy: Placement) -> Iterator[Problem]:
    """One VM against the site: its image, its hypervisor (named or placed), snippets storage, clone mode."""
    if vm.image not in images:
        yield Problem(file, vm.name, "vm.image", f"image {vm.image!r} is not in the catalogue {img_file}")
    placeable = yield from (_named_host_checks(vm, hypervisors, file, policy) if vm.hypervisor is not None
                            else _placement_checks(vm, hypervisors, file, policy))
    if not placeable:
        return
    lacking = [h.name for h in hosts_for(vm, hypervisors) if h.storage.snippets is None]
    if vm.cloudinit.vendor is not None and lacking:
        yield Problem(file, vm.name, "vm.cloudinit.vendor_data",
                      f"{', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no snippets storage: set "
                      "pve.storage.snippets (a file storage with 'snippets' content, e.g. local) and "
                      "pve.storage.snippets_dir")
    if vm.plane == "mgmt" and vm.clone == "linked":
        yield Problem(file, vm.name, "vm.clone", "mgmt VMs must be full clones (no template dependency)")


def _named_host_checks(vm: Vm, hypervisors: dict[str, Hypervisor], file: str,
                       policy: Placement) -> Generator[Problem, None, bool]:
    """The hypervisor the VM names (or each node of the cluster it names) holds it; False when there is no such
    hypervisor (nothing more to check)."""
    nodes = hosts_for(vm, hypervisors)
    if not nodes:
        clusters = sorted({h.cluster for h in hypervisors.values() if h.cluster})
        have = ", ".join([h for h in hypervisors if "/" not in h] + clusters)
        yield Problem(file, vm.name, "vm.hypervisor", f"no hypervisor or cluster named {vm.hypervisor!r} "
                                                        f"(have: {have}; a cluster's node: <cluster>/<node>)")
        return False
    hv = nodes[0]
    if len(nodes) > 1 and policy == "pinned":
        yield Problem(file, vm.name, "vm.hypervisor",
                      f"cluster {vm.hypervisor} has {len(nodes)} nodes and the {vm.plane} plane's placement is "
                      f"pinned: name one node ({', '.join(h.name for h in nodes)}), or set placement: spread or "
                      f"fill for group {vm.plane}")
    if hv.role != vm.plane:
        yield Problem(
            file, vm.name, "vm.hypervisor",
            f"{vm.plane} VMs may only run on the {vm.plane} hypervisors; {hv.name} has role {hv.role}",
        )
    elif vm.vmid not in hv.vm_vmids:
        yield Problem(
            file, vm.name, "vm.vmid",
            f"{vm.vmid} is outside {hv.name}'s vm_vmids {hv.vm_vmids.first}-{hv.vm_vmids.last}",
        )
    return True


def _placement_checks(vm: Vm, hypervisors: dict[str, Hypervisor], file: str,
                      policy: Placement) -> Generator[Problem, None, bool]:
    """A VM that names no hypervisor fits one of its plane's; False when the plane has none at all."""
    plane_hosts = [h for h in hypervisors.values() if h.role == vm.plane]
    fitting = hosts_for(vm, hypervisors)
    if not plane_hosts:
        yield Problem(file, vm.name, "vm.hypervisor", f"no hypervisor has role {vm.plane}")
        return False
    if not fitting:
        ranges = ", ".join(f"{h.name} {h.vm_vmids.first}-{h.vm_vmids.last}" for h in plane_hosts)
        yield Problem(file, vm.name, "vm.vmid", f"{vm.vmid} is outside the vm_vmids of every {vm.plane} "
                                                 f"hypervisor ({ranges})")
    elif len(fitting) > 1 and policy == "pinned":
        yield Problem(file, vm.name, "vm.hypervisor",
                      f"the {vm.plane} plane has {len(fitting)} hypervisors for VMID {vm.vmid} "
                      f"({', '.join(h.name for h in fitting)}) and placement pinned: name the VM's "
                      f"hypervisor, or set placement: spread or fill for group {vm.plane}")
    return True


def _cluster_checks(hypervisors: dict[str, Hypervisor], inv_file: str) -> Iterator[Problem]:
    """Entries that share an API endpoint are nodes of one cluster, where a VMID names one guest cluster-wide:
    each node's templates need VMIDs of their own (template_vmids disjoint), and each entry its own node."""
    entries = list(hypervisors.values())
    for i, a in enumerate(entries):
        for b in entries[i + 1:]:
            if not {a.api_url, *a.api_urls} & {b.api_url, *b.api_urls}:
                continue
            if a.cluster is not None and a.cluster == b.cluster:
                continue  # one entry's nodes: its templates take VMIDs of the range cluster-wide
            pair = f"{a.name}, {b.name}"
            if a.node == b.node:
                yield Problem(inv_file, pair, "pve.node", f"both are node {a.node} of the cluster they share an API "
                                                          "endpoint with: a node is one entry")
            elif a.template_vmids.overlaps(b.template_vmids):
                yield Problem(inv_file, pair, "pve.template_vmids",
                              f"{a.template_vmids.first}-{a.template_vmids.last} and {b.template_vmids.first}-"
                              f"{b.template_vmids.last} overlap: nodes of one cluster (they share an API endpoint) "
                              "share its VMIDs, so each node's templates need a range of their own")


# A tenant VM's MAC carries its tenant's id in byte 2 (02:de:2<id>:..., docs/mac-namespace.md); the rest of
# the namespace is mac.check's, but a MAC claiming another tenant is refused here, where every task loads.
_TENANT_MAC_RE = re.compile(r"^02:de:2([1-9a-f]):")


def mac_tenant_id(mac: str) -> int:
    """The tenant id a namespace MAC claims (byte 2 = 0x20 + id), 0 for none."""
    found = _TENANT_MAC_RE.match(mac)
    return int(found[1], 16) if found else 0


def _literal_ip(host: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(host.strip("[]"))
    except ValueError:
        return None


def _fixed_addresses(vm: Vm) -> Iterator[tuple[str, str]]:
    """(key, address) of every fixed address of the VM: each NIC's, and NIC 0's static cloud-init address."""
    for i, nic in enumerate(vm.nics):
        if nic.address:
            yield f"vm.nics.{i}.address", nic.address
    static = vm.cloudinit.ipconfig
    if isinstance(static, StaticIp) and vm.nics[0].address is None:
        yield "vm.cloudinit.ipconfig.ip", str(ipaddress.ip_interface(static.ip).ip)


def _hypervisor_host(hv: Hypervisor) -> Iterator[tuple[str, str]]:
    """(key, host) of the names or addresses the factory reaches the hypervisor at."""
    yield "pve.api_url", re.sub(r"^https://", "", hv.api_url).rsplit(":", 1)[0].strip("[]")
    yield "pve.ssh.host", hv.ssh.host


def _mgmt_plane(hypervisors: dict[str, Hypervisor], vms: dict[str, Vm]) -> tuple[
        list[tuple[ipaddress.IPv4Network, str]], dict[str, str]]:
    """The mgmt plane as the inventory knows it: its networks (mgmt VMs' static networks and fixed addresses, the
    hypervisors' addresses) and its DNS domains (mgmt VMs' search domains, the hypervisors' parent domains), each
    with where it comes from."""
    networks: list[tuple[ipaddress.IPv4Network, str]] = []
    domains: dict[str, str] = {}
    for vm in vms.values():
        if vm.plane != "mgmt":
            continue
        static = vm.cloudinit.ipconfig
        if isinstance(static, StaticIp) and isinstance(net := ipaddress.ip_interface(static.ip).network,
                                                       ipaddress.IPv4Network):
            networks.append((net, f"{vm.name}'s cloudinit.ipconfig.ip {static.ip}"))
        networks.extend((ipaddress.IPv4Network(address), f"{vm.name}'s {key}") for key, address in _fixed_addresses(vm))
        for domain in (vm.cloudinit.searchdomain or "").split():
            domains.setdefault(domain.lower(), f"{vm.name}'s cloudinit.searchdomain")
    for hv in hypervisors.values():
        for key, host in _hypervisor_host(hv):
            ip = _literal_ip(host)
            if ip is not None:
                networks.append((ipaddress.IPv4Network(ip), f"hypervisor {hv.name}'s {key}"))
            elif "." in host:
                domains.setdefault(host.split(".", 1)[1].lower(), f"hypervisor {hv.name}'s {key} {host}")
    return networks, domains


def site_address_checks(hypervisors: dict[str, Hypervisor], vms: dict[str, Vm], tenants: dict[str, Tenant],
                         sources: dict[str, str], inv_file: str) -> Iterator[Problem]:
    """What only the whole site shows: an address held twice, a MAC claiming another tenant, a tenant on the mgmt
    plane's network or in its DNS domain."""
    holders: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # address -> (file, entry, key)
    for vm in vms.values():
        for key, address in _fixed_addresses(vm):
            holders[address].append((sources[vm.name], vm.name, key))
    for hv in hypervisors.values():
        seen: set[str] = set()  # its API and SSH may share one address
        for key, host in _hypervisor_host(hv):
            if (ip := _literal_ip(host)) is not None and str(ip) not in seen:
                seen.add(str(ip))
                holders[str(ip)].append((inv_file, hv.name, key))
    vm_names = set(vms)
    for address, owners in sorted(holders.items()):
        # hypervisors may share an address (one host, or a forwarder, on other ports); a VM may not share one
        if len(owners) > 1 and any(entry in vm_names for _, entry, _ in owners):
            for owner in owners:
                others = ", ".join(f"{entry} {key}" for _, entry, key in owners if (_, entry, key) != owner)
                yield Problem(owner[0], owner[1], owner[2], f"address {address} is also held by {others}")
    by_id = {t.id: t for t in tenants.values()}
    for vm in vms.values():
        own = tenants[vm.tenant].id if vm.tenant in tenants else 0
        if vm.tenant and not own:
            continue  # an unknown tenant is reported where the VM is read
        for i, nic in enumerate(vm.nics):
            claimed = mac_tenant_id(nic.mac)
            if claimed and claimed != own:
                whose = f"tenant {by_id[claimed].name}'s" if claimed in by_id else "a tenant id no tenant has"
                mine = f"tenant {vm.tenant} (id {own})" if own else f"no tenant ({vm.plane} plane)"
                yield Problem(sources[vm.name], vm.name, f"vm.nics.{i}.mac",
                              f"MAC {nic.mac}: byte 2 2{claimed:x} is {whose} (id {claimed}), but the VM belongs to "
                              f"{mine}; run: invoke mac.generate --vm {vm.name}")
    networks, domains = _mgmt_plane(hypervisors, vms)
    for t in tenants.values():
        entry = f"tenant {t.name}"
        for net, where in networks:
            if t.network.overlaps(net):
                yield Problem(inv_file, entry, "subnet", f"{t.subnet} overlaps the mgmt network ({where})")
        if t.domain.lower() in domains:
            yield Problem(inv_file, entry, "domain",
                          f"{t.domain} is the mgmt plane's domain ({domains[t.domain.lower()]}): tenant names would "
                          "answer in it")
