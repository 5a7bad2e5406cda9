"""Where things are: the site, the factory's own data, inventory, catalogue, builds and lab directories.

Defaults live in invoke.yaml (section ``factory``); environment (INVOKE_FACTORY_*) and
command-line flags override them. Relative paths are relative to the site directory: the checkout when
run from one, else ``factory.site_dir`` (INVOKE_FACTORY_SITE_DIR), else the current directory. The
factory's own data (packer/ and kickstart/ templates, ansible/ playbooks and roles, the pinned keys,
tests/image) come from the site when it holds its own templates, else from the installed package.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
# A wheel carries the data directories under image_factory/data (pyproject.toml's package-dir map).
PACKAGE_DATA = Path(__file__).resolve().parent / "data"
# What marks a directory as holding the factory's own templates, roles and keys.
_DATA_MARKER = Path("packer/image.pkr.hcl.j2")


def _is_data_dir(d: Path) -> bool:
    return (d / _DATA_MARKER).is_file()


def installed_data() -> Path:
    """The checkout this module runs from, else the data installed with the package."""
    return REPO_ROOT if _is_data_dir(REPO_ROOT) else PACKAGE_DATA


def default_site() -> Path:
    """The checkout (run from one), else the current directory."""
    return REPO_ROOT if _is_data_dir(REPO_ROOT) and (REPO_ROOT / "pyproject.toml").is_file() else Path.cwd()


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
    "site_dir": None,  # see the module docstring
    # Where Fedora lists its media (unsigned: used to find files, never trusted for their checksums).
    "fedora_releases_url": "https://fedoraproject.org/releases.json",
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
    fedora_releases_url: str = str(DEFAULTS["fedora_releases_url"])
    data: Path = REPO_ROOT  # packer/, kickstart/, ansible/, tests/image: the site's own, else the installed ones

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None = None, root: Path | None = None) -> Settings:
        merged = {**DEFAULTS, **{k: v for k, v in (values or {}).items() if v is not None}}
        if root is None:
            root = Path(str(merged["site_dir"])).expanduser().resolve() if merged["site_dir"] else default_site()

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
            fedora_releases_url=str(merged["fedora_releases_url"]),
            data=root if _is_data_dir(root) else installed_data(),
        )

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> Settings:
        """What a task would see without invoke around it (the factory_vm Ansible module): the defaults, then
        INVOKE_FACTORY_<KEY> as invoke reads them."""
        env = os.environ if environ is None else environ
        return cls.from_mapping({key: env.get(f"INVOKE_FACTORY_{key.upper()}") or None for key in DEFAULTS})

    def resolve(self, p: str | Path) -> Path:
        """A path from the catalogue or the inventory: absolute, ~-expanded, else site-relative, where the
        site has it, else in the factory's data (a catalogue names ansible/playbooks/template.yml and
        packer/keys/... whether or not the site keeps its own copy)."""
        q = Path(str(p)).expanduser()
        return q if q.is_absolute() else self.base_for(q) / q

    def base_for(self, rel: str | Path) -> Path:
        """The site directory if it has ``rel`` (or the data has not), else the factory's data directory."""
        return self.root if (self.root / rel).exists() or not (self.data / rel).exists() else self.data
