"""What made a build, for its manifest: the tools' versions and the checkout's commit."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from pathlib import Path

from image_factory.image import render
from image_factory.image.packerrun import cached_packer_version
from image_factory.settings import Settings


def tool_versions(settings: Settings, *, mitogen: bool) -> dict[str, str]:
    """packer, QEMU, qemu-img, Ansible (and mitogen when the build ran under it)."""
    return {
        "packer": ".".join(map(str, cached_packer_version(settings))),
        "qemu": _version_of(["qemu-system-x86_64", "--version"]),
        "qemu-img": _version_of(["qemu-img", "--version"]),
        "ansible": _version_of([str(render.venv_bin() / "ansible-playbook"), "--version"]),
        **({"mitogen": _mitogen_version()} if mitogen else {}),
    }


def _version_of(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(r"\d+\.\d+(\.\d+)?", out)
    return m.group(0) if m else "unknown"


def _mitogen_version() -> str:
    try:
        return importlib.metadata.version("mitogen")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def git_state(root: Path) -> dict[str, object]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip() != ""
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": "", "dirty": True}
    return {"commit": commit, "dirty": dirty}
