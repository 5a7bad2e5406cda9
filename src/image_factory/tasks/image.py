"""image.*: boot a built image like a Proxmox clone and run the testinfra suites against it."""

from __future__ import annotations

from dataclasses import asdict

from invoke.collection import Collection
from invoke.context import Context

from image_factory import options
from image_factory.console import console, emit_json, styled
from image_factory.image import fedora_media, imagetest
from image_factory.image.builddir import BuildDir
from image_factory.tasks._common import (
    dry_run_help,
    exit_plan,
    exit_unless,
    fedora_release,
    handle_errors,
    json_help,
    settings,
    site,
    task,
)


@task(
    help={
        "name": "catalogue image to test (its builds/<name>/manifest.json names the artifact)",
        "timeout": "seconds to wait for the guest's SSH (default 600; TCG boots take 1-2 minutes)",
        "keep_running": "leave the guest running after the suites, print how to SSH in; Ctrl-C stops it",
        "automation_user": "user Ansible uses on clones, expected with passwordless sudo (default: ansible)",
        "build_user": "build user that must be gone from the image (default: the render stage's)",
        "json": json_help("the test result"),
    },
    name="test",
)
@handle_errors
def test_(c: Context, name: str, timeout: float = 600, keep_running: bool = False,
          automation_user: str = "ansible", build_user: str | None = None, json: bool = False) -> None:
    """Boot NAME's artifact on a throwaway overlay with a NoCloud seed, run its suites, record the result."""
    options.seconds("--timeout", timeout)
    settings, s = site(c)
    img = s.image(name)
    result = imagetest.test_image(settings, img, BuildDir.of(settings, img.name), timeout=timeout,
                                  keep_running=keep_running, automation_user=automation_user,
                                  build_user=build_user)  # fmt: skip
    if json:
        emit_json(asdict(result))
    exit_unless(result.status == "passed")


@task(
    help={
        "release": "Fedora release to refresh (default: factory.fedora_release)",
        "dry_run": dry_run_help("show the catalogue diff"),
        "releases_url": "where Fedora lists its artifacts (default: factory.fedora_releases_url, else "
                        "https://fedoraproject.org/releases.json)",
        "catalogue": "image catalogue YAML to update (default: factory.images)",
    },
)
@handle_errors(plan="dry_run")
def refresh(c: Context, release: int | None = None, dry_run: bool = False, releases_url: str | None = None,
            catalogue: str | None = None) -> None:
    """Point the catalogue's Fedora entries at the current media, sha256 taken from the signed CHECKSUM only."""
    s = settings(c, images=catalogue)
    rel = fedora_release(c, release)
    url = releases_url or str(c.config.get("factory", {}).get("fedora_releases_url") or fedora_media.RELEASES_URL)
    result = fedora_media.refresh_catalogue(s.images, s.base_for(fedora_media.KEYS_DIR), rel, releases_url=url,
                                            dry_run=dry_run)
    for mode, medium in sorted(result.media.items()):
        console.print(styled("[green]verified[/] {} {}: sha256 {} (signed CHECKSUM {})", mode, medium.file_name,
                             result.checksums[mode], medium.checksum_url))
    if result.diff:
        console.print(result.diff)
    state = "up to date" if not result.diff else ("dry run, nothing written" if dry_run else "written")
    console.print(styled("{}: Fedora {} ({}): {}", s.images, rel, ", ".join(sorted(result.entries)), state))
    if dry_run:
        exit_plan(blocked=False, pending=bool(result.diff))


ns = Collection("image")
ns.add_task(test_)
ns.add_task(refresh)
