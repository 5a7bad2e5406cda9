"""Helpers for tests of the site model: the example site and catalogue written as files, one value changed,
and the problems loading them reports."""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from image_factory.errors import ValidationFailed
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import load_site

from .example_site import flat_example

CATALOGUE = REPO_ROOT / "packer/images.yml"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation must never open a connection: any attempt fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network connection attempted during validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def site_files(
    tmp_path: Path, inv: dict[str, Any] | None = None, cat: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    inv_dir = tmp_path / "inventory"
    inv_dir.mkdir(exist_ok=True)
    inv_file = inv_dir / "hosts.yml"
    inv_file.write_text(yaml.safe_dump(inv if inv is not None else example_inventory(), sort_keys=False))
    cat_file = tmp_path / "images.yml"
    cat_file.write_text(yaml.safe_dump(cat if cat is not None else example_catalogue(), sort_keys=False))
    return inv_dir, cat_file


def example_inventory() -> dict[str, Any]:
    return flat_example()


def example_catalogue() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(CATALOGUE.read_text()))


def group(inv: dict[str, Any], name: str) -> dict[str, Any]:
    return inv["all"]["children"][name]["hosts"]


def problems_of(tmp_path: Path, inv: dict[str, Any] | None = None, cat: dict[str, Any] | None = None) -> list[Any]:
    inv_dir, cat_file = site_files(tmp_path, inv, cat)
    with pytest.raises(ValidationFailed) as err:
        load_site(inv_dir, cat_file)
    return err.value.problems


def only(problems: list[Any], entry: str, key: str) -> Any:
    hits = [p for p in problems if entry in p.entry and p.key == key]
    assert hits, f"no problem for {entry}/{key} in {[str(p) for p in problems]}"
    return hits[0]
