"""Converge one host: take the lock, gather, decide, and carry the plan out (or only report it: --dry-run).

Host lock: a publish holds ``flock`` on ``<import_dir>/.image-factory-publish.lock`` through an SSH exec
channel for the whole converge (gather + decide + act) of a host; the kernel drops it when the holder dies.
A dropped link loses the lock too: the run re-takes it and re-plans (a round) before going on, since
another run may have worked on the host meanwhile. Hosts are independent: a failing host ends in its
result, never in an exception.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from image_factory.errors import FactoryError, RemoteError
from image_factory.fanout import per_host
from image_factory.publish.decide import HostState, clones_keeping, cluster_targets, decide, refusals
from image_factory.publish.gather import all_configs, gather_host, pve_version
from image_factory.publish.model import HostFailed, HostPlan, HostResult
from image_factory.publish.names import REMOVABLE_IMPORT_RE
from image_factory.publish.register import Guard, destroy, register
from image_factory.publish.send import TRANSPORTS, HostContext, upload, upload_efi_vars
from image_factory.pve.client import PveClient, explain
from image_factory.pve.hostlock import ClusterLock, HostLock, LockBusy, LockLost, owner_line
from image_factory.pve.sshlink import HostKeyMismatch, SshLink
from image_factory.pve.templates import cluster_facts
from image_factory.pve.upload import remote_remove
from image_factory.site.inventory import Hypervisor

MAX_ROUNDS = 4


class _Replan(Exception):
    """The lock was lost during a round: re-take it and plan again."""


def converge_host(ctx: HostContext, *, dry_run: bool) -> HostResult:
    """Plan, and unless dry_run execute, one host. Never raises: failures are in the result."""
    started = time.monotonic()
    result = HostResult(ctx.host, ctx.hv.node)
    try:
        client = ctx.client_factory(ctx.hv)
        refusals(ctx.artifact, ctx.hv.node, pve_version(client))
        for round_ in range(MAX_ROUNDS):
            try:
                _round(ctx, client, result, first=round_ == 0, dry_run=dry_run)
                break
            except _Replan:
                continue
        else:
            raise HostFailed(ctx.hv.name, f"lost the publish lock {MAX_ROUNDS} times; giving up")
    except FactoryError as exc:
        result.error = explain(host_reason(exc, ctx.hv.name))
        result.action = "failed"
    except Exception as exc:  # a host failure must not take the other hosts down
        result.error = f"{type(exc).__name__}: {exc}"
        result.action = "failed"
    finally:
        result.duration_s = time.monotonic() - started
    return result


def converge_cluster(contexts: list[HostContext], *, dry_run: bool) -> list[HostResult]:
    """The selected nodes of one cluster entry under one cluster lock, taken once for all of them: once for the
    cluster through its first online node when its images storage is shared, else once per node (cluster_targets
    says which) -- in parallel as independent hosts are, or one after the other where the import storage is
    shared (the first uploads, the others find the file there and import it)."""
    first, cluster = contexts[0], str(contexts[0].hv.cluster)
    try:
        facts = cluster_facts(first.client_factory(first.hv))
    except FactoryError as exc:
        return [HostResult(cluster, error=explain(host_reason(exc, first.hv.name)))]
    by_name = {c.hv.name: c for c in contexts}
    targets = cluster_targets(cluster, [c.hv for c in contexts], facts.online, facts.images_shared)
    acting = {t.label: t for t in targets if t.hv is not None}
    lock: HostLock | None = None
    results: dict[str, HostResult] = {}
    try:
        if acting and not dry_run:
            lock = take_cluster_lock([by_name[t.hv.name] for t in acting.values() if t.hv is not None])
        nodes = {label: dataclasses.replace(by_name[t.hv.name], label=label, shared_nodes=t.shared_nodes,
                                            unseen_nodes=t.unseen_nodes, cluster_lock=lock)
                 for label, t in acting.items() if t.hv is not None}
        if facts.import_shared:  # one import directory for every node: one after the other, the first uploads
            results.update({label: converge_host(ctx, dry_run=dry_run) for label, ctx in nodes.items()})
        else:
            done = per_host(nodes, lambda ctx: converge_host(ctx, dry_run=dry_run), name="publish-node")
            results.update(done.results)
    except Exception as exc:  # noqa: BLE001 - the cluster lock: nothing was changed on any node, and a failure
        # of this unit must not take the other hosts' results down (converge_host never raises)
        reason = explain(host_reason(exc, cluster)) if isinstance(exc, FactoryError) else f"{type(exc).__name__}: {exc}"
        results.update({label: results.get(label) or HostResult(label, t.hv.node if t.hv else "", error=reason)
                        for label, t in acting.items()})
    finally:
        if lock is not None:
            lock.release()
    for target in targets:
        if target.hv is None:
            results[target.label] = HostResult(target.label, error=target.refusal)
        else:
            results[target.label].notes.extend(target.notes)
    return [results[t.label] for t in targets]


def take_cluster_lock(contexts: list[HostContext]) -> HostLock:
    """The cluster lock, through the first of these nodes whose SSH answers (a node may be down)."""
    unreached: list[str] = []
    for ctx in contexts:
        try:
            link = ctx.link_factory(ctx.hv)
        except HostKeyMismatch:
            raise  # never a reason to try another node: the inventory or the network is wrong
        except RemoteError as exc:
            unreached.append(str(exc))
            continue
        lock = ClusterLock(link, ctx.hv.cluster_lock_dir, owner_line(ctx.run_id), wait=ctx.lock_wait, owns_link=True)
        lock.acquire()
        return lock
    raise RemoteError(str(contexts[0].hv.cluster), "cannot take the cluster lock through any node: "
                                                   + "; ".join(unreached))


def host_reason(exc: FactoryError, host: str) -> str:
    """An error's message without this host's name (the report names the host), classified by type."""
    if isinstance(exc, HostFailed | RemoteError) and exc.host == host:
        return exc.reason if isinstance(exc, HostFailed) else exc.message
    if isinstance(exc, LockBusy | LockLost):
        # pve.hostlock writes "<link name>: ..." into the message itself (it carries no host field yet).
        return str(exc).removeprefix(f"{host}: ")
    return str(exc)


def _round(ctx: HostContext, client: PveClient, result: HostResult, *, first: bool, dry_run: bool) -> None:
    """One locked round: gather, decide, act. Raises _Replan when the lock was lost part-way."""
    link = ctx.link_factory(ctx.hv)
    lock: HostLock | None = ctx.cluster_lock  # a cluster node's: held for all of them by converge_cluster
    try:
        if not dry_run and lock is None:
            lock = host_lock(ctx.hv, link, owner_line(ctx.run_id), ctx.lock_wait)
            lock.acquire()
        state = dataclasses.replace(gather_host(client, link, ctx.hv, ctx.artifact, ctx.keep, ctx.shared_nodes),
                                    unseen_nodes=ctx.unseen_nodes)
        plan = decide(state, ctx.artifact, ctx.keep, TRANSPORTS[ctx.transport])
        _record_plan(result, plan, first=first)
        if dry_run:
            _record_dry_run(result, plan)
            return
        try:
            execute(ctx, plan, state, client, link, lock, result)
        except FactoryError as exc:
            # A failure while the lock was gone may be another run's doing (it found our half-made
            # VM stale): nothing of ours is trusted any more; re-take the lock and re-plan.
            if lock is None or lock.held or ctx.cluster_lock is not None:
                raise  # a cluster lock lost is not re-taken by one node: the other nodes' work was under it
            if not isinstance(exc, LockLost):
                result.warnings.append(f"failed after the host lock was lost ({exc}); re-planning")
            result.warnings.append("the SSH link holding the publish lock dropped; re-took the lock and re-planned")
            raise _Replan from exc
    finally:
        if lock is not None and ctx.cluster_lock is None:
            lock.release()
        link.close()


def host_lock(hv: Hypervisor, link: SshLink, owner: str, wait: int) -> HostLock:
    """The lock of what a publish changes: the cluster's where the hypervisor is a node of a cluster entry (its
    nodes share VMIDs, and shared storage), else the host's own."""
    if hv.cluster is not None:
        return ClusterLock(link, hv.cluster_lock_dir, owner, wait=wait)
    return HostLock(link, hv.storage.import_dir, owner, wait=wait)


def _record_plan(result: HostResult, plan: HostPlan, *, first: bool) -> None:
    result.plan = plan.to_dict()
    if first:
        result.upload = plan.upload
    result.kept_for_linked_clones = result.plan["kept_for_linked_clones"]
    if plan.retention_waits and plan.retention_waits not in result.notes:
        result.notes.append(plan.retention_waits)


def _record_dry_run(result: HostResult, plan: HostPlan) -> None:
    result.action = "planned"
    result.template_vmid = plan.existing.vmid if plan.existing else plan.vmid
    result.template_name = plan.existing.name if plan.existing else plan.template_name


def execute(ctx: HostContext, plan: HostPlan, state: HostState, client: PveClient, link: SshLink,
            lock: HostLock | None, result: HostResult) -> None:
    """Carry the plan out: clean up leftovers, upload and register (or keep the current template), retain."""
    guard: Guard = (lambda doing: lock.ensure(doing)) if lock is not None else (lambda doing: None)
    _clean_up(ctx, plan, client, link, result, guard)
    if plan.existing:
        _keep_current(ctx, plan, result)
    else:
        upload(ctx, plan, client, link, result)
        upload_efi_vars(ctx, plan, client, link, result)
        register(ctx, plan, client, result, guard)
        result.action = "created"
    _retain(ctx, plan, state, client, link, result, guard)


def _clean_up(ctx: HostContext, plan: HostPlan, client: PveClient, link: SshLink, result: HostResult,
              guard: Guard) -> None:
    """Leftovers of a crashed run: half-made factory VMs and partial uploads of other builds."""
    for t in plan.stale:
        guard(f"removing half-made VM {t.vmid}")
        destroy(client.on(t.node), t.vmid, result)
        result.cleaned_up.append(f"removed half-made VM {t.vmid} left by run {t.publish_run or '?'}")
    if plan.stale_partials:
        remote_remove(link, *(f"{ctx.hv.storage.import_dir}/{n}" for n in plan.stale_partials))
        result.cleaned_up.extend(f"removed stale partial upload {n}" for n in plan.stale_partials)


def _keep_current(ctx: HostContext, plan: HostPlan, result: HostResult) -> None:
    hv, art = ctx.hv, ctx.artifact
    assert plan.existing is not None
    if ctx.progress:
        ctx.progress(hv.name, art.size, art.size)  # nothing to send: the bar is complete
    if result.action == "created":  # an earlier round made it before the lock was lost
        return
    result.action = "unchanged"
    result.template_vmid, result.template_name = plan.existing.vmid, plan.existing.name
    if plan.same_content:
        result.notes.append(
            f"no new template: build {art.manifest.build_id} installed the same packages from the same "
            f"recipe as {plan.existing.name} (build {plan.existing.build_id}), which stays current")


def _retain(ctx: HostContext, plan: HostPlan, state: HostState, client: PveClient, link: SshLink,
            result: HostResult, guard: Callable[[str], None]) -> None:
    """Remove the templates decide chose to prune, and their import files. A clone that landed since the plan
    (a deploy of an older version, or a human) keeps its template: the configs are re-read before each prune
    and decide's rule applied to them (the storages' types, read by gather, do not change)."""
    art = ctx.artifact
    for t in plan.prune:
        guard(f"pruning template {t.vmid}")
        clones = clones_keeping(all_configs(client, ctx.shared_nodes), t, state.untracked)
        if clones:
            result.kept_for_linked_clones[str(t.vmid)] = clones
            continue
        destroy(client.on(t.node), t.vmid, result)
        pruned: dict[str, Any] = {"vmid": t.vmid, "name": t.name, "build_id": t.build_id}
        if t.import_file and REMOVABLE_IMPORT_RE.match(t.import_file) and t.import_file != art.import_file:
            remote_remove(link, f"{ctx.hv.storage.import_dir}/{t.import_file}")
            pruned["import_file_removed"] = t.import_file
        if t.efi_vars_file and REMOVABLE_IMPORT_RE.match(t.efi_vars_file) and t.efi_vars_file != art.efi_vars_file:
            remote_remove(link, f"{ctx.hv.storage.import_dir}/{t.efi_vars_file}")
            pruned["efi_vars_file_removed"] = t.efi_vars_file
        result.pruned.append(pruned)

