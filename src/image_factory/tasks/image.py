"""image.*: boot a built image like a Proxmox clone and run the testinfra suites against it."""

from __future__ import annotations

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit

from ..console import emit_json
from ._common import handle_errors, site, task


@task(
    help={
        "name": "catalogue image to test (its builds/<name>/manifest.json names the artifact)",
        "timeout": "seconds to wait for the guest's SSH (default 600; TCG boots take 1-2 minutes)",
        "keep_running": "leave the guest running after the suites, print how to SSH in; Ctrl-C stops it",
        "automation_user": "user Ansible uses on clones, expected with passwordless sudo (default: ansible)",
        "build_user": "build user that must be gone from the image (default: the render stage's)",
        "json": "print the test result as JSON on stdout",
    },
    name="test",
)
@handle_errors
def test_(c: Context, name: str, timeout: float = 600, keep_running: bool = False,
          automation_user: str = "ansible", build_user: str | None = None, json: bool = False) -> None:
    """Boot NAME's artifact on a throwaway overlay with a NoCloud seed, run its suites, record the result."""
    from dataclasses import asdict

    from .. import imagetest

    settings, s = site(c)
    img = s.image(name)
    result = imagetest.test_image(settings, img, settings.builds_dir / img.name, timeout=timeout,
                                  keep_running=keep_running, automation_user=automation_user,
                                  build_user=build_user)  # fmt: skip
    if json:
        emit_json(asdict(result))
    if result.status != "passed":
        raise Exit(code=1)


ns = Collection("image")
ns.add_task(test_)
