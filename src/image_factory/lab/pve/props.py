"""The lab's own reading and writing of PVE's property strings, sizes and tag lists.

Written from PVE's rules (PVE::JSONSchema's property strings, PVE::Tools::split_list, the ``size=`` of a drive),
not imported from the product's ``image_factory.pve.codec``: the lab is the oracle the product's codec is tested
against, so a codec bug must show up as a disagreement with the lab, never be agreed with by it.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", re.IGNORECASE)
_LIST_SEPARATORS = re.compile(r"[;,\s]+")


def split_props(text: str, first_key: str | None = None) -> dict[str, str]:
    """``key=value`` parts of a comma-separated property string; a bare first part is the value of
    ``first_key`` (the format's default key, e.g. a cpu's cputype), a later bare part a key without a value."""
    props: dict[str, str] = {}
    parts = [part for part in str(text).split(",") if part]
    for position, part in enumerate(parts):
        key, has_value, value = part.partition("=")
        if has_value:
            props[key.strip()] = value.strip()
        elif position == 0 and first_key is not None:
            props[first_key] = part
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
