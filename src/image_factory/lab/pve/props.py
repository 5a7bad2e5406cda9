"""The lab's own reading and writing of PVE's property strings, sizes and tag lists.

Written from PVE's rules (PVE::JSONSchema's property strings, PVE::Tools::split_list, the ``size=`` of a drive),
not imported from the product's ``image_factory.pve.codec``: the lab is the oracle the product's codec is tested
against, so a codec bug must show up as a disagreement with the lab, never be agreed with by it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", re.IGNORECASE)
_LIST_SEPARATORS = re.compile(r"[;,\s]+")


@dataclass(frozen=True)
class PropertyFormat:
    """The keys of one of PVE's property-string formats (a JSONSchema ``format`` hash): its default key (the one
    whose value may stand bare), ``aliases`` (a key read as another, e.g. a drive's ``volume`` as ``file``) and
    ``key_aliases`` (a key whose own name is the value of another, e.g. net's ``virtio=<mac>``: model=virtio,
    macaddr=<mac>) and ``booleans`` (keys of type boolean, whose values parse_boolean reads)."""

    keys: frozenset[str]
    default_key: str | None = None
    aliases: Mapping[str, str] = field(default_factory=dict)
    key_aliases: Mapping[str, str] = field(default_factory=dict)
    booleans: frozenset[str] = frozenset()

    def knows(self, key: str) -> bool:
        return key in self.keys or key in self.aliases


class PropertyStringError(ValueError):
    """What PVE::JSONSchema::parse_property_string dies with (its text, trailing newline included)."""


_KEYED_PART = re.compile(r"([^=]+)=([^\n]+)\n?")


def _perl_true(value: str | None) -> bool:
    return value is not None and value not in ("", "0")


def parse_boolean(text: str) -> str | None:
    """PVE::JSONSchema::parse_boolean: '1' or '0' for its spellings, None for anything else."""
    low = text.lower()
    return "1" if low in ("1", "on", "yes", "true") else "0" if low in ("0", "off", "no", "false") else None


def parse_property_string(text: str, fmt: PropertyFormat, *, alias_conflicts: bool = True,
                          boolean_default: bool = True) -> dict[str, str]:
    """PVE::JSONSchema::parse_property_string, part by part as PVE reads it: ``key=value`` parts and at most one
    bare value (the default key's), in any position; the first fault ends the parse with PVE's own message; a
    boolean's spelling read as 1 or 0. ``alias_conflicts``: pve-common 9.1.9+ refuses a key set both directly
    and through an alias (8.x lets the later part win); ``boolean_default``: 9.0.12+ reads a bare boolean default
    key as a boolean too. Values are not checked here: that is the schema's check_object (fakepve's part)."""
    res: dict[str, str] = {}
    bare_seen = False
    for part in str(text).split(","):
        if not part.strip():
            continue
        keyed = _KEYED_PART.fullmatch(part)
        if keyed:
            key, value = keyed[1], keyed[2]
            if key in res:
                raise PropertyStringError(f"duplicate key in comma-separated list property: {key}\n")
            if key in fmt.aliases:
                if key in fmt.key_aliases:
                    target = fmt.key_aliases[key]
                    if target in res:
                        raise PropertyStringError(f"key alias '{target}' is already defined\n")
                    res[target] = key
                key = fmt.aliases[key]
                if alias_conflicts and key in res:
                    raise PropertyStringError(f"key '{key}' is already defined (via alias)\n")
            if key not in fmt.keys:
                raise PropertyStringError(f"invalid key in comma-separated list property: {key}\n")
            res[key] = (parse_boolean(value) or value) if key in fmt.booleans else value
        elif "=" not in part:
            if bare_seen:
                raise PropertyStringError(f"duplicate key in comma-separated list property: {fmt.default_key}\n")
            if fmt.default_key is None:
                raise PropertyStringError("value without key, but schema does not define a default key\n")
            bare_seen = True
            if _perl_true(res.get(fmt.default_key)):
                raise PropertyStringError(f"duplicate key in comma-separated list property: {fmt.default_key}\n")
            boolean = boolean_default and fmt.default_key in fmt.booleans
            res[fmt.default_key] = (parse_boolean(part) or part) if boolean else part
        else:
            raise PropertyStringError("missing key in comma-separated list property\n")
    return res


def print_property_string(values: Mapping[str, str], fmt: PropertyFormat) -> str:
    """PVE::JSONSchema::print_property_string of a format without key aliases (a drive's): the default key's
    value bare and first, then every other key, sorted (a drive's only required key is its default one)."""
    bare = values.get(fmt.default_key or "")
    first = [bare] if bare is not None else []
    return ",".join(first + [f"{k}={values[k]}" for k in sorted(values) if k != fmt.default_key])


def split_props(text: str, default_key: str | None = None) -> dict[str, str]:
    """``key=value`` parts of a comma-separated property string PVE already accepted (a stored config): a bare
    part is the value of ``default_key`` wherever it stands (PVE takes it in any position and stores cpu, machine
    and agent as given), another bare part a key without a value."""
    props: dict[str, str] = {}
    for part in (part for part in str(text).split(",") if part):
        key, has_value, value = part.partition("=")
        if has_value:
            props[key.strip()] = value.strip()
        elif default_key is not None and not _perl_true(props.get(default_key)):
            props[default_key] = part
        else:
            props[part] = ""
    return props


def parse_size(text: str) -> int:
    """Bytes of a PVE size (``32G``, ``528K``, plain bytes); ValueError for anything else."""
    found = _SIZE.fullmatch(str(text))
    if found is None:
        raise ValueError(f"not a size: {text!r}")
    return int(float(found[1]) * _UNITS[found[2].upper()])


def format_size(size: int) -> str:
    """A size as qemu-server records it in ``size=``: in the largest unit that divides it, else in bytes."""
    for unit in ("T", "G", "M", "K"):
        if size and not size % _UNITS[unit]:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


def split_tags(text: object) -> list[str]:
    """PVE::Tools::split_list of a tags value: items between semicolons, commas or white space."""
    return [tag for tag in _LIST_SEPARATORS.split(str(text or "")) if tag]


def format_tags(text: object) -> str:
    """The tags an update stores under the default tag-style: lowercased, each once, sorted, `;`-separated."""
    return ";".join(sorted({tag.lower() for tag in split_tags(text)}))
