"""Fixtures of the publish unit tests."""

from __future__ import annotations

from typing import Any

import pytest

from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import load_site


@pytest.fixture(scope="module")
def site() -> Any:
    return load_site(REPO_ROOT / "ansible/inventory", REPO_ROOT / "packer/images.yml")
