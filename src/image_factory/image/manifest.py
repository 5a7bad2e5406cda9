"""The build manifest: what an artifact is, how it was made and whether it passed its tests.

builds/<image>/manifest.json is written by the build stage, extended by the image-test stage and
read by publish (which refuses an artifact whose manifest has no passing test for its sha256).
Writes are atomic (temp file + rename) so a crash never leaves a half-written manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from image_factory.errors import FactoryError
from image_factory.files import write_atomic
from image_factory.platform import Platform
from image_factory.site.inventory import Image

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
HASH_CHUNK = 4 * 1024 * 1024


class ManifestError(FactoryError):
    pass


@dataclass
class Artifact:
    path: str
    format: str
    virtual_size: int
    disk_size: int
    sha256: str


@dataclass
class ImageTestResult:
    status: str  # "passed" | "failed" | "skipped"
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    suites: list[str] = field(default_factory=list)
    suite_hash: str = ""
    artifact_sha256: str = ""
    junit: str = ""
    finished_at: str = ""
    failures: list[str] = field(default_factory=list)

    def passes_for(self, sha256: str) -> bool:
        return self.status == "passed" and self.failed == 0 and self.errors == 0 and self.artifact_sha256 == sha256


@dataclass
class Manifest:
    image: str
    family: str
    release: int
    mode: str
    build_id: str
    artifact: Artifact
    fingerprint: str
    inputs: dict[str, str]
    tools: dict[str, str]
    git: dict[str, Any]
    started_at: str
    finished_at: str
    accelerator: str = ""
    ansible_strategy: str = ""
    skip_tests: bool = False
    image_test: ImageTestResult | None = None
    # What is inside (contents.py): packages_digest, packages, kernel, os; read by the image test.
    contents: dict[str, Any] | None = None
    firmware: str = "bios"  # bios | uefi: how the template must boot (publish: bios=ovmf and an EFI disk)
    secure_boot: bool = False  # uefi only: the template's EFI vars enforce Secure Boot
    secure_boot_keys: str | None = None  # the catalogue's keys: (microsoft-2023, microsoft-2011+2023, ...)
    tpm: bool = False  # a vTPM 2.0 (publish: tpmstate0)
    machine: str = "pc"  # pc (i440fx) | q35
    recipe: str = ""  # digest of the build's own inputs (files, catalogue entry, source): not upstream's state
    # The medium built from: url and checksum as the catalogue pins them, or as resolved at build time for an
    # entry with checksum: refresh (url, sha256, the signed CHECKSUM's URL and key).
    source: dict[str, str] = field(default_factory=dict)
    # The certificates the build's variable store enrolled (variable, subject, sha256, not_after): auditable.
    secure_boot_enrolled: list[dict[str, str]] = field(default_factory=list)
    schema: int = SCHEMA_VERSION

    @property
    def machine_type(self) -> str:
        """The machine the template boots on: a UEFI build is always q35 (the catalogue refuses uefi on pc), and
        one made before the machine was recorded carries the field's default "pc"."""
        return "q35" if self.firmware == "uefi" else self.machine

    @property
    def platform(self) -> Platform:
        return Platform(self.firmware, self.secure_boot, self.secure_boot_keys, self.tpm, self.machine_type,
                        self.family)

    @property
    def digest(self) -> str:
        """Stable digest of the build identity (not of test results), for template descriptions."""
        core = {"image": self.image, "sha256": self.artifact.sha256, "fingerprint": self.fingerprint}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()

    @property
    def content_digest(self) -> str:
        """What the template is, whatever build made it: the recipe plus the installed package set ("" until
        the image test has read the packages). Two builds with the same content digest are interchangeable."""
        packages = (self.contents or {}).get("packages_digest", "")
        if not (self.recipe and packages):
            return ""
        return hashlib.sha256(f"{self.recipe}\n{packages}".encode()).hexdigest()

    def tested_ok(self) -> bool:
        return self.image_test is not None and self.image_test.passes_for(self.artifact.sha256)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        try:
            if data.get("schema") != SCHEMA_VERSION:
                raise ManifestError(f"{where}: unsupported manifest schema {data.get('schema')!r}")
            data = dict(data)
            data["artifact"] = Artifact(**data["artifact"])
            if data.get("image_test") is not None:
                data["image_test"] = ImageTestResult(**data["image_test"])
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{where}: malformed manifest ({exc}); rebuild with --force") from None


@dataclass(frozen=True)
class Made:
    """How a build made its artifact: the manifest's provenance, as the build stage knows it at the end."""

    fingerprint: str
    inputs: dict[str, str]
    recipe: str  # the inputs without upstream's state (build.recipe_digest)
    tools: dict[str, str]
    git: dict[str, Any]
    started_at: str
    finished_at: str
    accelerator: str
    ansible_strategy: str
    source: dict[str, str]
    secure_boot_enrolled: list[dict[str, str]]


def assemble(image: Image, artifact: Artifact, made: Made) -> Manifest:
    """A new build's manifest: the catalogue entry's identity and platform, the artifact, and how it was made.
    The build id is the artifact's sha256 prefix: the same bytes, the same build."""
    return Manifest(
        image=image.name, family=image.family, release=image.release, mode=image.mode,
        build_id=artifact.sha256[:12], artifact=artifact, firmware=image.firmware, secure_boot=image.secure_boot,
        secure_boot_keys=image.keys, tpm=image.tpm, machine=image.machine_type,
        **{f.name: getattr(made, f.name) for f in fields(made)},
    )


def manifest_path(build_dir: Path) -> Path:
    return build_dir / MANIFEST_NAME


def load(build_dir: Path) -> Manifest | None:
    path = manifest_path(build_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc}); rebuild with --force") from None
    return Manifest.from_dict(data, str(path))


def require(build_dir: Path) -> Manifest:
    m = load(build_dir)
    if m is None:
        raise ManifestError(f"{manifest_path(build_dir)} does not exist: build the image first")
    return m


def save(build_dir: Path, manifest: Manifest) -> Path:
    build_dir.mkdir(parents=True, exist_ok=True)
    path = manifest_path(build_dir)
    write_atomic(path, json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def record_test_result(build_dir: Path, result: ImageTestResult, contents: dict[str, Any] | None = None) -> Manifest:
    """The result into the manifest of the artifact it tested; the caller holds the image's lock, so no build
    replaces the manifest between this read and write. A result of an artifact rebuilt meanwhile is refused: it
    would mark the new artifact as tested."""
    m = require(build_dir)
    if m.artifact.sha256 != result.artifact_sha256:
        raise ManifestError(f"{manifest_path(build_dir)}: the artifact was rebuilt while the image test ran "
                            f"(tested {result.artifact_sha256[:12]}…, now {m.artifact.sha256[:12]}…): the result "
                            "was not recorded; test the new artifact")
    m.image_test = result
    if contents is not None:
        m.contents = contents
    save(build_dir, m)
    return m


STAMP_SETTLE_NS = 2_000_000_000  # a file changed this recently may change again within the clock's tick


def _stat_key(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "dev": st.st_dev}


def has_sha256(path: Path, sha256: str) -> bool:
    """Whether ``path`` holds content with this sha256, hashing it only when it changed since it last matched.

    A match is remembered in ``.<name>.sha256-stamp`` beside the file with the file's size, inode and change
    times; any write, truncation, chmod or replacement changes its ctime, which no user tool can set back,
    so an unchanged stamp means unchanged content (git's index relies on the same). The no-op night
    re-reads nothing: a 400 MB artifact cost 0.28 s to hash on every cache check (bench/build).
    """
    stamp = path.with_name(f".{path.name}.sha256-stamp")
    try:
        st = path.stat()
    except OSError:
        return False
    try:
        known = json.loads(stamp.read_text())
        if known == {**_stat_key(st), "sha256": sha256}:
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != sha256:
        return False
    after = path.stat()
    if _stat_key(after) == _stat_key(st) and time.time_ns() - st.st_ctime_ns > STAMP_SETTLE_NS:
        with contextlib.suppress(OSError):  # a read-only build dir only costs the next check a hash
            write_atomic(stamp, json.dumps({**_stat_key(st), "sha256": sha256}) + "\n", mode=0o644)
    return True


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
