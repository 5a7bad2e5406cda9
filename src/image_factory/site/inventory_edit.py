"""Round-trip edits of an Ansible YAML inventory: comments, order, quoting and layout kept, and the edit proved on
a copy of the inventory before the file is replaced (mac.generate writes MACs with these)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString

from image_factory.errors import Problem, ValidationFailed


def round_trip_yaml() -> Any:
    """A YAML editor that keeps quotes and never folds a long line."""
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 1 << 16
    return y


# Indentation styles tried in order; the first whose plain round-trip reproduces the file is used.
_STYLES = ((2, 4, 2), (2, 2, 0), (4, 4, 2), (4, 6, 4), (2, 2, 2), (4, 4, 0))


def load_round_trip(path: Path) -> tuple[Any, Any]:
    """Load ``path`` for round-trip editing with the one indentation style that reproduces it exactly."""
    text = path.read_text(encoding="utf-8")
    for mapping, sequence, offset in _STYLES:
        y = round_trip_yaml()
        y.indent(mapping=mapping, sequence=sequence, offset=offset)
        try:
            doc = y.load(text)
        except YAMLError as exc:
            raise ValidationFailed([Problem(str(path), "", "", f"invalid YAML: {exc}")]) from None
        out = io.StringIO()
        y.dump(doc, out)
        if out.getvalue() == text:
            return y, doc
    raise ValidationFailed([Problem(
        str(path), "", "",
        "cannot edit this file without reformatting it (mixed indentation?); "
        "indent mappings consistently (2 spaces, lists '  - ') and retry, or edit the MAC by hand",
    )])


def find_host(node: Any, host: str) -> Any:
    """The host's vars mapping inside an Ansible YAML inventory document, or None."""
    if not isinstance(node, dict):
        return None
    hosts = node.get("hosts")
    if isinstance(hosts, dict) and host in hosts and isinstance(hosts[host], dict) and "vm" in hosts[host]:
        return hosts[host]
    for child in (node.get("children") or {}).values():
        found = find_host(child, host)
        if found is not None:
            return found
    return None


def quoted(value: str, like: Any) -> Any:
    """``value`` as a YAML string in the quoting of the one it replaces (double quotes for a new one)."""
    if isinstance(like, SingleQuotedScalarString):
        return SingleQuotedScalarString(value)
    return DoubleQuotedScalarString(value)


def probe_inventory(inventory: Path, edited: Path, text: str, tmp: Path) -> Path:
    """A copy of ``inventory`` under ``tmp`` (its files, group_vars/ and host_vars/) with ``edited`` holding
    ``text``: what the inventory reads as once the edit is written."""
    root = inventory if inventory.is_dir() else inventory.parent
    parts = [inventory] if inventory.is_dir() else [inventory, root / "group_vars", root / "host_vars"]
    for part in parts:
        if part.is_dir():
            shutil.copytree(part, tmp / part.relative_to(root) if part != root else tmp, dirs_exist_ok=True)
        elif part.is_file():
            shutil.copy2(part, tmp / part.name)
    target = tmp / edited.resolve().relative_to(root.resolve())
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return tmp if inventory.is_dir() else tmp / inventory.name
