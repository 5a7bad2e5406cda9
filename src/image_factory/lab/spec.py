"""What a lab node's server process needs (the controller writes it as hosts/<name>/pve.json).

Kept apart from image_factory.lab.pve so the controller (and the invoke tasks) import without fakepve.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

THIN_STORAGE = "local-lvm"  # every lab node also has a default install's LVM-thin pool


@dataclass(frozen=True)
class PveRelease:
    """The package versions a Proxmox VE node ran together (each package's debian/changelog dates): what
    ``/version`` reports is pve-manager's; VM behaviour belongs to qemu-server, storage to pve-storage, the
    parsing of property strings to pve-common (libpve-common-perl)."""

    manager: str
    qemu_server: str
    storage: str
    common: str


# pve-manager version -> what shipped with it (docs/pve-facts.md, "Versions")
RELEASES: dict[str, PveRelease] = {
    "8.4.1": PveRelease("8.4.1", "8.3.12", "8.3.6", "8.3.1"),
    "9.1.19": PveRelease("9.1.19", "9.1.15", "9.1.5", "9.1.12"),  # 2026-05-20
    "9.2.5": PveRelease("9.2.5", "9.2.0", "9.1.6", "9.1.17"),  # 2026-07-15
}


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def release_of(manager: str) -> PveRelease:
    """The release a pve-manager version belongs to: exact, else the newest listed one of its major.minor
    that is not newer, else (an older or unlisted series, as some tests pose) every package at that version."""
    if manager in RELEASES:
        return RELEASES[manager]
    want = version_tuple(manager)
    same = [r for v, r in RELEASES.items() if version_tuple(v)[:2] == want[:2] and version_tuple(v) <= want]
    if same:
        return max(same, key=lambda r: version_tuple(r.manager))
    return PveRelease(manager, manager, manager, manager)


@dataclass
class NodeSpec:
    """Everything a lab node's server process needs (written by the controller as pve.json)."""

    name: str
    node: str
    address: str
    port: int
    cert: Path
    key: Path
    version: str
    token_id: str
    token_secret_file: Path
    root_password_file: Path
    privileges: dict[str, list[str]]
    storage_dir: Path
    staging_dir: Path
    vms_dir: Path
    log_dir: Path
    control_socket: Path
    slot: int
    time_scale: float = 1.0
    durations: bool = False
    real_boot: str | list[str] = "all"
    vm_memory_cap: int = 768
    extra: dict[str, Any] = field(default_factory=dict)
    thin_dir: Path | None = None  # the LVM-thin pool's volumes as files; default <storage_dir>/../thin

    @property
    def thin_pool_dir(self) -> Path:
        return self.thin_dir or self.storage_dir.parent / "thin"

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> NodeSpec:
        values = dict(data)
        for key in ("cert", "key", "token_secret_file", "root_password_file", "storage_dir", "staging_dir",
                    "vms_dir", "log_dir", "control_socket"):
            values[key] = Path(values[key])
        if values.get("thin_dir"):
            values["thin_dir"] = Path(values["thin_dir"])
        return cls(**values)

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            out[key] = str(value) if isinstance(value, Path) else value
        return out
