"""lab.base-image: the offline Debian base image (logic in image_factory.lab.baseimage)."""

from __future__ import annotations

from invoke.context import Context

from image_factory.console import console, emit_json
from image_factory.lab import baseimage as bi
from image_factory.tasks._common import exit_unless, handle_errors, json_help, settings, task


@task(
    help={
        "force": "rebuild even when the cached image is intact and its recipe unchanged",
        "mirror": "Debian archive URL (default: FACTORY_DEBIAN_MIRROR, else this machine's apt sources)",
        "check": "only report whether the cached image is usable; build nothing (exit 1 if not)",
        "json": json_help("path, sha256 and build figures"),
    }
)
@handle_errors
def base_image(c: Context, force: bool = False, mirror: str | None = None, check: bool = False,
               json: bool = False) -> None:
    """Build (or reuse) builds/base/debian-13-base.qcow2: debootstrap, mkfs.ext4 -d, GRUB, qcow2."""
    s = settings(c)
    if check:
        state = bi.cache_state(s)
        console.print(f"base image: {state}")
        exit_unless(state == "ok")
        return
    path = bi.ensure_base_image(s, force=force, mirror=mirror)
    if json:
        emit_json(bi.describe(s) | {"path": str(path)})


@task(help={"mirror": "Debian archive URL (default: this machine's apt sources, or FACTORY_DEBIAN_MIRROR)"})
@handle_errors
def fetch_debs(c: Context, mirror: str | None = None) -> None:
    """Download the base image's .deb files into the shared cache (./dev setup runs this)."""
    s = settings(c)
    fetched = bi.fetch_packages(s, mirror=mirror)
    console.print(f"base image packages {'downloaded' if fetched else 'already cached'}: {bi.base_paths(s).debs}")
