"""Publish: put a tested build artifact on every hypervisor and register it as a template.

Per host, one converge step computes a plan (upload or skip, VMID to create, stale leftovers to
remove, templates to prune) and, unless --dry-run, executes it. The plan is the same object the
dry run prints: there is one code path.

Design choices (see also upload.py):
- Host lock: a publish holds ``flock`` on ``<import_dir>/.image-factory-publish.lock`` through an
  SSH exec channel for the whole converge (plan + execute) of a host. The kernel drops the lock
  when the holder's process dies, so a crashed or cut publish never leaves a stale lock; the
  holder writes ``<lock>.owner`` (host, pid, run id, time) so a waiting run can say whom it waits
  for. Both transports take it (the API transport still uses SSH for the lock and the remote
  checks). As a second line, "VM <id> already exists" at create re-plans onto the next free id.
- VMID: the lowest id of ``template_vmids`` that no guest on the node uses (never cluster/nextid).
- Identity: a template belongs to the factory when its tags contain ``image-factory`` and its
  description starts with the factory header; the description carries image, build id, sha256,
  manifest digest, image-test result, import file, publish time and run id. The same digest on the
  host means "already published": nothing changes and 0 bytes are sent.
- Cleanup: a failure after create destroys the VM this run created (found by vmid + run id);
  a failure during the upload removes the partial file. A finished, verified import file (final
  name) is KEPT: it is complete and checked, the re-run skips its upload, and retention removes it
  together with its template. Leftovers of a crashed run (kill -9): non-template factory VMs
  and partial uploads of other builds are found under the lock and removed by the next run's
  plan; this build's own partial is resumed.
- A dropped SSH link mid-upload: the upload reconnects and resumes; the host lock (same link) is
  gone too, so the run re-takes it and re-plans before registering (the plan then finds the
  verified file, or a template another run made meanwhile).
- Faults: PVE's "can't lock file ... got timeout" on create/template/destroy is retried (noted in
  the warnings); any other error ends the host's publish with PVE's message after the cleanup
  above. Hosts are independent: one failing host does not stop the others.
- Retention: newest ``keep`` templates of the image per host (the one just published always
  counts), by publish time; a template whose base disks are referenced by another VM (linked
  clones) is kept and reported.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from image_factory.errors import FactoryError, RemoteError
from image_factory.fanout import per_host
from image_factory.image import manifest as manifest_mod
from image_factory.image.manifest import Manifest
from image_factory.ownership import Marker
from image_factory.platform import Platform
from image_factory.pve.capabilities import firmware_refusals
from image_factory.pve.client import ApiError, PveClient, explain, retry_lock_timeouts
from image_factory.pve.codec import EfiDisk, MachineSpec, TpmState, format_tags
from image_factory.pve.hostlock import DEFAULT_WAIT, HostLock, LockLost, owner_line
from image_factory.pve.sshlink import SshLink
from image_factory.pve.templates import (
    DESCRIPTION_HEADER,
    FACTORY_TAG,
    TemplateInfo,
    find_templates,
    parse_description,
)
from image_factory.pve.upload import (
    ENGINES,
    TRANSPORT_KINDS,
    SshUploader,
    TransportKind,
    UnknownTransport,
    UploadResult,
    partial_name,
    remote_probe,
    remote_remove,
    remote_sha256,
    transport_kind,
    upload_api,
)
from image_factory.reports import Report
from image_factory.settings import Settings
from image_factory.site.inventory import Q35_CLOUDINIT_SLOT, Hypervisor, Image, Site

# Files placed by SSH may use [a-zA-Z0-9-.+=_], but the upload endpoint rewrites every other
# character, '+' and '=' included, to '_' (docs/pve-facts.md): names from [A-Za-z0-9_.-] only, so
# both transports land the file under the name import-from points at.
IMPORT_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+\.(qcow2|raw|vmdk)$")
# What a factory template's description may name as its import file (older runs may have used + or =).
REMOVABLE_IMPORT_RE = re.compile(r"^[a-zA-Z0-9\-.+=_]+\.(qcow2|raw|vmdk)$")
TAG_RE = re.compile(r"^[a-z0-9_][a-z0-9_\-+.]*$")
DNS_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
DESCRIPTION_MAX = 8192
ALREADY_EXISTS_RE = re.compile(r"already exists", re.I)
DEFAULT_KEEP = 3
CREATE_TIMEOUT = 1800.0
TASK_TIMEOUT = 600.0
LOCK_WAIT = DEFAULT_WAIT


class PublishError(FactoryError):
    """Publishing cannot start (bad input) or a host failed."""


# ------------------------------------------------------------------------------------ names


def sanitize_tag(text: str) -> str:
    tag = re.sub(r"[^a-z0-9_\-+.]+", "-", text.lower()).strip("-")
    if not tag or not re.match(r"[a-z0-9_]", tag[0]):
        tag = "x" + tag
    return tag


def dns_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower())
    name = re.sub(r"-{2,}", "-", name).strip("-")[:63].rstrip("-")
    if not DNS_RE.match(name):
        raise PublishError(f"cannot make a DNS-safe template name from {text!r}")
    return name


def import_file_name(manifest: Manifest) -> str:
    ext = manifest.artifact.format if manifest.artifact.format in ("qcow2", "raw", "vmdk") else "qcow2"
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{manifest.image}-{manifest.build_id}").strip("-.")
    name = f"{base}.{ext}"
    if not IMPORT_NAME_RE.match(name):
        raise PublishError(f"import file name {name!r} does not match [A-Za-z0-9_.-]+.(qcow2|raw|vmdk), the names "
                           "PVE's upload endpoint keeps as they are")
    return name


def template_name(image: Image, manifest: Manifest) -> str:
    raw = image.template_name.format(
        image=image.name, build_id=manifest.build_id, release=image.release, family=image.family
    )
    return dns_name(raw)


def template_tags(manifest: Manifest, tested: bool) -> list[str]:
    tags = {
        FACTORY_TAG,
        sanitize_tag(manifest.image),
        sanitize_tag(f"{manifest.family}-{manifest.release}"),
        sanitize_tag(f"build-{manifest.build_id}"),
        "tested" if tested else "untested",
    }
    return sorted(tags)


def test_summary(manifest: Manifest) -> str:
    t = manifest.image_test
    if t is None:
        return "none"
    ok = "for this sha256" if t.artifact_sha256 == manifest.artifact.sha256 else "for ANOTHER sha256"
    return (
        f"{t.status} ({t.passed} passed, {t.failed} failed, {t.errors} errors, {t.skipped} skipped; "
        f"suites {','.join(t.suites) or '-'}; {ok}; {t.finished_at or '?'})"
    )


CLOUDINIT_SCSI = Q35_CLOUDINIT_SLOT
MS_2023_ENROLLED = "2023k"  # qemu-server 9.1.5+: Microsoft UEFI CA 2023, Windows UEFI CA 2023 and KEK 2K CA 2023
# pve-manager (what /version reports) from which qemu-server enrols Microsoft's 2023 CAs: 9.1.19 depends on
# qemu-server >= 9.1.13 (ms-cert 9.0.27, enrolment on a config update 9.1.4, 2023k 9.1.5; pve-facts.md).
def template_description(
    manifest: Manifest, *, import_file: str, tested: bool, forced: bool, run_id: str, published_at: str
) -> str:
    lines = [
        DESCRIPTION_HEADER,
        f"image: {manifest.image}",
        f"build_id: {manifest.build_id}",
        f"release: {manifest.family} {manifest.release}",
        f"digest: {manifest.digest}",
        *([f"content: {manifest.content_digest}"] if manifest.content_digest else []),
        f"sha256: {manifest.artifact.sha256}",
        f"image_test: {test_summary(manifest)}",
        f"tested: {'yes' if tested else 'no (published with --force-untested)' if forced else 'no'}",
        f"import_file: {import_file}",
        f"git: {manifest.git.get('commit', '?')}{' (dirty)' if manifest.git.get('dirty') else ''}",
        f"built_at: {manifest.finished_at}",
        f"firmware: {manifest.platform.describe()}",
    ]
    if manifest.contents:
        inside = manifest.contents
        lines += [f"packages: {inside.get('packages', '?')} (digest {inside.get('packages_digest', '?')})",
                  f"os: {inside.get('os', '?')}, kernel {inside.get('kernel', '?')}"]
    lines += [
        f"published_at: {published_at}",
        f"publish_run: {run_id}",
    ]
    text = "\n".join(lines) + "\n"
    if len(text.encode()) > DESCRIPTION_MAX:  # only the free-text test summary can grow
        text = text.encode()[:DESCRIPTION_MAX].decode(errors="ignore")
    return text


def used_vmids(client: PveClient) -> set[int]:
    """Every guest id on the node (VMs and containers): a template id must be none of them."""
    ids = {int(vm["vmid"]) for vm in client.list_vms()}
    with suppress(ApiError):
        ids |= {int(ct["vmid"]) for ct in client.list_containers()}
    return ids


def free_vmid(hv: Hypervisor, taken: set[int]) -> int:
    for vmid in range(hv.template_vmids.first, hv.template_vmids.last + 1):
        if vmid not in taken:
            return vmid
    raise PublishError(
        f"{hv.name}: no free VMID in template_vmids {hv.template_vmids.first}-{hv.template_vmids.last}; "
        "lower --keep or widen the range in the inventory"
    )


BASE_DISK_RE = re.compile(r"base-(\d+)-disk-\d+")
DISK_KEY_RE = re.compile(r"(ide|sata|scsi|virtio|efidisk|tpmstate|unused)\d+")
# Storage types whose linked clones do not name their base volume: on LVM-thin a linked clone is a thin
# snapshot with a plain vm-<id>-disk-<n> id (pve-facts.md, Storage layouts; LvmThinPlugin's own note).
UNTRACKED_CLONE_TYPES = frozenset({"lvmthin"})


def untracked_clone_storages(client: PveClient) -> frozenset[str]:
    """The host's storages on which a linked clone cannot be told from its volume id."""
    return frozenset(str(s.get("storage")) for s in client.storages()
                     if s.get("type") in UNTRACKED_CLONE_TYPES)


def clone_dependents(configs: dict[int, dict[str, Any]], template_vmid: int,
                     untracked: frozenset[str] = frozenset()) -> list[int]:
    """VMs that may be linked clones of the template: their disks reference its base-<vmid>-disk-N, or,
    on a storage that does not record the base (``untracked``), the factory's marker says the VM was
    cloned from it (full or linked cannot be told there, so both count: keeping is the safe side)."""
    out = []
    for vmid, cfg in configs.items():
        if vmid == template_vmid:
            continue
        volumes = [str(value).split(",")[0] for key, value in cfg.items() if DISK_KEY_RE.fullmatch(key)]
        names_base = any(int(m) == template_vmid for v in volumes for m in BASE_DISK_RE.findall(v))
        cloned_where_untracked = (
            any(v.split(":", 1)[0] in untracked for v in volumes)
            and Marker.parse(cfg.get("description"), vmid).template_vmid == template_vmid
        )
        if names_base or cloned_where_untracked:
            out.append(vmid)
    return sorted(out)


def select_prunes(templates: list[TemplateInfo], current_digest: str | None, keep: int) -> list[TemplateInfo]:
    """Templates beyond the newest ``keep`` (the current build always counts as kept, first)."""
    if keep < 1:
        raise PublishError(f"--keep must be at least 1 (got {keep})")
    current = [t for t in templates if current_digest and t.digest == current_digest]
    others = [t for t in templates if t not in current]
    slots = keep - (1 if current_digest else 0)
    return others[max(slots, 0):]


# ------------------------------------------------------------------------------ plan and report


@dataclass
class HostPlan:
    host: str
    node: str
    import_file: str
    template_name: str
    existing: TemplateInfo | None = None  # a template of this digest is already there
    same_content: bool = False  # existing is another build with the same recipe and installed packages
    upload: str = "upload"  # upload | resume | skip | none
    partial_bytes: int = 0
    vmid: int | None = None
    stale: list[TemplateInfo] = field(default_factory=list)  # half-made factory VMs to remove
    stale_partials: list[str] = field(default_factory=list)  # partial uploads of other builds (crashed runs)
    busy: list[int] = field(default_factory=list)  # half-made VMs a task is still working on: left alone
    prune: list[TemplateInfo] = field(default_factory=list)
    keep_for_clones: dict[int, list[int]] = field(default_factory=dict)

    @property
    def action(self) -> str:
        return "unchanged" if self.existing else "create"

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host, "node": self.node, "action": self.action, "upload": self.upload,
            "partial_bytes": self.partial_bytes, "import_file": self.import_file,
            "same_content_as": self.existing.build_id if self.same_content and self.existing else None,
            "vmid": self.existing.vmid if self.existing else self.vmid,
            "template_name": self.existing.name if self.existing else self.template_name,
            "remove_stale": [t.vmid for t in self.stale],
            "left_to_running_tasks": self.busy,
            "remove_partials": self.stale_partials,
            "prune": [{"vmid": t.vmid, "name": t.name, "build_id": t.build_id} for t in self.prune],
            "kept_for_linked_clones": {str(k): v for k, v in self.keep_for_clones.items()},
        }


@dataclass
class HostResult(Report):
    json_properties = ("ok",)

    host: str
    node: str = ""
    action: str = "failed"  # created | unchanged | planned | failed
    template_vmid: int | None = None
    template_name: str = ""
    upload: str = ""
    bytes_sent: int = 0
    duration_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pruned: list[dict[str, Any]] = field(default_factory=list)
    kept_for_linked_clones: dict[str, list[int]] = field(default_factory=dict)
    cleaned_up: list[str] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None



@dataclass
class PublishReport(Report):
    json_properties = ("ok", "bytes_sent")

    image: str
    build_id: str
    sha256: str
    digest: str
    transport: str
    dry_run: bool
    tested: bool
    forced_untested: bool
    keep: int
    hosts: list[HostResult] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(h.ok for h in self.hosts)

    @property
    def bytes_sent(self) -> int:
        return sum(h.bytes_sent for h in self.hosts)

    def host(self, name: str) -> HostResult:
        return next(h for h in self.hosts if h.host == name)

    @property
    def pending(self) -> bool:
        """A dry run's plan would change a host: a template to make, or templates and leftovers to remove."""
        return any(h.plan.get("action") == "create" or h.plan.get("prune") or h.plan.get("remove_stale")
                   or h.plan.get("remove_partials") for h in self.hosts)

    def failed_hosts(self) -> list[str]:
        return [h.host for h in self.hosts if not h.ok]

    def raise_for_failures(self) -> None:
        bad = [h for h in self.hosts if not h.ok]
        if bad:
            raise PublishError("publish failed on " + "; ".join(f"{h.host}: {h.error}" for h in bad))



# ------------------------------------------------------------------------------ the artifact


@dataclass(frozen=True)
class Artifact:
    manifest: Manifest
    image: Image
    path: Path
    size: int
    tested: bool
    forced: bool
    import_file: str
    template_name: str


def load_artifact(settings: Settings, site: Site, image_name: str, *, force_untested: bool) -> Artifact:
    """Everything publish needs from the build, checked before any host is contacted."""
    image = site.image(image_name)
    build_dir = settings.builds_dir / image_name
    manifest = manifest_mod.require(build_dir)
    if manifest.image != image_name:
        raise PublishError(
            f"{manifest_mod.manifest_path(build_dir)} is for image {manifest.image!r}, not {image_name!r}"
        )
    path = build_dir / manifest.artifact.path
    if not path.is_file():
        raise PublishError(f"{path}: the artifact named by {manifest_mod.manifest_path(build_dir)} does not exist")
    tested = manifest.tested_ok()
    if not tested and not force_untested:
        raise PublishError(
            f"{image_name} build {manifest.build_id}: no passing image test for sha256 "
            f"{manifest.artifact.sha256[:16]}... (image_test: {test_summary(manifest)}); run the image tests, "
            "or pass --force-untested to publish it marked 'untested'"
        )
    if not manifest_mod.has_sha256(path, manifest.artifact.sha256):
        raise PublishError(
            f"{path}: sha256 {manifest_mod.sha256_file(path)} does not match the manifest's "
            f"{manifest.artifact.sha256}; the artifact changed after the build: rebuild it"
        )
    return Artifact(
        manifest=manifest, image=image, path=path, size=path.stat().st_size, tested=tested,
        forced=force_untested and not tested, import_file=import_file_name(manifest),
        template_name=template_name(image, manifest),
    )


def check_inputs(settings: Settings, site: Site, image_name: str, *, transport: str, keep: int,
                 force_untested: bool, engine: str = "auto") -> Artifact:
    """Every local input of a publish (a dry run's too), checked before any host is contacted."""
    try:
        transport_kind(transport)
    except UnknownTransport as exc:
        raise PublishError(str(exc)) from None
    if engine != "auto" and engine not in ENGINES:
        raise PublishError(f"unknown SSH engine {engine!r} (choose {', '.join(ENGINES)} or auto)")
    if keep < 1:
        raise PublishError(f"--keep must be at least 1 (got {keep})")
    return load_artifact(settings, site, image_name, force_untested=force_untested)


# ------------------------------------------------------------------------------ one host


ProgressHook = Callable[[str, int, int], None]  # (host, completed bytes, total bytes)


@dataclass
class HostContext:
    hv: Hypervisor
    artifact: Artifact
    transport: str
    keep: int
    run_id: str
    client_factory: Callable[[Hypervisor], PveClient] = PveClient
    link_factory: Callable[[Hypervisor], SshLink] = field(default=lambda hv: SshLink(hv.name, hv.ssh).connect())
    progress: ProgressHook | None = None
    engine: str = "auto"
    lock_wait: int = LOCK_WAIT


def plan_host(ctx: HostContext, client: PveClient, link: SshLink) -> HostPlan:
    """What converging this host needs. Reads only; the real run calls it with the host lock held."""
    hv, art = ctx.hv, ctx.artifact
    plan = HostPlan(hv.name, client.node, art.import_file, art.template_name)
    all_factory = find_templates(client, art.manifest.image, include_incomplete=True)
    done = [t for t in all_factory if t.is_template]
    same = [t for t in done if t.digest == art.manifest.digest]
    content = art.manifest.content_digest
    # Content-addressed: a rebuild that installed exactly what the newest template holds (an upstream epoch
    # moved, nothing for this image did) publishes nothing; builds are not bit-reproducible, so the sha256
    # alone would make a new template every night.
    alike = [t for t in done[:1] if content and t.content == content and (t.tested or not art.tested)]
    if same or alike:
        plan.existing = (same or alike)[0]
        plan.same_content = not same
        plan.upload = "none"
    # Half-made factory VMs: with the lock held nobody else should be working on them; a run that lost
    # the lock may still have a task running on one, and that VM is left to it (it cleans up its own).
    half_made = [t for t in all_factory if not t.is_template and t.vmid in hv.template_vmids]
    busy = client.active_task_vmids() if half_made else set()
    plan.stale = [t for t in half_made if t.vmid not in busy]
    plan.busy = sorted(t.vmid for t in half_made if t.vmid in busy)
    own_partial = partial_name(art.import_file)
    stray = re.compile(rf"^\.{re.escape(art.manifest.image)}-.+\.(qcow2|raw|vmdk)\.partial$")
    listing, sizes = remote_probe(link, hv.storage.import_dir, art.import_file, own_partial)
    resumable = not plan.existing and TRANSPORTS[ctx.transport].resumable
    plan.stale_partials = sorted(n for n in listing if stray.match(n) and (n != own_partial or not resumable))
    if not plan.existing:
        final = f"{hv.storage.import_dir}/{art.import_file}"
        if sizes[art.import_file] == art.size and remote_sha256(link, final) == art.manifest.artifact.sha256:
            plan.upload = "skip"
        else:
            part = sizes[own_partial] or 0
            plan.partial_bytes = part if 0 < part <= art.size else 0
            plan.upload = "resume" if plan.partial_bytes and TRANSPORTS[ctx.transport].resumable else "upload"
        taken = used_vmids(client) - {t.vmid for t in plan.stale}
        plan.vmid = free_vmid(hv, taken)
    current = plan.existing.digest if plan.existing else None
    ranked = done if current else [_pending_info(plan, art)] + done
    candidates = select_prunes(ranked, current or art.manifest.digest, ctx.keep)
    if candidates:
        configs, untracked = _all_configs(client), untracked_clone_storages(client)
        for t in candidates:
            deps = clone_dependents(configs, t.vmid, untracked)
            if deps:
                plan.keep_for_clones[t.vmid] = deps
            else:
                plan.prune.append(t)
    return plan


def _all_configs(client: PveClient) -> dict[int, dict[str, Any]]:
    return {int(vm["vmid"]): client.vm_config(int(vm["vmid"])) for vm in client.list_vms()}


def _pending_info(plan: HostPlan, art: Artifact) -> TemplateInfo:
    return TemplateInfo(
        vmid=plan.vmid or 0, name=plan.template_name, node=plan.node, image=art.manifest.image,
        build_id=art.manifest.build_id, digest=art.manifest.digest, sha256=art.manifest.artifact.sha256,
        tested=art.tested, published_at="9999", import_file=art.import_file, publish_run="",
        is_template=True, locked=None, tags=(),
    )


MAX_ROUNDS = 4


def converge_host(ctx: HostContext, *, dry_run: bool) -> HostResult:
    """Plan, and unless dry_run execute, one host. Never raises: failures are in the result."""
    started = time.monotonic()
    hv = ctx.hv
    result = HostResult(hv.name, hv.node)
    link: SshLink | None = None
    lock: HostLock | None = None
    try:
        client = ctx.client_factory(hv)
        version = client.version()  # TLS and token are checked before anything else happens
        refusals = firmware_refusals(ctx.artifact.manifest.platform, str(version.get("version", "")))
        if refusals:
            raise PublishError(f"{ctx.artifact.manifest.image}: refused on {hv.node}: " + "; ".join(refusals))
        for round_ in range(MAX_ROUNDS):
            link = ctx.link_factory(hv)
            if not dry_run:
                lock = HostLock(link, hv.storage.import_dir, owner_line(ctx.run_id), wait=ctx.lock_wait)
                lock.acquire()
            plan = plan_host(ctx, client, link)
            result.plan = plan.to_dict()
            if round_ == 0:
                result.upload = plan.upload
            result.kept_for_linked_clones = plan.to_dict()["kept_for_linked_clones"]
            if dry_run:
                result.action = "planned"
                result.template_vmid = plan.existing.vmid if plan.existing else plan.vmid
                result.template_name = plan.existing.name if plan.existing else plan.template_name
                return result
            try:
                _execute(ctx, plan, client, link, lock, result)
                break
            except FactoryError as exc:
                # A failure while the lock was gone may be another run's doing (it found our half-made
                # VM stale): nothing of ours is trusted any more; re-take the lock and re-plan.
                if lock is None or lock.held:
                    raise
                if not isinstance(exc, LockLost):
                    result.warnings.append(f"failed after the host lock was lost ({exc}); re-planning")
                result.warnings.append("the SSH link holding the publish lock dropped; re-took the lock and re-planned")
                if lock is not None:
                    lock.release()
                link.close()
                lock = link = None
        else:
            raise PublishError(f"{hv.name}: lost the publish lock {MAX_ROUNDS} times; giving up")
    except FactoryError as exc:
        result.error = explain(str(exc).removeprefix(f"{hv.name}: "))
        result.action = "failed"
    except Exception as exc:  # a host failure must not take the other hosts down
        result.error = f"{type(exc).__name__}: {exc}"
        result.action = "failed"
    finally:
        if lock is not None:
            lock.release()
        if link is not None:
            link.close()
        result.duration_s = time.monotonic() - started
    return result


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _execute(
    ctx: HostContext, plan: HostPlan, client: PveClient, link: SshLink, lock: HostLock | None, result: HostResult
) -> None:
    hv, art = ctx.hv, ctx.artifact
    guard = (lambda doing: lock.ensure(doing)) if lock is not None else (lambda doing: None)
    for t in plan.stale:
        guard(f"removing half-made VM {t.vmid}")
        _destroy(client, t.vmid, result)
        result.cleaned_up.append(f"removed half-made VM {t.vmid} left by run {t.publish_run or '?'}")
    if plan.stale_partials:
        remote_remove(link, *(f"{hv.storage.import_dir}/{n}" for n in plan.stale_partials))
        result.cleaned_up.extend(f"removed stale partial upload {n}" for n in plan.stale_partials)
    if plan.existing:
        if ctx.progress:
            ctx.progress(hv.name, art.size, art.size)  # nothing to send: the bar is complete
        if result.action != "created":
            result.action = "unchanged"
            result.template_vmid, result.template_name = plan.existing.vmid, plan.existing.name
            if plan.same_content:
                result.notes.append(
                    f"no new template: build {art.manifest.build_id} installed the same packages from the same "
                    f"recipe as {plan.existing.name} (build {plan.existing.build_id}), which stays current")
    else:
        _upload(ctx, plan, client, link, result)
        _register(ctx, plan, client, result, guard)
        result.action = "created"
    # Clones are re-read before each prune (one may land meanwhile); the storages' types do not change.
    untracked = untracked_clone_storages(client) if plan.prune else frozenset[str]()
    for t in plan.prune:
        guard(f"pruning template {t.vmid}")
        clones = clone_dependents(_all_configs(client), t.vmid, untracked)
        if clones:
            # A clone landed since the plan (a deploy of an older version, or a human): keep the template.
            result.kept_for_linked_clones[str(t.vmid)] = clones
            continue
        _destroy(client, t.vmid, result)
        pruned: dict[str, Any] = {"vmid": t.vmid, "name": t.name, "build_id": t.build_id}
        if t.import_file and REMOVABLE_IMPORT_RE.match(t.import_file) and t.import_file != art.import_file:
            remote_remove(link, f"{hv.storage.import_dir}/{t.import_file}")
            pruned["import_file_removed"] = t.import_file
        result.pruned.append(pruned)


Sender = Callable[["HostContext", PveClient, SshLink, "HostResult", Callable[[int], None]], UploadResult]


@dataclass(frozen=True)
class Transport:
    """How an artifact's bytes reach a host's import storage: the sender and its kind's facts."""

    send: Sender
    kind: TransportKind

    @property
    def resumable(self) -> bool:
        return self.kind.resumable

    @property
    def staged(self) -> bool:
        return self.kind.staged


def _send_over_ssh(ctx: HostContext, client: PveClient, link: SshLink, result: HostResult,
                   tick: Callable[[int], None]) -> UploadResult:
    """Over the host's SSH link (verified, resumable, under the host lock)."""
    # The data channel starts on the control link (one handshake per host); after a drop the
    # uploader reconnects on its own, and the lost lock is noticed and re-taken by the caller.
    uploader = SshUploader(ctx.hv.name, lambda: ctx.link_factory(ctx.hv), engine=ctx.engine, shared=link,
                           endpoint=ctx.hv.ssh)
    try:
        return uploader.upload(ctx.artifact.path, ctx.hv.storage.import_dir, ctx.artifact.import_file,
                               ctx.artifact.manifest.artifact.sha256, progress=tick, check_final=False)
    finally:
        result.bytes_sent += uploader.bytes_sent  # counted even when the upload fails
        uploader.close()


def _send_through_the_api(ctx: HostContext, client: PveClient, link: SshLink, result: HostResult,
                          tick: Callable[[int], None]) -> UploadResult:
    """PVE's own upload call (content=import, checksum verified by PVE)."""
    art = ctx.artifact
    up = upload_api(client, ctx.hv.storage.import_, art.import_file, art.path, art.manifest.artifact.sha256,
                    progress=tick)
    result.bytes_sent += up.bytes_sent
    return up


TRANSPORTS: dict[str, Transport] = {
    "ssh": Transport(_send_over_ssh, TRANSPORT_KINDS["ssh"]),
    "api": Transport(_send_through_the_api, TRANSPORT_KINDS["api"]),
}


def _upload(ctx: HostContext, plan: HostPlan, client: PveClient, link: SshLink, result: HostResult) -> None:
    hv, art = ctx.hv, ctx.artifact
    total = art.size

    def tick(done: int) -> None:
        if ctx.progress:
            ctx.progress(hv.name, done, total)

    if plan.upload == "skip":
        tick(total)
        return
    up = TRANSPORTS[ctx.transport].send(ctx, client, link, result, tick)
    result.resumed_from = up.resumed_from
    result.upload = "resumed" if up.resumed_from else up.action
    tick(total)


def _register(
    ctx: HostContext, plan: HostPlan, client: PveClient, result: HostResult, guard: Callable[[str], None]
) -> None:
    hv, art = ctx.hv, ctx.artifact
    assert plan.vmid is not None
    description = template_description(
        art.manifest, import_file=art.import_file, tested=art.tested, forced=art.forced, run_id=ctx.run_id,
        published_at=_now(),
    )
    tags = template_tags(art.manifest, art.tested)
    vmid = plan.vmid
    taken: set[int] = set()
    created = False

    def on_created() -> None:
        nonlocal created
        created = True

    try:
        for _attempt in range(5):
            params = _create_params(hv, art, vmid, description, tags)
            guard(f"creating VM {vmid}")
            try:
                task = _retry_lock(lambda p=params: _create(client, p, on_created), result, f"create {vmid}")  # type: ignore[misc]
            except ApiError as exc:
                if ALREADY_EXISTS_RE.search(exc.pve_message):
                    # Someone else (outside our lock: a human, another tool) took the id: re-plan.
                    taken |= used_vmids(client) | {vmid}
                    vmid = free_vmid(hv, taken)
                    result.warnings.append(f"VMID {plan.vmid} was taken meanwhile; using {vmid}")
                    continue
                raise
            result.warnings.extend(f"create {vmid}: {w}" for w in task.warnings)
            break
        else:
            raise PublishError(f"{hv.name}: could not find a free VMID after 5 attempts")
        ensure_ms_2023(client, vmid, art.manifest.platform, guard)
        guard(f"converting VM {vmid} to a template")
        task = _retry_lock(lambda: _template(client, vmid), result, f"template {vmid}")
        if task is not None:
            result.warnings.extend(f"template {vmid}: {w}" for w in task.warnings)
        cfg = client.vm_config(vmid)
        meta = parse_description(str(cfg.get("description", "")))
        if str(cfg.get("template", "0")) != "1" or not meta or meta.get("digest") != art.manifest.digest:
            raise PublishError(f"{hv.name}: VM {vmid} does not read back as the template just made")
    except BaseException:
        if created:
            _cleanup_vm(client, vmid, ctx.run_id, result)
        raise
    result.template_vmid, result.template_name = vmid, art.template_name


def _create(client: PveClient, params: dict[str, Any], on_created: Callable[[], None]) -> Any:
    upid = client.create_vm(**params)
    on_created()  # from here on the id is ours: clean it up on failure
    return client.wait_task(str(upid), timeout=CREATE_TIMEOUT)


def _template(client: PveClient, vmid: int) -> Any:
    upid = client.make_template(vmid)
    if isinstance(upid, str) and upid.startswith("UPID:"):
        return client.wait_task(upid, timeout=TASK_TIMEOUT)
    return None


def _create_params(hv: Hypervisor, art: Artifact, vmid: int, description: str, tags: list[str]) -> dict[str, Any]:
    st = hv.storage
    params: dict[str, Any] = {
        "vmid": vmid,
        "name": art.template_name,
        "description": description,
        "tags": format_tags(tags),
        "ostype": "l26",
        "memory": min(art.image.memory, 2048),
        "cores": min(art.image.cpus, 2),
        "sockets": 1,
        "scsihw": "virtio-scsi-pci",
        "scsi0": f"{st.images}:0,import-from={st.import_}:import/{art.import_file}",
        "ide2": f"{st.cloudinit}:cloudinit",
        "boot": "order=scsi0",
        "serial0": "socket",
        "vga": "serial0",
        "agent": "enabled=1",
        "net0": f"virtio,bridge={hv.bridge}",
        **({"cpu": art.image.cpu} if art.image.cpu else {}),
    }
    for key, value in firmware_params(hv, art.manifest.platform).items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    return params


def firmware_params(hv: Hypervisor, ask: Platform) -> dict[str, Any]:
    """The create parameters of the template's firmware (docs/pve-facts.md, "UEFI, Secure Boot, vTPM"): OVMF
    with a 4m EFI vars volume (PVE copies its vars template in: Microsoft's and the distribution's keys with
    pre-enrolled-keys=1, none otherwise), a TPM 2.0 state volume, the machine; the cloud-init drive of a q35
    template on SCSI. ms-cert is never written here: PVE marks 2023k itself when its vars hold the 2023 CAs,
    and a marker written by hand would claim certificates nobody enrolled (see ensure_ms_2023)."""
    st = hv.storage
    params: dict[str, Any] = {}
    if ask.machine != "pc":
        params["machine"] = MachineSpec(ask.machine).format()
    if ask.machine == "q35":
        params["ide2"] = None
        params[CLOUDINIT_SCSI] = f"{st.cloudinit}:cloudinit"
    if ask.firmware == "uefi":
        params["bios"] = "ovmf"
        params["efidisk0"] = EfiDisk(f"{st.images}:1", "4m", ask.pre_enrolled_keys).format()
    if ask.tpm:
        params["tpmstate0"] = TpmState(f"{st.images}:1", "v2.0").format()
    return params


def ensure_ms_2023(client: PveClient, vmid: int, ask: Platform, guard: Callable[[str], None]) -> None:
    """Keys asking for Microsoft's 2023 CAs: the new VM's EFI disk must read ms-cert=2023k. PVE sets it at create
    when its OVMF vars template holds them (pve-edk2-firmware 4.2025.05+); otherwise setting ms-cert=2023 makes
    qemu-server (9.1.4+) enrol them with virt-fw-vars and write 2023k (OVMF.pm drive_change)."""
    if not ask.wants_ms_2023:
        return
    cfg = client.vm_config(vmid)
    efi = EfiDisk.parse(str(cfg.get("efidisk0", "")))
    if efi.ms_cert != MS_2023_ENROLLED:
        guard(f"enrolling Microsoft's 2023 UEFI CAs in VM {vmid}'s EFI disk")
        client.update_vm_config(vmid, digest=str(cfg.get("digest") or "") or None, timeout=TASK_TIMEOUT,
                                efidisk0=dataclasses.replace(efi, ms_cert="2023").format())
        efi = EfiDisk.parse(str(client.vm_config(vmid).get("efidisk0", "")))
    if efi.ms_cert != MS_2023_ENROLLED:
        raise PublishError(f"VM {vmid}: the EFI disk reads ms-cert={efi.ms_cert or '2011 (unset)'} after enrolling "
                           "Microsoft's 2023 CAs; update pve-edk2-firmware and qemu-server on the host")


def _cleanup_vm(client: PveClient, vmid: int, run_id: str, result: HostResult) -> None:
    """Destroy the VM this run created (checked by its run id), whatever state it is in."""
    try:
        cfg = client.vm_config(vmid)
    except RemoteError:
        return  # PVE already removed it (a failed create cleans up after itself)
    meta = parse_description(str(cfg.get("description", "")))
    if not meta or meta.get("publish_run") != run_id:
        return
    try:
        _destroy(client, vmid, result)
        result.cleaned_up.append(f"destroyed half-made VM {vmid}")
    except RemoteError as exc:
        result.cleaned_up.append(f"could NOT destroy half-made VM {vmid} ({exc}); the next publish removes it")


LOCK_RETRIES = 5
LOCK_RETRY_DELAY = 2.0


def _retry_lock(fn: Callable[[], Any], result: HostResult, what: str) -> Any:
    """Run fn (a call and its task); retry PVE's "can't lock file ... got timeout", noting each retry."""

    def note(message: str) -> None:
        result.warnings.append(f"{what}: retrying after a lock timeout ({message.strip()[:160]})")

    return retry_lock_timeouts(fn, attempts=LOCK_RETRIES, delay=LOCK_RETRY_DELAY, on_retry=note)


def _destroy(client: PveClient, vmid: int, result: HostResult) -> None:
    def once() -> Any:
        upid = client.destroy_vm(vmid)
        if isinstance(upid, str) and upid.startswith("UPID:"):
            return client.wait_task(upid, timeout=TASK_TIMEOUT)
        return None

    task = _retry_lock(once, result, f"destroy {vmid}")
    if task is not None:
        result.warnings.extend(f"destroy {vmid}: {w}" for w in task.warnings)


# ------------------------------------------------------------------------------ fan-out


@contextmanager
def _progress_bars(enabled: bool, hosts: list[Hypervisor], total: int) -> Iterator[ProgressHook | None]:
    if not enabled:
        yield None
        return
    from image_factory.console import Milestones, console

    if not console.is_terminal:
        yield Milestones()  # a log gets a line per quarter, not bars redrawn nobody sees
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bars = Progress(
        TextColumn("{task.description:<14}", markup=False), BarColumn(), DownloadColumn(binary_units=True),
        TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )
    ids = {h.name: bars.add_task(h.name, total=total, start=True) for h in hosts}
    lock = threading.Lock()

    def hook(host: str, done: int, size: int) -> None:
        with lock:
            bars.update(ids[host], completed=done, total=size)

    with bars:
        yield hook


def publish_image(
    settings: Settings, site: Site, image_name: str, *, hypervisors: list[str] | tuple[str, ...] | None = None,
    transport: str = "ssh", keep: int = DEFAULT_KEEP, dry_run: bool = False, force_untested: bool = False,
    progress: bool = True, engine: str = "auto", lock_wait: int = LOCK_WAIT,
    client_factory: Callable[[Hypervisor], PveClient] | None = None,
    link_factory: Callable[[Hypervisor], SshLink] | None = None,
) -> PublishReport:
    """Publish ``builds/<image>/`` to the hypervisors (all by default) in parallel.

    Input problems raise before any host is contacted; per-host failures are in the report
    (``report.ok``, ``report.raise_for_failures()``).
    """
    started = time.monotonic()
    hosts = site.select_hypervisors(list(hypervisors) if hypervisors else None)
    art = check_inputs(settings, site, image_name, transport=transport, keep=keep, force_untested=force_untested,
                       engine=engine)
    run_id = uuid.uuid4().hex[:12]
    report = PublishReport(
        image=image_name, build_id=art.manifest.build_id, sha256=art.manifest.artifact.sha256,
        digest=art.manifest.digest, transport=transport, dry_run=dry_run, tested=art.tested,
        forced_untested=art.forced, keep=keep,
    )
    with _progress_bars(progress and not dry_run, hosts, art.size) as hook:
        contexts = []
        for hv in hosts:
            ctx = HostContext(hv, art, transport, keep, run_id, progress=hook, engine=engine, lock_wait=lock_wait)
            if client_factory is not None:
                ctx.client_factory = client_factory
            if link_factory is not None:
                ctx.link_factory = link_factory
            contexts.append(ctx)
        # converge_host records its own failures in its HostResult: every host has a result
        done = per_host({c.hv.name: c for c in contexts}, lambda c: converge_host(c, dry_run=dry_run),
                        name="publish")
        results = [done.results[c.hv.name] for c in contexts]
    report.hosts = results
    report.duration_s = time.monotonic() - started
    return report
