"""The example site (ansible/inventory: hosts.yml, group_vars/, host_vars/) as one YAML document, for tests that
mutate one value and write a single-file inventory. Merged here by hand, independently of the reader under test:
each group's group_vars/<group>.yml into its vars, each host's host_vars/<host>.yml into its entry."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from image_factory.settings import REPO_ROOT

EXAMPLE_DIR = REPO_ROOT / "ansible/inventory"


def _vars_file(directory: Path, name: str) -> dict[str, Any]:
    path = directory / f"{name}.yml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def flat_example() -> dict[str, Any]:
    doc = yaml.safe_load((EXAMPLE_DIR / "hosts.yml").read_text())
    for group, body in doc["all"]["children"].items():
        group_vars = {**(body.get("vars") or {}), **_vars_file(EXAMPLE_DIR / "group_vars", group)}
        if group_vars:
            body["vars"] = group_vars
        for host, host_vars in (body.get("hosts") or {}).items():
            body["hosts"][host] = {**(host_vars or {}), **_vars_file(EXAMPLE_DIR / "host_vars", host)}
    return doc


def copy_example(into: Path) -> Path:
    """A copy of the example site's directory (host_vars/ and group_vars/ beside hosts.yml) under ``into``: its
    hosts.yml."""
    shutil.copytree(EXAMPLE_DIR, into / "inventory")
    return into / "inventory" / "hosts.yml"


def edit(path: Path, old: str, new: str) -> Path:
    """Replace the one occurrence of ``old`` in the file (a test's edit that must hit exactly one place)."""
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return path
