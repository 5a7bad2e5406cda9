"""Publish one build to the hypervisors: check the local inputs, then converge every host in parallel."""

from __future__ import annotations

import dataclasses
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from image_factory.fanout import per_host
from image_factory.image import manifest as manifest_mod
from image_factory.image.builddir import BuildDir
from image_factory.image.delta import DeltaError, keep_published, make_delta
from image_factory.image.manifest import Manifest
from image_factory.publish.act import converge_cluster, converge_host
from image_factory.publish.model import DEFAULT_KEEP, Artifact, HostResult, PublishError, PublishReport
from image_factory.publish.names import efi_vars_file_name, import_file_name, template_name, test_summary
from image_factory.publish.present import progress_bars
from image_factory.publish.send import LOCK_WAIT, HostContext
from image_factory.pve.client import PveClient
from image_factory.pve.sshlink import SshLink
from image_factory.pve.upload import ENGINES, UnknownTransport, transport_kind
from image_factory.settings import Settings
from image_factory.site.inventory import Hypervisor, Site


def load_artifact(settings: Settings, site: Site, image_name: str, *, force_untested: bool) -> Artifact:
    """Everything publish needs from the build, checked before any host is contacted."""
    image = site.image(image_name)
    build_dir = BuildDir.of(settings, image_name)
    manifest = build_dir.require()
    if manifest.image != image_name:
        raise PublishError(
            f"{build_dir.manifest} is for image {manifest.image!r}, not {image_name!r}"
        )
    path = build_dir.artifact(manifest)
    if not path.is_file():
        raise PublishError(f"{path}: the artifact named by {build_dir.manifest} does not exist")
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
    import_file = import_file_name(manifest)
    efi_vars = own_efi_vars(build_dir, manifest)
    return Artifact(
        manifest=manifest, image=image, path=path, size=path.stat().st_size, tested=tested,
        forced=force_untested and not tested, import_file=import_file,
        template_name=template_name(image, manifest), efi_vars=efi_vars,
        efi_vars_file=efi_vars_file_name(import_file) if efi_vars else "",
    )


def own_efi_vars(build_dir: BuildDir, manifest: Manifest) -> Path | None:
    """The build's enrolled variable store, for a key set PVE cannot pre-enrol (Platform.own_store), checked."""
    if not manifest.platform.own_store:
        return None
    where = f"{manifest.image} build {manifest.build_id} (keys: {manifest.secure_boot_keys})"
    path = build_dir.efi_vars(manifest)
    if path is None:
        raise PublishError(f"{where}: its template imports the build's enrolled EFI variable store, but "
                           f"{build_dir.manifest} names none (a build before the store was kept): rebuild it")
    if not path.is_file():
        raise PublishError(f"{where}: {path}, the EFI variable store the manifest names, does not exist: rebuild it")
    if not manifest_mod.has_sha256(path, manifest.efi_vars_sha256):
        raise PublishError(f"{where}: {path}: sha256 {manifest_mod.sha256_file(path)} does not match the manifest's "
                           f"{manifest.efi_vars_sha256}; the store changed after the build: rebuild it")
    return path


def with_delta(art: Artifact, build_dir: BuildDir) -> Artifact:
    """The artifact with its delta against the artifact last published from here, if one can be made (each
    host's decide says whether it can use it); a failure to make one only means full uploads."""
    try:
        return dataclasses.replace(art, delta=make_delta(build_dir, art.manifest, art.path))
    except (DeltaError, OSError, subprocess.SubprocessError) as exc:
        return dataclasses.replace(art, no_delta=f"no delta could be made ({exc})")


def keep_base(art: Artifact, report: PublishReport, build_dir: BuildDir) -> None:
    """Keep the artifact as the next delta's base once a host holds it as a template (not after a dry run)."""
    holds = [h for h in report.hosts if h.ok and (h.action == "created" or (
        h.action == "unchanged" and not h.plan.get("same_content_as")))]
    if holds and not report.dry_run:
        try:
            keep_published(build_dir, art.manifest, art.path)
        except (DeltaError, OSError, subprocess.SubprocessError) as exc:
            holds[0].warnings.append(f"could not keep the artifact as the next delta's base ({exc}); "
                                     "the next publish sends the full image")


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


def publish_image(
    settings: Settings, site: Site, image_name: str, *, hypervisors: list[str] | tuple[str, ...] | None = None,
    transport: str = "ssh", keep: int = DEFAULT_KEEP, dry_run: bool = False, force_untested: bool = False,
    progress: bool = True, engine: str = "auto", lock_wait: int = LOCK_WAIT, delta: bool = True,
    client_factory: Callable[[Hypervisor], PveClient] | None = None,
    link_factory: Callable[[Hypervisor], SshLink] | None = None,
) -> PublishReport:
    """Publish ``builds/<image>/`` to the hypervisors (all by default) in parallel.

    ``delta``: send hosts that hold the build last published from here only the changed clusters (image/delta.py).
    Input problems raise before any host is contacted; per-host failures are in the report
    (``report.ok``, ``report.raise_for_failures()``).
    """
    started = time.monotonic()
    hosts = site.select_hypervisors(list(hypervisors) if hypervisors else None)
    art = check_inputs(settings, site, image_name, transport=transport, keep=keep, force_untested=force_untested,
                       engine=engine)
    if delta and transport_kind(transport).rebuilds_delta:  # a transport that cannot rebuild one needs none made
        art = with_delta(art, BuildDir.of(settings, image_name))
    run_id = uuid.uuid4().hex[:12]
    report = PublishReport(
        image=image_name, build_id=art.manifest.build_id, sha256=art.manifest.artifact.sha256,
        digest=art.manifest.digest, transport=transport, dry_run=dry_run, tested=art.tested,
        forced_untested=art.forced, keep=keep,
    )
    with progress_bars(progress and not dry_run, hosts, art.size) as hook:
        contexts = []
        for hv in hosts:
            ctx = HostContext(hv, art, transport, keep, run_id, progress=hook, engine=engine, lock_wait=lock_wait)
            if client_factory is not None:
                ctx.client_factory = client_factory
            if link_factory is not None:
                ctx.link_factory = link_factory
            contexts.append(ctx)
        # converge_host records its own failures in its HostResult: every host has a result. A cluster's nodes are
        # one unit: they share VMIDs and the cluster lock, and on shared storage one template serves them all.
        units: dict[str, list[HostContext]] = {}
        for c in contexts:
            units.setdefault(c.hv.cluster or c.hv.name, []).append(c)
        done = per_host(units, lambda unit: converge_unit(unit, dry_run=dry_run), name="publish")
        report.hosts = [r for key in units for r in done.results[key]]
    keep_base(art, report, BuildDir.of(settings, image_name))
    report.duration_s = time.monotonic() - started
    return report


def converge_unit(contexts: list[HostContext], *, dry_run: bool) -> list[HostResult]:
    """A hypervisor of its own, or the selected nodes of one cluster entry."""
    if contexts[0].hv.cluster is None:
        return [converge_host(contexts[0], dry_run=dry_run)]
    return converge_cluster(contexts, dry_run=dry_run)
