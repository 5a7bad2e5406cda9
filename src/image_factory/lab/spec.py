"""What a lab node's server process needs (the controller writes it as hosts/<name>/pve.json).

Kept apart from image_factory.lab.pve so the controller (and the invoke tasks) import without fakepve.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

THIN_STORAGE = "local-lvm"  # every lab node also has a default install's LVM-thin pool


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
