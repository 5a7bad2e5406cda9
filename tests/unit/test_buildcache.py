"""The build cache's decision (image/buildcache.py) on a manifest and an artifact.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from image_factory.image import buildcache
from image_factory.image.manifest import save, sha256_file
from image_factory.lab import factories

pytestmark = pytest.mark.unit


def test_manifest_round_trip_through_cache_status(tmp_path: Path) -> None:
    art = tmp_path / "x.qcow2"
    art.write_bytes(b"data")
    m = factories.manifest("x", path="x.qcow2", sha256=sha256_file(art), disk_size=4, fingerprint="f1")
    save(tmp_path, m)
    assert buildcache.cache_status(tmp_path, "f1")[0] is not None
    assert buildcache.cache_status(tmp_path, "f2") == (None, "inputs changed")
    art.write_bytes(b"datb")
    assert "sha256" in buildcache.cache_status(tmp_path, "f1")[1]
    assert stat.S_ISREG((tmp_path / "manifest.json").stat().st_mode)
    assert json.loads((tmp_path / "manifest.json").read_text())["fingerprint"] == "f1"


def test_a_build_older_than_max_age_is_rebuilt(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    art = tmp_path / "x.qcow2"
    art.write_bytes(b"data")
    m = factories.manifest("x", build_id="abc", path="x.qcow2", sha256=sha256_file(art), disk_size=4, fingerprint="f1",
                           release=13,
                           finished_at="2026-11-20T02:00:00Z")
    save(tmp_path, m)
    six_days, eight_days = datetime(2026, 11, 26, 2, 0, tzinfo=UTC), datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
    assert buildcache.cache_status(tmp_path, "f1", max_age_days=7, now=six_days)[0] is not None
    hit, why = buildcache.cache_status(tmp_path, "f1", max_age_days=7, now=eight_days)
    assert hit is None and why == "build abc is 8.0 days old (max_age_days 7): rebuilt for current updates"
    assert buildcache.cache_status(tmp_path, "f1", now=eight_days)[0] is not None  # an image without updates
