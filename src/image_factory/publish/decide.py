"""The pure decision of one host's publish: from a host's state (gather.HostState) to a HostPlan.

No I/O here (a contract in pyproject says so): every case of the table in tests/unit/publish/test_decide.py
is a state value in and a plan out. The reads a decision needs only sometimes (running tasks, a final file's
sha256, every VM's config) are taken by gather only when the predicates below say the decision needs them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from image_factory.ownership import Marker
from image_factory.publish.model import Artifact, Delivery, HostFailed, HostPlan, PublishError
from image_factory.publish.names import REMOVABLE_IMPORT_RE
from image_factory.pve.capabilities import firmware_refusals
from image_factory.pve.codec import drive_volume, volume_storage
from image_factory.pve.templates import TemplateInfo
from image_factory.site.inventory import Hypervisor

BASE_DISK_RE = re.compile(r"base-(\d+)-disk-\d+")
DISK_KEY_RE = re.compile(r"(ide|sata|scsi|virtio|efidisk|tpmstate|unused)\d+")
# Storage types whose linked clones do not name their base volume: on LVM-thin a linked clone is a thin
# snapshot with a plain vm-<id>-disk-<n> id (pve-facts.md, Storage layouts; LvmThinPlugin's own note).
UNTRACKED_CLONE_TYPES = frozenset({"lvmthin"})
# A delta is sent only when it is at most this share of the full image (issue #35: "half the bytes or more" saved).
DELTA_WORTH = 0.5


@dataclass(frozen=True)
class HostState:
    """One host as publish sees it under the lock (gather.gather_host reads it)."""

    hv: Hypervisor
    node: str
    templates: list[TemplateInfo]  # every factory VM of the image, newest first, half-made ones included
    used_vmids: frozenset[int] = frozenset()  # every guest id on the node (VMs and containers)
    busy: frozenset[int] = frozenset()  # VMs a task is running on (read when there are half-made ones)
    own_partial: str = ""  # the name this build's partial upload has
    import_listing: tuple[str, ...] = ()  # the import directory's entries
    sizes: dict[str, int | None] = field(default_factory=dict)  # of the final file and own_partial (None: absent)
    final_sha256: str | None = None  # of a final import file of the artifact's size (read only then)
    efi_vars_sha256: str | None = None  # of the build's EFI vars store's import file, when one of its size is there
    configs: dict[int, dict[str, Any]] = field(default_factory=dict)  # every VM's (read when retention may prune)
    untracked: frozenset[str] = frozenset()  # storages whose linked clones cannot be told from a volume id
    unseen_nodes: tuple[str, ...] = ()  # a cluster's offline nodes, whose VMs (linked clones among them) are not seen


def refusals(art: Artifact, host: str, pve_version: str) -> None:
    """The host's PVE cannot carry the template's firmware as asked: stop before anything changes."""
    found = firmware_refusals(art.manifest.platform, pve_version)
    if found:
        raise PublishError(f"{art.manifest.image}: refused on {host}: " + "; ".join(found))


def current_template(templates: Sequence[TemplateInfo], art: Artifact) -> tuple[TemplateInfo | None, bool]:
    """The template that already holds this build, and whether it holds it by content (another build)."""
    done = [t for t in templates if t.is_template]
    same = [t for t in done if t.digest == art.manifest.digest]
    content = art.manifest.content_digest
    # Content-addressed: a rebuild that installed exactly what the newest template holds (an upstream epoch
    # moved, nothing for this image did) publishes nothing; builds are not bit-reproducible, so the sha256
    # alone would make a new template every night.
    alike = [t for t in done[:1] if content and t.content == content and (t.tested or not art.tested)]
    if same or alike:
        return (same or alike)[0], not same
    return None, False


def half_made(templates: Sequence[TemplateInfo], hv: Hypervisor) -> list[TemplateInfo]:
    """Factory VMs a run left before they became templates, in the range the factory owns."""
    return [t for t in templates if not t.is_template and t.vmid in hv.template_vmids]


def free_vmid(hv: Hypervisor, taken: set[int] | frozenset[int]) -> int:
    """The lowest id of ``template_vmids`` that no guest on the node uses (never cluster/nextid)."""
    for vmid in range(hv.template_vmids.first, hv.template_vmids.last + 1):
        if vmid not in taken:
            return vmid
    raise HostFailed(hv.name, f"no free VMID in template_vmids {hv.template_vmids.first}-"
                              f"{hv.template_vmids.last}; lower --keep or widen the range in the inventory")


def select_prunes(templates: list[TemplateInfo], current_digest: str | None, keep: int) -> list[TemplateInfo]:
    """Templates beyond the newest ``keep`` (the current build always counts as kept, first)."""
    if keep < 1:
        raise PublishError(f"--keep must be at least 1 (got {keep})")
    current = [t for t in templates if current_digest and t.digest == current_digest]
    others = [t for t in templates if t not in current]
    slots = keep - (1 if current_digest else 0)
    return others[max(slots, 0):]


def prune_candidates(templates: Sequence[TemplateInfo], art: Artifact, keep: int) -> list[TemplateInfo]:
    """Templates retention would remove if no clone needs them (the build being published counts, newest)."""
    done = [t for t in templates if t.is_template]
    existing, _ = current_template(templates, art)
    if existing is not None:
        return select_prunes(done, existing.digest, keep)
    if keep < 1:
        raise PublishError(f"--keep must be at least 1 (got {keep})")
    return done[keep - 1:]  # the build about to be published is the newest, and kept first


def clone_dependents(configs: dict[int, dict[str, Any]], template_vmid: int,
                     untracked: frozenset[str] = frozenset()) -> list[int]:
    """VMs that may be linked clones of the template: their disks reference its base-<vmid>-disk-N, or,
    on a storage that does not record the base (``untracked``), the factory's marker says the VM was
    cloned from it (full or linked cannot be told there, so both count: keeping is the safe side)."""
    out = []
    for vmid, cfg in configs.items():
        if vmid == template_vmid:
            continue
        volumes = [v for key, value in cfg.items() if DISK_KEY_RE.fullmatch(key) and (v := drive_volume(value))]
        names_base = any(int(m) == template_vmid for v in volumes for m in BASE_DISK_RE.findall(v))
        cloned_where_untracked = (
            any(volume_storage(v) in untracked for v in volumes)
            and Marker.parse(cfg.get("description"), vmid).template_vmid == template_vmid
        )
        if names_base or cloned_where_untracked:
            out.append(vmid)
    return sorted(out)


def stale_partials(state: HostState, art: Artifact, resumable: bool) -> list[str]:
    """Partial uploads of this image's builds a crashed run left (this build's own is kept to resume), and what a
    delta publish that died part-way left (pve/upload_delta.leftover_names): with the lock held, nobody uses them."""
    image = re.escape(art.manifest.image)
    stray = re.compile(rf"^\.{image}-.+\.(qcow2|raw|vmdk)\.partial$")
    delta_leftover = re.compile(rf"^\.\.?{image}-.+\.(qcow2|raw|vmdk)\.(delta|delta\.partial|rebuild|guestview)$")
    return sorted(n for n in state.import_listing
                  if (stray.match(n) and (n != state.own_partial or not resumable)) or delta_leftover.match(n))


def delta_base(state: HostState, art: Artifact, transport: Delivery) -> tuple[TemplateInfo | None, str]:
    """A finished template of the build the delta was made against whose import file is still on the host (the
    host rebuilds the new image on that file), or None and why not: no delta was made (no base kept), the
    transport cannot run the host's steps, the delta saves less than half the bytes, or no such template (the
    host missed a night, or pruned it)."""
    delta = art.delta
    if delta is None:
        return None, art.no_delta
    if not transport.rebuilds_delta:
        return None, "the transport cannot rebuild a delta on the host"
    if delta.size > art.size * DELTA_WORTH:
        return None, f"a delta would be {delta.size / art.size:.0%} of the image"
    found = next((t for t in state.templates if t.is_template and t.sha256 == delta.base.sha256
                  and REMOVABLE_IMPORT_RE.match(t.import_file) and t.import_file != art.import_file
                  and t.import_file in state.import_listing), None)
    return found, "" if found else f"the host holds no template of build {delta.base.build_id} with its import file"


def decide(state: HostState, art: Artifact, keep: int, transport: Delivery) -> HostPlan:
    """What converging this host needs: upload or skip, the VMID, leftovers to remove, templates to prune."""
    plan = HostPlan(state.hv.name, state.node, art.import_file, art.template_name)
    plan.existing, plan.same_content = current_template(state.templates, art)
    # Half-made factory VMs: with the lock held nobody else should be working on them; a run that lost
    # the lock may still have a task running on one, and that VM is left to it (it cleans up its own).
    half = half_made(state.templates, state.hv)
    plan.stale = [t for t in half if t.vmid not in state.busy]
    plan.busy = sorted(t.vmid for t in half if t.vmid in state.busy)
    resumable = plan.existing is None and transport.resumable
    plan.stale_partials = stale_partials(state, art, resumable)
    if plan.existing:
        plan.upload = "none"
    else:
        if state.sizes.get(art.import_file) == art.size and state.final_sha256 == art.manifest.artifact.sha256:
            plan.upload = "skip"
        else:
            part = state.sizes.get(state.own_partial) or 0
            plan.partial_bytes = part if 0 < part <= art.size else 0
            plan.upload = "resume" if plan.partial_bytes and resumable else "upload"
            if plan.upload == "upload":
                base, plan.no_delta = delta_base(state, art, transport)
                if base is not None and art.delta is not None:
                    plan.upload, plan.delta_base, plan.delta_bytes = "delta", base.import_file, art.delta.size
        plan.vmid = free_vmid(state.hv, state.used_vmids - {t.vmid for t in plan.stale})
        if art.efi_vars_file:
            same = state.efi_vars_sha256 == art.manifest.efi_vars_sha256
            plan.efi_vars_upload = "skip" if same else "upload"
    candidates = prune_candidates(state.templates, art, keep)
    if candidates and state.unseen_nodes:
        # a linked clone on shared storage may live on a node that is down: nothing is pruned until it is seen
        plan.retention_waits = (f"retention waits for {', '.join(state.unseen_nodes)} (offline: its VMs may be "
                                f"linked clones of {', '.join(str(t.vmid) for t in candidates)})")
        candidates = []
    for t in candidates:
        deps = clone_dependents(state.configs, t.vmid, state.untracked)
        if deps:
            plan.keep_for_clones[t.vmid] = deps
        else:
            plan.prune.append(t)
    return plan


def clones_keeping(configs: dict[int, dict[str, Any]], template: TemplateInfo,
                   untracked: frozenset[str]) -> list[int]:
    """The clones that keep a planned prune from happening now (one may land between plan and prune): the same
    retention rule as :func:`decide`, on the configs act re-reads just before removing the template."""
    return clone_dependents(configs, template.vmid, untracked)


@dataclass(frozen=True)
class PublishTarget:
    """One line of a publish report: a hypervisor, or a whole cluster whose images storage its nodes share."""

    label: str  # the report's host: the hypervisor's name, or the cluster entry's
    hv: Hypervisor | None  # the node that uploads and registers; None: none can (refusal says why)
    shared_nodes: tuple[str, ...] = ()  # shared storage: the online nodes whose factory templates are the cluster's
    unseen_nodes: tuple[str, ...] = ()  # shared storage: the offline nodes (their clones cannot be seen)
    refusal: str = ""
    notes: tuple[str, ...] = ()


def cluster_targets(cluster: str, members: Sequence[Hypervisor], online: Mapping[str, bool],
                    shared: bool) -> list[PublishTarget]:
    """Where a cluster's publish happens (pure): with its images storage shared, once for the whole cluster through
    its first online node (one upload, one template every node clones from); with local storage, once per node,
    an offline node reported for itself alone. ``online`` is the cluster's own view (/cluster/resources)."""
    strangers = [m for m in members if m.node not in online]
    known = ", ".join(sorted(online)) or "none"
    refused = [PublishTarget(m.name, None, refusal=f"node {m.node} is not a node of the cluster (its nodes: {known})")
               for m in strangers]
    members = [m for m in members if m not in strangers]
    if not members:
        return refused
    if shared:
        up = [m for m in members if online[m.node]]
        down = sorted(n for n, is_up in online.items() if not is_up)
        notes = (f"offline now: {', '.join(down)} (a template held there is not seen; a re-run once it is back "
                 "keeps the newest)",) if down else ()
        if not up:
            return [*refused, PublishTarget(cluster, None, refusal="no node of the cluster is online "
                                                                   f"({', '.join(m.node for m in members)} offline)")]
        return [*refused, PublishTarget(cluster, up[0], tuple(sorted(n for n, is_up in online.items() if is_up)),
                                        tuple(down), notes=notes)]
    return [*refused, *(PublishTarget(m.name, m) if online[m.node] else
                        PublishTarget(m.name, None, refusal=f"node {m.node} is offline (the cluster's "
                                                            "/cluster/resources): nothing changed there")
                        for m in members)]
