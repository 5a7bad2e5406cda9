"""Fixtures of the preflight unit tests: a prepared fakepve node and the site that points at it."""

from __future__ import annotations

import pytest

from .node import GRANTS, SECRET, TOKEN, grant, unit_site


@pytest.fixture
def node(fakepve):
    """A fakepve shaped like a prepared PVE 8.4 node (the state hypervisor.yml leaves)."""
    fakepve.version, fakepve.release_version = "8.4.1", "8.4"
    fakepve.apitokens[TOKEN] = SECRET
    grant(fakepve, GRANTS)
    fakepve.storages["local"]["content"] = "iso,vztmpl,backup,import"
    fakepve.add_vm(9001, "tpl-fedora-44-x", node="pve1", template=True, config={"tags": "image-factory;fedora"})
    fakepve.add_vm(500, "unrelated", node="pve1")  # outside both ranges: none of the factory's business
    return fakepve


@pytest.fixture
def env(node, fakepve_cafile, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLIGHT_UNIT_SECRET", SECRET)
    return unit_site(tmp_path, node.url, ca=fakepve_cafile)

