"""An image's build directory, builds/<image>/: one value naming every file the stages hand on.

Build writes the artifact, its manifest and build log; the image test adds its report, the serial console,
the package list, the package diff against the build before and the SBOM; publish reads the manifest and
the artifact. Each of them takes a ``BuildDir`` instead of spelling ``settings.builds_dir / image`` and the
file names again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from image_factory.image import contents, manifest
from image_factory.image.manifest import Manifest
from image_factory.settings import Settings

BUILD_LOG_NAME = "build.log"
LOCK_NAME = ".lock"
SERIAL_NAME = "serial.log"  # the build VM's console of the build that made the artifact
SERIAL_FAILED_NAME = "serial.failed.log"  # ... of the last build that failed
TEST_JUNIT_NAME = "image-test.xml"
TEST_SUMMARY_NAME = "image-test-summary.json"
TEST_OUTPUT_NAME = "image-test.log"
TEST_SERIAL_NAME = "image-test-serial.log"
EFI_VARS_NAME = "efivars.raw"  # a Secure Boot build's enrolled OVMF variable store (raw, as PVE imports it)
PUBLISHED_NAME = "published"  # the artifact last published (the next delta's base) and the delta: image/delta.py


@dataclass(frozen=True)
class BuildDir:
    """builds/<image>/ and the files in it (paths only: nothing here reads or writes, except the manifest's
    own load and save)."""

    path: Path

    @classmethod
    def of(cls, settings: Settings, image: str) -> BuildDir:
        return cls(settings.builds_dir / image)

    @classmethod
    def at(cls, where: BuildDir | Path) -> BuildDir:
        """The caller's value as it is, or a plain path (an old caller's) as a BuildDir."""
        return where if isinstance(where, BuildDir) else cls(Path(where))

    @property
    def image(self) -> str:
        return self.path.name

    @property
    def manifest(self) -> Path:
        return manifest.manifest_path(self.path)

    @property
    def build_log(self) -> Path:
        return self.path / BUILD_LOG_NAME

    @property
    def lock(self) -> Path:
        return self.path / LOCK_NAME

    @property
    def serial_log(self) -> Path:
        return self.path / SERIAL_NAME

    @property
    def serial_failed_log(self) -> Path:
        return self.path / SERIAL_FAILED_NAME

    @property
    def test_junit(self) -> Path:
        return self.path / TEST_JUNIT_NAME

    @property
    def test_summary(self) -> Path:
        return self.path / TEST_SUMMARY_NAME

    @property
    def test_output(self) -> Path:
        return self.path / TEST_OUTPUT_NAME

    @property
    def test_serial(self) -> Path:
        return self.path / TEST_SERIAL_NAME

    @property
    def published(self) -> Path:
        return self.path / PUBLISHED_NAME

    @property
    def packages(self) -> Path:
        return self.path / contents.PACKAGES_NAME

    @property
    def package_diff(self) -> Path:
        return self.path / contents.DIFF_NAME

    @property
    def sbom(self) -> Path:
        return self.path / contents.SBOM_NAME

    def artifact(self, m: Manifest) -> Path:
        """The manifest's artifact: its path is relative to the build directory."""
        return self.path / m.artifact.path

    def efi_vars(self, m: Manifest) -> Path | None:
        """The manifest's enrolled variable store, if the build kept one."""
        return self.path / m.efi_vars if m.efi_vars else None

    def load(self) -> Manifest | None:
        return manifest.load(self.path)

    def require(self) -> Manifest:
        return manifest.require(self.path)

    def save(self, m: Manifest) -> Path:
        return manifest.save(self.path, m)
