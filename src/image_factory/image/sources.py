"""The build's source medium: resolved when the catalogue does not pin it yet (``checksum: refresh``), pinned,
present and matching its checksum (a remote CHECKSUM file only when the release key signed it), and room on
disk for the build."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

from image_factory import families
from image_factory.image import fedora_media, render
from image_factory.image.buildevents import BuildError
from image_factory.image.manifest import Manifest, sha256_file
from image_factory.settings import Settings
from image_factory.site.inventory import Image


def resolve_unpinned(settings: Settings, image: Image, emit: Callable[[str, str], None], *, offline: bool,
                     previous: Manifest | None) -> tuple[Image, dict[str, str]]:
    """An entry with ``checksum: refresh`` builds from the release's current medium, its sha256 taken from the
    signed CHECKSUM (image.refresh's path): the image as pinned for this build, and what the manifest records.
    ``offline`` keeps the medium the last build resolved. A pinned entry comes back as it is."""
    if image.source.pinned:
        return image, {"url": image.source.url, "checksum": image.source.checksum}
    kept = previous.source if previous is not None and previous.release == image.release else {}
    if offline and not kept.get("sha256"):
        raise BuildError(f"{settings.images}: {image.name}: media not pinned yet (checksum: refresh) and --offline "
                         f"(no earlier build resolved them): run `invoke image.refresh --release {image.release}` "
                         "where fedoraproject.org is reachable, or build without --offline")
    if offline:
        record = dict(kept)
        emit("status", f"offline: building the medium the last build resolved: {record['url']}")
    else:
        resolved = fedora_media.resolve_medium(settings.base_for(fedora_media.KEYS_DIR), image,
                                               releases_url=settings.fedora_releases_url)
        record = resolved.as_record()
        emit("status", f"media resolved at build time: {resolved.url} sha256 {resolved.sha256} (CHECKSUM signed "
                       f"by {resolved.signed_by}); `invoke image.refresh --release {image.release}` pins them in git")
    source = image.source.model_copy(update={"url": record["url"], "checksum": f"sha256:{record['sha256']}"})
    return image.model_copy(update={"source": source}), record


def require_pinned(settings: Settings, image: Image) -> None:
    if not image.source.pinned:
        raise BuildError(f"{settings.images}: {image.name}: media not pinned yet (checksum: refresh): run "
                         f"`invoke image.refresh --release {image.release}` (reads fedoraproject.org), then build")


def verify_source_checksum(settings: Settings, image: Image, result: render.RenderResult,
                           emit: Callable[[str, str], None]) -> None:
    """Media not pinned yet stop the build; a remote CHECKSUM file counts only when the release key signed it,
    and Packer then gets the plain sha256 taken from its signed part."""
    what = f"{settings.images}: {image.name}: source.checksum"
    remote = fedora_media.remote_checksum_file(image.source.checksum, source_is_local=image.source.is_local,
                                               what=what)
    if remote is None:
        return
    if not families.get(image.family).signs_checksums:
        raise BuildError(f"{what}: a remote checksum file is trusted only when signed by a pinned key, and none is "
                         f"pinned for {image.family}; use 'sha256:<hex>'")
    url = fedora_media.located(image, remote)
    file_name = image.source.url.rpartition("/")[2]
    sha = fedora_media.verified_checksum(settings.base_for(fedora_media.KEYS_DIR), image.release, url, file_name)
    render.set_var(result, "source_checksum", sha)
    key = fedora_media.release_key_name(image.release)
    emit("status", f"source verified: {file_name} {sha} (CHECKSUM signed by {key})")


def check_source(settings: Settings, image: Image) -> None:
    """Local sources: present, and matching their checksum file (clear message otherwise)."""
    src, ck_file = render.source_paths(settings, image)
    if src is None:
        return
    hint = families.get(image.family).missing_source_hint
    if not src.is_file():
        raise BuildError(f"{image.name}: source image {src} does not exist: {hint}")
    ck = image.source.checksum
    if ck_file is not None:
        if not ck_file.is_file():
            raise BuildError(f"{image.name}: checksum file {ck_file} does not exist: {hint}")
        fields = ck_file.read_text(encoding="utf-8").split()
        if not fields or not re.fullmatch(r"[0-9a-f]{64}", fields[0]):
            raise BuildError(f"{ck_file}: not in sha256sum format ('<sha256>  <file>')")
        want = fields[0]
    elif ck.startswith("sha256:"):
        want = ck.split(":", 1)[1]
    else:
        return
    got = sha256_file(src)
    if got != want:
        raise BuildError(f"{image.name}: checksum mismatch for {src}: expected sha256 {want}, got {got}; "
                         f"the file is damaged or stale: {hint}")


def check_disk_space(path: Path, need_bytes: int, what: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise BuildError(f"disk full: {path} has {free // 2**20} MiB free, {what} needs about "
                         f"{need_bytes // 2**20} MiB; free some space (old builds/ directories) and retry")
