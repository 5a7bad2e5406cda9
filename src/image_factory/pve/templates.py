"""The factory's templates on a host: the one template type, its description's codec, and how they are found.

A factory template carries the ``image-factory`` tag and a description that starts with
:data:`DESCRIPTION_HEADER` followed by ``key: value`` lines (ownership.owns_template is the rule). The
description is written by :func:`encode_description` (publish gives it the lines of a manifest) and read
back by :func:`parse_description` into a :class:`TemplateInfo`: the codec lives here so the pve wing reads
it without the image wing, and publish writes it without a second copy of the format. Publish, retention
and deploy all find templates here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from image_factory.errors import RemoteError
from image_factory.ownership import FACTORY_TAG, has_template_header, owns_template, tagged
from image_factory.ownership import TEMPLATE_HEADER as DESCRIPTION_HEADER
from image_factory.pve.client import ApiError, PveClient
from image_factory.pve.codec import parse_tags
from image_factory.reports import Report

DESCRIPTION_MAX = 8192  # PVE's limit on a guest description, in bytes

__all__ = ["DESCRIPTION_HEADER", "DESCRIPTION_MAX", "FACTORY_TAG", "ClusterFacts", "TemplateInfo",
           "cluster_facts", "encode_description", "find_templates", "newest_template", "parse_description",
           "shared_template_nodes"]


def encode_description(fields: Iterable[tuple[str, str]]) -> str:
    """The description of a factory template: the header, then one ``key: value`` line per field, cut to PVE's
    limit (only a free-text value can grow: the fields are in the order a reader needs them)."""
    text = "\n".join([DESCRIPTION_HEADER, *(f"{key}: {value}" for key, value in fields)]) + "\n"
    if len(text.encode()) > DESCRIPTION_MAX:
        text = text.encode()[:DESCRIPTION_MAX].decode(errors="ignore")
    return text


def parse_description(text: str) -> dict[str, str] | None:
    """The key/value lines of a factory template description, or None for any other VM."""
    if not has_template_header(text):
        return None
    out: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class TemplateInfo(Report):
    """A factory-made guest of one image on one host (from its config)."""

    vmid: int
    name: str
    node: str
    image: str
    build_id: str
    digest: str
    sha256: str
    tested: bool
    published_at: str
    import_file: str
    publish_run: str
    is_template: bool
    locked: str | None
    tags: tuple[str, ...]
    content: str = ""  # recipe + installed packages (Manifest.content_digest), "" on older templates
    firmware: str = ""  # the description's firmware line (Platform.describe), "" on older templates
    efi_vars_file: str = ""  # the import file of the build's EFI vars store its efidisk0 was made from, if any

    @classmethod
    def recorded(cls, vmid: int, name: str) -> TemplateInfo:
        """The template a deployed VM's marker names (it may be gone): no more is known of it."""
        return cls(vmid=vmid, name=name, node="", image="", build_id="", digest="", sha256="", tested=False,
                   published_at="", import_file="", publish_run="", is_template=True, locked=None, tags=())

    @classmethod
    def from_config(cls, node: str, vmid: int, cfg: dict[str, Any], lock: str | None) -> TemplateInfo | None:
        """The template a guest's config describes, or None when the guest is not the factory's."""
        tags = tuple(parse_tags(cfg.get("tags")))
        description = str(cfg.get("description", ""))
        meta = parse_description(description)
        if meta is None or not owns_template(tags, description):
            return None
        return cls(
            vmid=vmid, name=str(cfg.get("name", "")), node=node, image=meta.get("image", ""),
            build_id=meta.get("build_id", ""), digest=meta.get("digest", ""), sha256=meta.get("sha256", ""),
            tested=meta.get("tested", "no") == "yes" and "tested" in tags,
            published_at=meta.get("published_at", ""), import_file=meta.get("import_file", ""),
            publish_run=meta.get("publish_run", ""), is_template=str(cfg.get("template", "0")) == "1",
            locked=lock or (str(cfg["lock"]) if cfg.get("lock") else None), tags=tags,
            content=meta.get("content", ""), firmware=meta.get("firmware", ""),
            efi_vars_file=(meta.get("efi_vars", "").split() or [""])[0],
        )


def find_templates(client: PveClient, image_name: str, *, include_incomplete: bool = False,
                   nodes: Sequence[str] = ()) -> list[TemplateInfo]:
    """Factory templates of ``image_name`` on the client's node (or on each of ``nodes``: a cluster whose templates
    live on shared storage, any node clones them), newest first.

    Newest = latest ``published_at`` (ISO-8601 UTC), then highest vmid. Only finished templates
    (``template: 1``) unless include_incomplete (then also factory VMs a run left half-made).
    Deploy picks ``next(t for t in find_templates(c, image) if t.tested)``.
    """
    found: list[TemplateInfo] = []
    for on in [client.on(n) for n in nodes] or [client]:
        found.extend(_templates_on(on, image_name, include_incomplete=include_incomplete))
    found.sort(key=lambda t: (t.published_at, t.vmid), reverse=True)
    return found


def _templates_on(client: PveClient, image_name: str, *, include_incomplete: bool) -> list[TemplateInfo]:
    found: list[TemplateInfo] = []
    for vm in client.list_vms():
        tags = parse_tags(vm.get("tags"))
        if not tagged(tags):  # a listing shows tags only: the config decides (TemplateInfo.from_config)
            continue
        is_template = str(vm.get("template", "0")) == "1"
        if not is_template and not include_incomplete:
            continue
        vmid = int(vm["vmid"])
        try:
            cfg = client.vm_config(vmid)
        except ApiError as exc:
            if exc.status in (404, 500) and "does not exist" in exc.pve_message:
                continue  # removed between list and read
            raise
        info = TemplateInfo.from_config(client.node, vmid, cfg, vm.get("lock"))
        if info is None or info.image != image_name:
            continue
        if info.is_template or include_incomplete:
            found.append(info)
    return found


class ClusterFacts(NamedTuple):
    """What a cluster says of itself that publish, deploy and preflight decide from."""

    online: dict[str, bool]  # each node, online or not (/cluster/resources)
    images_shared: bool  # storage.images is shared: a template on any node is every node's to clone
    import_shared: bool  # the import storage is shared: a file uploaded through one node is every node's


def cluster_facts(client: PveClient) -> ClusterFacts:
    """A cluster node's cluster: each node and whether it is online (/cluster/resources), and whether the entry's
    images and import storages are shared (storage.cfg's ``shared`` flag in a node's storage list: pve-storage
    API2/Storage/Status.pm index). Images shared, a template on any node is every node's to clone (qemu-server
    clone_vm ``target``); local, each node has its own."""
    hv = client.hv
    online = client.cluster_nodes()
    asking = hv.node if online.get(hv.node) else next((n for n, up in online.items() if up), None)
    if asking is None:
        return ClusterFacts(online, False, False)
    listed = {str(s.get("storage")): s for s in client.on(asking).storages()}
    if hv.storage.images not in listed:
        raise RemoteError(client.name, f"storage.images {hv.storage.images!r} is not a storage of node {asking} "
                                       f"(it has: {', '.join(listed)})")
    shared = {sid for sid, s in listed.items() if int(s.get("shared") or 0)}
    return ClusterFacts(online, hv.storage.images in shared, hv.storage.import_ in shared)


def shared_template_nodes(client: PveClient) -> tuple[str, ...]:
    """The nodes whose factory templates a cluster node may clone from: every online node of its cluster when the
    images storage is shared; () (its own only) otherwise, and for a hypervisor of its own."""
    if client.hv.cluster is None:
        return ()
    facts = cluster_facts(client)
    return tuple(sorted(n for n, up in facts.online.items() if up)) if facts.images_shared else ()


def newest_template(client: PveClient, image_name: str, *, tested_only: bool = True) -> TemplateInfo | None:
    for t in find_templates(client, image_name):
        if t.tested or not tested_only:
            return t
    return None
