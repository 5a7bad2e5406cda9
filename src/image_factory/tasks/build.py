"""build.*: render and validate templates, build images with Packer (cached), then test them."""

from __future__ import annotations

import time
from typing import Any

from invoke.collection import Collection
from invoke.context import Context

from image_factory.console import console, emit_json, styled
from image_factory.errors import FactoryError
from image_factory.image import render, rendercheck
from image_factory.image.build import BuildOptions
from image_factory.image.packerrun import cached_packer_version
from image_factory.image.strategy import check_options
from image_factory.pipeline import build_one
from image_factory.settings import Settings
from image_factory.site.inventory import Image, Site
from image_factory.tasks._common import dry_run_help, exit_plan, fedora_release, handle_errors, json_help, site, task


def _select(s: Site, image: str | None, all_: bool) -> list[Image]:
    if all_ and image:
        raise FactoryError("give either --image NAME or --all, not both")
    if all_:
        return list(s.images.values())
    if not image:
        raise FactoryError(f"name an image with --image NAME (catalogue: {', '.join(s.images)}) or use --all")
    return [s.image(image)]


@task(
    help={
        "image": "catalogue image to render (see packer/images.yml)",
        "all": "render every image in the catalogue",
        "no_validate": "skip validation by packer validate/fmt, ksvalidator and ansible-lint",
        "json": json_help("the rendered files and fingerprints"),
    },
    name="render",
)
@handle_errors
def render_(c: Context, image: str | None = None, all: bool = False, no_validate: bool = False,
            json: bool = False) -> None:
    """Render Packer HCL (and kickstart) into builds/<image>/, then validate with the real tools."""
    settings, s = site(c)
    version = cached_packer_version(settings)
    report: list[dict[str, Any]] = []
    for img in _select(s, image, all):
        why_not = render.not_a_factory_checkout(settings) if all and img.factory else None
        if why_not:  # --all renders what this install can; the image named alone still fails with the reason
            report.append({"image": img.name, "skipped": why_not})
            console.print(styled("[yellow]{}[/]: skipped: {}", img.name, why_not))
            continue
        t0 = time.monotonic()
        result = render.render_image(settings, img, packer_version=version)
        try:
            if not no_validate:
                rendercheck.validate(result, settings)
        finally:
            result.cleanup()
        rel = [str(p.relative_to(settings.root)) if p.is_relative_to(settings.root) else str(p) for p in result.files]
        report.append({"image": img.name, "files": rel, "fingerprint": result.fingerprint})
        state = "rendered" if no_validate else "rendered and valid"
        console.print(styled("[green]{}[/]: {} ({}s): {}", img.name, state, f"{time.monotonic() - t0:.1f}",
                             ", ".join(rel)))
    if json:
        emit_json(report)


def _build_one(settings: Settings, img: Image, *, force: bool, dry_run: bool, skip_tests: bool,
               accelerator: str | None, no_compress: bool, json: bool, ansible_strategy: str | None = None,
               allow_eol: bool = False, offline: bool = False) -> None:
    check_options(settings, accelerator, ansible_strategy)
    options = BuildOptions(force=force, dry_run=dry_run, accelerator=accelerator or "auto",
                           compress=False if no_compress else None, ansible_strategy=ansible_strategy,
                           allow_eol=allow_eol, offline=offline)
    outcome = build_one(settings, img, options, skip_tests=skip_tests).outcome
    if json:
        final = outcome.dir.load() if outcome.manifest is not None else None
        emit_json({"image": img.name, "status": outcome.status, "reason": outcome.reason,
                   "duration_s": round(outcome.duration_s, 3), "build_dir": str(outcome.dir.path),
                   "manifest": final.to_dict() if final is not None else None})
    if dry_run:
        exit_plan(blocked=False, pending=outcome.status == "planned")


BUILD_HELP = {
    "force": "rebuild even when the cache says the artifact is up to date",
    "dry_run": dry_run_help("render, validate and check inputs; report whether a build would run, start no VM"),
    "skip_tests": "do not run the image tests after a build (recorded in the manifest)",
    "accelerator": "auto (detect; KVM only if proven to work), kvm or tcg; default from factory.accelerator",
    "no_compress": "compact the qcow2 without compression (faster, larger upload); default per catalogue image",
    "ansible_strategy": "auto (mitogen under TCG, linear under KVM), mitogen or linear; default from "
                        "factory.ansible_strategy",
    "json": json_help("the outcome and manifest"),
    "allow_eol": "build a release past its end of life (its media from the archive) instead of refusing",
    "offline": "do not ask the upstream repositories for their state; keep the last build's epochs",
}


@task(help={"name": "catalogue image to build (see packer/images.yml)", **BUILD_HELP})
@handle_errors(plan="dry_run")
def image(c: Context, name: str, force: bool = False, dry_run: bool = False, skip_tests: bool = False,
          accelerator: str | None = None, no_compress: bool = False, json: bool = False,
          ansible_strategy: str | None = None, allow_eol: bool = False, offline: bool = False) -> None:
    """Build one catalogue image with Packer (cached: no work when nothing changed)."""
    settings, s = site(c)
    _build_one(settings, s.image(name), force=force, dry_run=dry_run, skip_tests=skip_tests,
               accelerator=accelerator, no_compress=no_compress, json=json, ansible_strategy=ansible_strategy,
               allow_eol=allow_eol, offline=offline)


@task(help={"release": "Fedora release (default: factory.fedora_release, else 45)", **BUILD_HELP})
@handle_errors(plan="dry_run")
def fedora(c: Context, release: int | None = None, force: bool = False, dry_run: bool = False,
           skip_tests: bool = False, accelerator: str | None = None, no_compress: bool = False,
           json: bool = False, ansible_strategy: str | None = None, allow_eol: bool = False,
           offline: bool = False) -> None:
    """Build the Fedora template for a release (catalogue image fedora-<release>)."""
    settings, s = site(c)
    rel = fedora_release(c, release)
    name = f"fedora-{rel}"
    if name not in s.images:
        have = sorted(i.name for i in s.images.values() if i.family == "fedora")
        raise FactoryError(f"no catalogue image {name} in {settings.images} (Fedora images: {', '.join(have)});"
                           f" adding a release is one entry there")
    _build_one(settings, s.images[name], force=force, dry_run=dry_run, skip_tests=skip_tests,
               accelerator=accelerator, no_compress=no_compress, json=json, ansible_strategy=ansible_strategy,
               allow_eol=allow_eol, offline=offline)


ns = Collection("build")
ns.add_task(render_, name="render")
ns.add_task(image)
ns.add_task(fedora)
