"""The build cache: a build is skipped when builds/<image>/manifest.json has the same input fingerprint (the
rendered files, the recipe, the upstream repositories' state) and the artifact still has its recorded sha256.
Deciding that and building take the image's lock, so a second build of it waits and then finds the result.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from image_factory.errors import FactoryError
from image_factory.image import render, upstream
from image_factory.image.builddir import BuildDir
from image_factory.image.buildevents import EventSink
from image_factory.image.manifest import Manifest, has_sha256, load
from image_factory.image.packerrun import now
from image_factory.settings import Settings
from image_factory.site.inventory import Image


def artifact_path(build_dir: Path, m: Manifest) -> Path:
    return build_dir / m.artifact.path


def build_age_days(m: Manifest, now: datetime | None = None) -> float | None:
    try:
        finished = datetime.strptime(m.finished_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return ((now or datetime.now(UTC)) - finished).total_seconds() / 86400


def cache_status(build_dir: Path, fingerprint: str, *, max_age_days: int | None = None,
                 now: datetime | None = None) -> tuple[Manifest | None, str]:
    """(manifest, "") on a hit; (None, why not) on a miss. ``max_age_days``: older builds miss too."""
    try:
        m = load(build_dir)
    except FactoryError as exc:
        return None, f"manifest unreadable ({exc})"
    if m is None:
        return None, "no previous build"
    if m.fingerprint != fingerprint:
        changed = "inputs changed"
        return None, changed
    art = artifact_path(build_dir, m)
    if not art.is_file():
        return None, f"artifact {art.name} is missing"
    if art.stat().st_size != m.artifact.disk_size or not has_sha256(art, m.artifact.sha256):
        return None, f"artifact {art.name} no longer matches its recorded sha256"
    if max_age_days is not None:
        age = build_age_days(m, now)
        if age is None or age >= max_age_days:
            shown = "of unknown age" if age is None else f"{age:.1f} days old"
            return None, f"build {m.build_id} is {shown} (max_age_days {max_age_days}): rebuilt for current updates"
    return m, ""


UPSTREAM_PREFIX = "upstream:"


def upstream_inputs(settings: Settings, image: Image, *, offline: bool,
                    previous: Manifest | None) -> tuple[dict[str, str], str]:
    """The upstream repositories' epochs as fingerprint inputs, and why some could not be read ("" if all
    were). ``offline`` keeps the previous build's epochs instead of asking (nothing is fetched)."""
    repos = image.upstream_repositories
    if not repos:
        return {}, ""
    if offline:
        kept = {k: v for k, v in (previous.inputs if previous else {}).items() if k.startswith(UPSTREAM_PREFIX)}
        return kept, ""
    epochs, failures = upstream.repository_epochs(repos, settings.resolve("packer/keys"), image.release,
                                                  resolve=settings.resolve)
    inputs = {UPSTREAM_PREFIX + name: epoch for name, epoch in epochs.items()}
    if not failures:
        return inputs, ""
    # An unknown upstream state never matches a previous build: rebuilding is the side that misses no fix.
    inputs[UPSTREAM_PREFIX + "unavailable"] = now()
    return inputs, "; ".join(f"{name}: {why}" for name, why in sorted(failures.items()))


def recipe_digest(inputs: dict[str, str]) -> str:
    """The build's own inputs without upstream's state: equal recipes plus equal packages, equal templates."""
    own = {k: v for k, v in inputs.items() if not k.startswith(UPSTREAM_PREFIX)}
    return hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()


def with_upstream(result: render.RenderResult, inputs: dict[str, str]) -> None:
    if inputs:
        result.inputs.update(inputs)
        blob = json.dumps({"rendered": result.fingerprint, **inputs}, sort_keys=True).encode()
        result.fingerprint = hashlib.sha256(blob).hexdigest()


def changed_inputs(build_dir: Path, inputs: dict[str, str]) -> list[str]:
    try:
        m = load(build_dir)
    except FactoryError:
        return []
    if m is None:
        return []
    keys = set(inputs) | set(m.inputs)
    return sorted(k for k in keys if inputs.get(k) != m.inputs.get(k))




@contextlib.contextmanager
def image_lock(build_dir: BuildDir, sink: EventSink) -> Iterator[None]:
    """Held from the render into builds/<image>/ to the new manifest: another process's render, cache check or
    build of the image in between would overwrite the rendered files under a running packer, or read a
    manifest being replaced. A second build waits its turn (the first is bounded by its own timeout)."""
    build_dir.path.mkdir(parents=True, exist_ok=True)
    with build_dir.lock.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sink.emit("status", f"waiting for another build of {build_dir.image} to finish (lock {build_dir.lock})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield
