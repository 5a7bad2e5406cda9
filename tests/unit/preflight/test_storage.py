"""The storage check (the space check needs sshd: tests/lab/preflight/test_storage.py) and the largest artifact."""

from __future__ import annotations

import pytest

from image_factory import preflight as pf
from image_factory.image.manifest import save
from image_factory.lab import factories

from .node import API_CHECKS, writes

pytestmark = pytest.mark.unit


def test_import_content_disabled(node, env):
    node.storages["local"]["content"] = "iso,vztmpl,backup"
    r = pf.run_preflight(*env, checks=API_CHECKS).result("hv-unit", "storage")
    assert not r.ok
    assert "storage 'local' lacks content type import (has: iso,vztmpl,backup)" in r.detail
    assert r.hint == "pvesm set local --content iso,vztmpl,backup,import"
    assert writes(node) == []


def test_missing_storage(node, env):
    del node.storages["local-lvm"]
    r = pf.run_preflight(*env, checks=["storage"]).result("hv-unit", "storage")
    assert "storage 'local-lvm' not found on node pve1" in r.detail


def test_largest_artifact_prefers_manifests_over_catalogue(env):
    settings, site = env
    need = pf.largest_artifact(settings, site)
    assert need.bytes == 2 * 1024**3 and "no build yet" in need.source
    m = factories.manifest("tiny", virtual_size=2 * 1024**3, disk_size=123456789)
    save(settings.builds_dir / "tiny", m)
    need = pf.largest_artifact(settings, site)
    assert need.bytes == 123456789 and "build b1" in need.source

