"""Sizes as Proxmox VE and the catalogue write them (``10G``, ``2252M``, bytes)."""

from __future__ import annotations

import re

SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(value: object) -> int:
    """A PVE size (``10G``, ``2252M``, ``512K``, bytes; the ``size=`` of a drive, a catalogue disk_size) in bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a PVE size: {value!r}")
    return int(float(m[1]) * SIZE_UNITS[m[2].upper()])


def format_size(size: int) -> str:
    """Bytes as PVE writes a size: the largest unit that divides it (``2G``, ``2252M``), else bytes."""
    for unit in ("T", "G", "M", "K"):
        if size and size % SIZE_UNITS[unit] == 0:
            return f"{size // SIZE_UNITS[unit]}{unit}"
    return str(size)
