"""Read one host's state for publish (read-only): what decide.decide needs, in one value.

The real run reads it with the host lock held, again in each round after a lost lock. Reads a decision
needs only sometimes are taken only then (decide's predicates say when): running tasks when a half-made VM
is there, the final file's sha256 when a file of the artifact's size is, every config when retention may
prune.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

from image_factory.publish.decide import (
    UNTRACKED_CLONE_TYPES,
    HostState,
    current_template,
    half_made,
    prune_candidates,
)
from image_factory.publish.model import Artifact
from image_factory.pve.client import ApiError, PveClient
from image_factory.pve.sshlink import SshLink
from image_factory.pve.templates import find_templates
from image_factory.pve.upload import partial_name, remote_probe, remote_sha256
from image_factory.site.inventory import Hypervisor


def pve_version(client: PveClient) -> str:
    """The host's PVE release (TLS and the token are checked by this first call, before anything happens)."""
    return str(client.version().get("version", ""))


def used_vmids(client: PveClient) -> set[int]:
    """Every guest id on the node (VMs and containers), on a cluster's node every guest id of the cluster (a VMID
    names one guest cluster-wide): a template id must be none of them."""
    if client.hv.cluster is not None:
        return set(client.cluster_guests())
    ids = {int(vm["vmid"]) for vm in client.list_vms()}
    with suppress(ApiError):
        ids |= {int(ct["vmid"]) for ct in client.list_containers()}
    return ids


def untracked_clone_storages(client: PveClient) -> frozenset[str]:
    """The host's storages on which a linked clone cannot be told from its volume id."""
    return frozenset(str(s.get("storage")) for s in client.storages()
                     if s.get("type") in UNTRACKED_CLONE_TYPES)


def all_configs(client: PveClient, shared_nodes: tuple[str, ...] = ()) -> dict[int, dict[str, Any]]:
    """Every VM's config on the node, or on each of ``shared_nodes`` (a clone on any node may use a template on
    shared storage)."""
    return {int(vm["vmid"]): on.vm_config(int(vm["vmid"]))
            for on in nodes_of(client, shared_nodes) for vm in on.list_vms()}


def nodes_of(client: PveClient, shared_nodes: tuple[str, ...]) -> list[PveClient]:
    """The client on each node whose templates count (a cluster on shared storage), or the client's own node."""
    return [client.on(n) for n in shared_nodes] or [client]


def gather_host(client: PveClient, link: SshLink, hv: Hypervisor, art: Artifact, keep: int,
                shared_nodes: tuple[str, ...] = ()) -> HostState:
    """The host's state; with ``shared_nodes`` (a cluster on shared storage) the cluster's: templates, tasks and
    configs of each of those nodes."""
    templates = find_templates(client, art.manifest.image, include_incomplete=True, nodes=shared_nodes)
    existing, _ = current_template(templates, art)
    busy = frozenset(v for on in nodes_of(client, shared_nodes) for v in on.active_task_vmids()) if half_made(
        templates, hv) else frozenset[int]()
    own_partial = partial_name(art.import_file)
    probed = (art.import_file, own_partial, *([art.efi_vars_file] if art.efi_vars_file else []))
    listing, sizes = remote_probe(link, hv.storage.import_dir, *probed)
    final_sha256, efi_vars_sha256, used = None, None, frozenset[int]()
    if existing is None:
        if sizes[art.import_file] == art.size:
            final_sha256 = remote_sha256(link, f"{hv.storage.import_dir}/{art.import_file}")
        if art.efi_vars and sizes[art.efi_vars_file] == art.efi_vars.stat().st_size:
            efi_vars_sha256 = remote_sha256(link, f"{hv.storage.import_dir}/{art.efi_vars_file}")
        used = frozenset(used_vmids(client))
    configs: dict[int, dict[str, Any]] = {}
    untracked = frozenset[str]()
    if prune_candidates(templates, art, keep):
        configs, untracked = all_configs(client, shared_nodes), untracked_clone_storages(client)
    return HostState(hv=hv, node=client.node, templates=templates, used_vmids=used, busy=busy,
                     own_partial=own_partial, import_listing=tuple(listing), sizes=sizes,
                     final_sha256=final_sha256, efi_vars_sha256=efi_vars_sha256, configs=configs,
                     untracked=untracked)
