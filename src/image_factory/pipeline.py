"""The nightly pipeline: for each image, build (cache-aware), test, publish to every hypervisor.

One image failing never stops the others; the report says per image and host what happened
and why, and the exit code is non-zero when any image failed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from image_factory import preflight as pf
from image_factory import publish
from image_factory.console import console, styled
from image_factory.errors import FactoryError
from image_factory.image import build, imagetest, upstream
from image_factory.image.build import BuildOptions, BuildOutcome
from image_factory.image.builddir import BuildDir
from image_factory.image.manifest import ImageTestResult
from image_factory.image.progress import progress_for
from image_factory.reports import Report
from image_factory.settings import Settings
from image_factory.site.inventory import Image, Site, eol_gate


@dataclass
class ImageRun:
    image: str
    status: str = "pending"  # ok | failed
    stage: str = ""  # the stage that failed
    error: str = ""
    build: dict[str, Any] = field(default_factory=dict)
    tests: dict[str, Any] = field(default_factory=dict)
    publish: dict[str, Any] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)


@dataclass
class PipelineReport(Report):
    json_properties = ("ok",)

    started_at: str
    finished_at: str = ""
    total_s: float = 0.0
    images: list[ImageRun] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(run.status == "ok" for run in self.images)


def _package_changes(build_dir: BuildDir, build_id: str) -> dict[str, Any] | None:
    """package-diff.json of this build (written by the image test against the build before), if any."""
    try:
        data = json.loads(build_dir.package_diff.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("to_build") == build_id else None


def _security_updates(settings: Settings, image: Image, changes: dict[str, Any]) -> list[str] | str:
    """Which of the changes are security fixes (Debian: the versions a -security suite ships), or why unknown."""
    try:
        return upstream.security_updates(changes, image.upstream_repositories, settings.resolve("packer/keys"),
                                         image.release, resolve=settings.resolve)
    except FactoryError as exc:
        return f"unknown: {exc}"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_summary(report: PipelineReport) -> str:
    """The report as Markdown for a CI job summary ($GITHUB_STEP_SUMMARY)."""
    lines = [f"## Image pipeline: {'ok' if report.ok else 'FAILED'} ({report.total_s:.0f} s, {report.started_at})",
             "", "| image | status | build | why | tests | hosts |", "|---|---|---|---|---|---|"]
    details: list[str] = []
    for run in report.images:
        hosts = ", ".join(f"{h['host']}: {h['action']}" + (f" {h['template_vmid']}" if h.get("template_vmid") else "")
                          + (f", pruned {len(h['pruned'])}" if h.get("pruned") else "")
                          for h in (run.publish or {}).get("hosts", []))
        lines.append(f"| {_cell(run.image)} | {_cell(run.status + (' at ' + run.stage if run.stage else ''))} | "
                     f"{_cell(run.build.get('status', '-'))} | {_cell(run.build.get('reason', ''))} | "
                     f"{_cell(run.tests.get('status', '-'))} | {_cell(hosts or '-')} |")
        changes = run.build.get("package_changes")
        if changes:
            details += ["", f"### {run.image}: packages since build {changes.get('from_build')}", ""]
            details += [f"- {c['name']}: {c['from']} → {c['to']}" for c in changes.get("changed", [])]
            details += [f"- added {p}" for p in changes.get("added", [])]
            details += [f"- removed {p}" for p in changes.get("removed", [])]
            if not (changes.get("changed") or changes.get("added") or changes.get("removed")):
                details.append("- no package changed")
            security = run.build.get("security_updates")
            if security:
                details += ["", "Security fixes: " + (security if isinstance(security, str) else ", ".join(security))]
        source = run.build.get("source") or {}
        if source.get("resolved"):
            details += ["", f"- {run.image}: media not pinned in git, resolved {source['resolved']}: "
                        f"{source['url']} sha256 {source['sha256']} (signed by {source['signed_by']})"]
        for h in (run.publish or {}).get("hosts", []):
            details += [f"- {run.image} on {h['host']}: {note}" for note in h.get("notes", [])]
        if run.error:
            details += ["", f"**{run.image} failed at {run.stage}:** {run.error}"]
    return "\n".join(lines + details) + "\n"


@dataclass
class BuiltImage:
    """One image built (or found cached, or planned) and, when newly built, tested."""

    outcome: BuildOutcome
    tests: ImageTestResult | None = None  # None: not run (cached, planned, or skipped)


def build_one(settings: Settings, image: Image, options: BuildOptions, *, skip_tests: bool) -> BuiltImage:
    """The build.* tasks' flow: build with live progress (or find the build cached), say what happened, then
    test a new build, or record in its manifest that its tests were skipped. A failing test is an error."""
    with progress_for(image.name) as progress:
        outcome = build.build_image(settings, image, options=options, on_event=progress)
    _say_built(image.name, outcome)
    m = outcome.manifest
    if outcome.status != "built" or m is None:
        return BuiltImage(outcome)
    if skip_tests:
        m.skip_tests = True
        outcome.dir.save(m)
        console.print(styled("[yellow]{}[/]: image tests skipped (--skip-tests); recorded in the manifest", image.name))
        return BuiltImage(outcome)
    result = imagetest.test_image(settings, image, outcome.dir)
    console.print(f"{image.name}: image tests {result.status}")
    if result.status == "failed":
        raise FactoryError(f"{image.name}: image tests failed (see the manifest's image_test)")
    return BuiltImage(outcome, result)


def _say_built(name: str, outcome: BuildOutcome) -> None:
    m = outcome.manifest
    if outcome.status == "planned":
        console.print(styled("[yellow]{}[/]: dry run, would build ({})", name, outcome.reason))
    elif outcome.status == "cached":
        console.print(styled("[green]{}[/]: cache hit, nothing to do: {} (build {}; use --force to rebuild)",
                             name, outcome.artifact, m.build_id if m else "?"))
    elif m is not None:
        console.print(styled("[green]{}[/]: built {} in {}s ({} MiB, sha256 {}..., build {}); log: {}", name,
                             outcome.artifact, f"{outcome.duration_s:.0f}", f"{m.artifact.disk_size / 2**20:.0f}",
                             m.artifact.sha256[:16], m.build_id, outcome.log))


def _build_and_test(settings: Settings, image: Image, options: BuildOptions, run: ImageRun) -> None:
    """The pipeline's build and test stages for one image, recorded in ``run``; a FactoryError when the image
    must not be published (no manifest, failing tests)."""
    name = image.name
    run.stage = "build"
    t0 = time.monotonic()
    with progress_for(name) as build_progress:
        outcome = build.build_image(settings, image, options=options, on_event=build_progress)
    run.durations["build"] = round(time.monotonic() - t0, 1)
    m = outcome.manifest
    if m is None:
        raise FactoryError(f"{name}: the build produced no manifest")
    run.build = {
        "status": outcome.status, "build_id": m.build_id, "sha256": m.artifact.sha256,
        "artifact": m.artifact.path, "disk_size": m.artifact.disk_size,
        "ansible_strategy": m.ansible_strategy, "reason": outcome.reason, "source": m.source,
    }

    run.stage = "test"
    t0 = time.monotonic()
    if m.tested_ok():
        run.tests = {"status": "passed", "cached": True}
    else:
        result = imagetest.test_image(settings, image, outcome.dir)
        run.tests = {
            "status": result.status, "passed": result.passed, "failed": result.failed,
            "errors": result.errors, "failures": result.failures, "cached": False,
        }
        m = outcome.dir.require()
    run.durations["test"] = round(time.monotonic() - t0, 1)
    run.build["package_changes"] = changes = _package_changes(outcome.dir, m.build_id)
    if changes and not options.offline:
        run.build["security_updates"] = _security_updates(settings, image, changes)
    if not m.tested_ok():
        failing = ", ".join(run.tests.get("failures", [])[:5]) or "see the JUnit report"
        raise FactoryError(f"{name}: image tests failed ({failing}); not publishing")


def default_images(site: Site) -> list[str]:
    """Every image some VM of the inventory uses, in catalogue order."""
    used = {vm.image for vm in site.vms.values()}
    return [name for name in site.images if name in used]


def images_to_run(site: Site, images: list[str] | None) -> list[str]:
    """The images a run would build (``images``, else :func:`default_images`), every one in the catalogue."""
    names = images or default_images(site)
    unknown = [n for n in names if n not in site.images]
    if unknown:
        raise FactoryError(f"unknown image(s) {', '.join(unknown)} (catalogue: {', '.join(site.images)})")
    return names


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class _Options:
    """What every image of one run is built, tested and published with."""

    hypervisors: list[str] | None
    force: bool
    keep: int
    transport: str
    accelerator: str | None
    progress: bool
    allow_eol: bool
    offline: bool


def run_pipeline(
    settings: Settings,
    site: Site,
    images: list[str] | None = None,
    hypervisors: list[str] | None = None,
    *,
    force: bool = False,
    keep: int = 3,
    transport: str = "ssh",
    accelerator: str | None = None,
    progress: bool = True,
    preflight: bool = True,
    allow_eol: bool = False,
    offline: bool = False,
) -> PipelineReport:
    names = images or default_images(site)
    for name in names:
        site.image(name)  # unknown names fail before anything runs
    for warning in eol_gate([site.images[n] for n in names], site.images_path, allow_eol=allow_eol):
        console.print(styled("[yellow]warning:[/] {}", warning))
    hosts = [h.name for h in site.select_hypervisors(hypervisors)]
    if preflight:
        # Before a build is wasted: the hosts must be able to take what this run will publish.
        console.print(f"preflight (publish) on {', '.join(hosts)} ...")
        pf.run_preflight(settings, site, hosts, checks=pf.PUBLISH_CHECKS, images=names,
                         transport=transport).raise_for_failures()
    options = _Options(hypervisors, force, keep, transport, accelerator, progress, allow_eol, offline)
    report = PipelineReport(started_at=_now())
    started = time.monotonic()
    for name in names:
        run = ImageRun(name)
        report.images.append(run)
        console.rule(styled("[bold]{}", name))
        try:
            _run_image(settings, site, site.images[name], run, options)
            run.status, run.stage = "ok", ""
        except FactoryError as exc:
            run.status, run.error = "failed", str(exc)
            console.print(styled("[bold red]{} failed at {}:[/] {}", name, run.stage, exc))
    report.finished_at = _now()
    report.total_s = round(time.monotonic() - started, 1)
    return report


def _run_image(settings: Settings, site: Site, image: Image, run: ImageRun, options: _Options) -> None:
    """One image through build, test and publish; a FactoryError stops it at the stage ``run.stage`` names."""
    choices = BuildOptions(force=options.force, accelerator=options.accelerator or settings.accelerator,
                           allow_eol=options.allow_eol, offline=options.offline)
    _build_and_test(settings, image, choices, run)
    _publish(settings, site, image.name, run, options)


def _publish(settings: Settings, site: Site, name: str, run: ImageRun, options: _Options) -> None:
    run.stage = "publish"
    t0 = time.monotonic()
    pub = publish.publish_image(settings, site, name, hypervisors=options.hypervisors, transport=options.transport,
                                keep=options.keep, progress=options.progress)
    run.durations["publish"] = round(time.monotonic() - t0, 1)
    run.publish = pub.to_dict()
    if not pub.ok:
        raise FactoryError(f"{name}: publish failed on {', '.join(pub.failed_hosts())}")
