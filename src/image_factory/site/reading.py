"""YAML files and pydantic errors, read into Problems that name file, entry and key."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from image_factory.errors import Problem
from image_factory.site.inventory_source import YamlIntForm


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


_DECIMAL = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")


def _construct_int(loader: _UniqueKeyLoader, node: yaml.ScalarNode) -> int:
    value: int = loader.construct_yaml_int(node)
    if _DECIMAL.fullmatch(node.value):
        return value
    written = YamlIntForm(value)
    written.text = node.value
    return written


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
yaml.SafeDumper.add_representer(YamlIntForm, yaml.representer.SafeRepresenter.represent_int)  # dumps as the number


def yaml_file(path: Path, problems: list[Problem]) -> Any:
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        problems.append(Problem(str(path), "", "", "file not found"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        problems.append(Problem(str(path), "", where, f"invalid YAML: {getattr(exc, 'problem', exc)}"))
    return None


def pydantic_problems(file: str, entry: str, prefix: str, exc: ValidationError) -> Iterator[Problem]:
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        yield Problem(file, entry, loc, msg)
