"""The client's side of a delta publish: the last published artifact kept as the base, the guest view's digest,
and the delta (a qcow2 of only the clusters in which the new build's guest view differs from the base's).

A qcow2 file's bytes depend on the qemu-img that wrote it, so what a delta publish proves is the guest view: the
sha256 of the disk as the guest reads it (the raw image), recorded in the manifest as ``guest_sha256``. The host
rebuilds a full image from base + delta and checks that digest before it registers (pve/upload_delta).

The delta is exact: an empty overlay over the new build, then a *safe* ``qemu-img rebase`` onto the base, which
compares every cluster the overlay does not hold between the old backing file (the new build) and the new one
(the base) and copies only those that differ into the overlay (qemu's docs/tools/qemu-img.rst, "rebase": its
diff recipe). ``qemu-img convert -B`` alone does not compare: it copies every cluster the source's chain holds
above the base, i.e. all of a flat build; it is used after the rebase, on the overlay, to compress its clusters.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from image_factory.errors import FactoryError
from image_factory.files import write_atomic
from image_factory.image import manifest as manifest_mod
from image_factory.image.buildcache import image_lock
from image_factory.image.builddir import BuildDir
from image_factory.image.buildevents import EventSink
from image_factory.image.manifest import Manifest

BASE_RECORD_NAME = "base.json"
LOCK_NAME = ".lock"
QEMU_IMG_TIMEOUT = 1800


class DeltaError(FactoryError):
    """A delta cannot be made here (the caller publishes the full image instead)."""


@dataclass(frozen=True)
class PublishedBase:
    """The artifact of the build last published from this build directory, kept for the next delta."""

    build_id: str
    sha256: str  # the artifact's (= the manifest's artifact.sha256 of that build)
    guest_sha256: str
    virtual_size: int
    format: str
    file: str  # its name in builds/<image>/published/


@dataclass(frozen=True)
class Delta:
    """A delta of the current build against a published base, ready to send."""

    path: Path
    size: int
    sha256: str  # of the delta file (the upload verifies it on arrival)
    base: PublishedBase
    guest_sha256: str  # of the current build: what the host's rebuilt image must read as


def _qemu_img(*args: str) -> None:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise DeltaError("qemu-img is not installed (invoke doctor lists it)")
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise DeltaError(f"qemu-img {args[0]} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")


def _temporary(where: Path, prefix: str, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=where)
    os.close(fd)
    return Path(name)


def guest_sha256(path: Path, fmt: str) -> str:
    """The sha256 of the disk as the guest reads it. qemu-img cannot write raw to a pipe (it resizes its target),
    so the raw image goes to a sparse temporary file beside ``path`` and is hashed from there."""
    tmp = _temporary(path.parent, f".{path.name}.", ".guestview")
    try:
        _qemu_img("convert", "-q", "-f", fmt, "-O", "raw", str(path), str(tmp))
        return manifest_mod.sha256_file(tmp)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_guest_sha256(build_dir: BuildDir, m: Manifest, path: Path) -> str:
    """The manifest's guest digest, computed once and recorded (manifests of older builds lack it)."""
    if not m.guest_sha256:
        m.guest_sha256 = guest_sha256(path, m.artifact.format)
        # under the image's lock: an image test recording its result, or a build, may write the manifest too
        with image_lock(build_dir, EventSink()):
            current = build_dir.load()
            if current is not None and current.artifact.sha256 == m.artifact.sha256:  # not rebuilt meanwhile
                current.guest_sha256 = m.guest_sha256
                build_dir.save(current)
    return m.guest_sha256


def base_dir(build_dir: BuildDir) -> Path:
    """builds/<image>/published/: the artifact last published, its record, and the delta against it."""
    return build_dir.published


def published_base(build_dir: BuildDir) -> PublishedBase | None:
    """The kept base, or None when there is none or it is not what its record says (a half-copied or changed
    file is never used: it is checked against its sha256, cheaply once stamped)."""
    record = base_dir(build_dir) / BASE_RECORD_NAME
    try:
        base = PublishedBase(**json.loads(record.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    if not manifest_mod.has_sha256(base_dir(build_dir) / base.file, base.sha256):
        return None
    return base


@contextlib.contextmanager
def _locked(build_dir: BuildDir) -> Iterator[Path]:
    """builds/<image>/published/, held by this process: two publishes at once make or replace one base and one
    delta in turn (the second finds the first's)."""
    where = base_dir(build_dir)
    where.mkdir(parents=True, exist_ok=True)
    with (where / LOCK_NAME).open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield where


def keep_published(build_dir: BuildDir, m: Manifest, path: Path) -> PublishedBase:
    """Keep a copy of the artifact just published as the next delta's base (its record written last, so a crash
    leaves the old base or the new one), and drop the old base and its deltas."""
    with _locked(build_dir) as where:
        return _keep(build_dir, where, m, path)


def _keep(build_dir: BuildDir, where: Path, m: Manifest, path: Path) -> PublishedBase:
    known = published_base(build_dir)
    if known is not None and known.sha256 == m.artifact.sha256:
        return known
    name = f"base-{m.build_id}.{m.artifact.format}"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=where)
    os.close(fd)
    try:
        # A copy, never a link: the next build may rewrite the artifact in place; --reflink shares the blocks
        # where the filesystem can.
        subprocess.run(["cp", "--reflink=auto", "--", str(path), tmp], check=True, capture_output=True)
        if not manifest_mod.has_sha256(Path(tmp), m.artifact.sha256):  # the artifact was rebuilt meanwhile
            raise DeltaError(f"{path} no longer has the published build's sha256")
        os.replace(tmp, where / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    base = PublishedBase(m.build_id, m.artifact.sha256, m.guest_sha256, m.artifact.virtual_size,
                         m.artifact.format, name)
    write_atomic(where / BASE_RECORD_NAME, json.dumps(asdict(base), indent=2, sort_keys=True) + "\n")
    for old in where.iterdir():
        if old.name not in (name, BASE_RECORD_NAME) and not old.name.startswith("."):
            old.unlink(missing_ok=True)
    return base


def make_delta(build_dir: BuildDir, m: Manifest, path: Path) -> Delta | None:
    """The delta of the current build against the kept base, or None when there is none (none kept, or the same
    build); DeltaError when the two disks differ in format or virtual size. Made once per pair of builds and
    reused by a re-run."""
    with _locked(build_dir) as where:
        return _make(build_dir, where, m, path)


def _make(build_dir: BuildDir, where: Path, m: Manifest, path: Path) -> Delta | None:
    base = published_base(build_dir)
    if base is None or base.sha256 == m.artifact.sha256:
        return None
    if (base.format, base.virtual_size) != ("qcow2", m.artifact.virtual_size) or m.artifact.format != "qcow2":
        raise DeltaError(f"the kept base (build {base.build_id}) is a {base.format} of {base.virtual_size} bytes, "
                         f"this build a {m.artifact.format} of {m.artifact.virtual_size}: a delta needs two qcow2 "
                         "disks of one size")
    guest = ensure_guest_sha256(build_dir, m, path)
    out = where / f"delta-{base.build_id}-{m.build_id}.qcow2"
    record = out.with_suffix(".sha256")
    with contextlib.suppress(OSError, ValueError):
        sha = record.read_text(encoding="utf-8").strip()
        if manifest_mod.has_sha256(out, sha):
            return Delta(out, out.stat().st_size, sha, base, guest)
    overlay, packed = (_temporary(where, f".{out.name}.", suffix) for suffix in (".overlay", ".qcow2"))
    kept = str((where / base.file).resolve())
    try:
        _qemu_img("create", "-q", "-f", "qcow2", "-F", m.artifact.format, "-b", str(path.resolve()), str(overlay))
        _qemu_img("rebase", "-q", "-f", "qcow2", "-F", base.format, "-b", kept, str(overlay))
        # The changed clusters compressed (zstd, as the build compresses; read by every PVE since 7.0): convert
        # with -B copies only what the chain holds above the base, i.e. the overlay's clusters.
        _qemu_img("convert", "-q", "-c", "-o", "compression_type=zstd", "-f", "qcow2", "-O", "qcow2",
                  "-B", kept, "-F", base.format, str(overlay), str(packed))
        sha = manifest_mod.sha256_file(packed)
        os.replace(packed, out)
    finally:
        overlay.unlink(missing_ok=True)
        packed.unlink(missing_ok=True)
    write_atomic(record, sha + "\n")
    return Delta(out, out.stat().st_size, sha, base, guest)
