"""Where things are: repository root, inventory, catalogue, builds and lab directories.

Defaults live in invoke.yaml (section ``factory``); environment (INVOKE_FACTORY_*) and
command-line flags override them. Relative paths are relative to the repository root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def _user_cache() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "deevnet-image-factory")


DEFAULTS: dict[str, Any] = {
    "inventory": "ansible/inventory",
    "images": "packer/images.yml",
    "builds_dir": "builds",
    "lab_dir": ".lab",
    "accelerator": "auto",
    "ansible_strategy": "auto",
    # Downloads shared by every clone on this machine (the base image's .deb files), like pip's cache.
    "cache_dir": None,
}


@dataclass(frozen=True)
class Settings:
    root: Path
    inventory: Path
    images: Path
    builds_dir: Path
    lab_dir: Path
    accelerator: str
    ansible_strategy: str = "auto"
    cache_dir: Path = Path(_user_cache()).expanduser()

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None = None, root: Path = REPO_ROOT) -> Settings:
        merged = {**DEFAULTS, **{k: v for k, v in (values or {}).items() if v is not None}}

        def path(key: str) -> Path:
            p = Path(str(merged[key])).expanduser()
            return p if p.is_absolute() else root / p

        return cls(
            root=root,
            inventory=path("inventory"),
            images=path("images"),
            builds_dir=path("builds_dir"),
            lab_dir=path("lab_dir"),
            accelerator=str(merged["accelerator"]),
            ansible_strategy=str(merged["ansible_strategy"]),
            cache_dir=Path(str(merged["cache_dir"] or _user_cache())).expanduser(),
        )

    def resolve(self, p: str | Path) -> Path:
        """A path from the catalogue or the inventory: absolute, ~-expanded, else repo-relative."""
        q = Path(str(p)).expanduser()
        return q if q.is_absolute() else self.root / q
