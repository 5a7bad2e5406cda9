"""What the end-to-end modules share: the build settings, and the Secure Boot + vTPM fixture built and
image-tested once per session (its build test checks the build, test_secure_boot_e2e deploys it).

Both tests that use ``uefi_fixture`` run in one work unit of a parallel run (``SHARED_UNITS`` in
tests/conftest.py), so a session builds and boots it once.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pytest

from image_factory.image import build, imagetest
from image_factory.image.manifest import ImageTestResult, Manifest
from image_factory.settings import Settings
from image_factory.site.inventory import Image, load_site

UEFI_FIXTURE = "debian-lab-uefi"


@pytest.fixture(scope="session")
def settings() -> Settings:
    for tool in ("packer", "qemu-system-x86_64", "qemu-img", "xorriso"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run ./dev setup")
    try:
        from image_factory.lab.baseimage import ensure_base_image
    except ImportError:
        pytest.skip("image_factory.lab.baseimage does not exist yet: no offline base image to build from")
    s = Settings.from_mapping({"accelerator": "auto"})
    ensure_base_image(s)
    return s


@dataclass(frozen=True)
class BuiltImage:
    """A catalogue image built (or found in the build cache) and image-tested in this session."""

    image: Image
    outcome: build.BuildOutcome
    result: ImageTestResult

    @property
    def manifest(self) -> Manifest:
        assert self.outcome.manifest is not None
        return self.outcome.manifest

    @property
    def outcomes(self) -> dict[str, str]:
        """Each check of its image test and how it ended ('test_firmware::test_x[host]': 'passed'), from the
        test's summary."""
        summary = json.loads((self.outcome.build_dir / imagetest.SUMMARY_NAME).read_text())
        return dict(summary["outcomes"])


@pytest.fixture(scope="session")
def uefi_fixture(settings: Settings) -> BuiltImage:
    """debian-lab-uefi (UEFI, Secure Boot on Microsoft's 2011 and 2023 CAs, a TPM 2.0) built into the
    repository's builds/ (a cache hit when its inputs have not changed) and its image test run: one build and
    one test boot, whichever test asks first."""
    image = load_site(settings.inventory, settings.images).images[UEFI_FIXTURE]
    outcome = build.build_image(settings, image)
    assert outcome.status in ("built", "cached") and outcome.manifest is not None, outcome
    result = imagetest.test_image(settings, image, outcome.build_dir)
    return BuiltImage(image, outcome, result)
