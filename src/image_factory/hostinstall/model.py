"""What the stage works on: a hypervisor's rendered answer and the inputs read for it."""

from __future__ import annotations

from dataclasses import dataclass

# The installer releases whose answer schema the rendered answers are checked against (tests/data).
SUPPORTED_INSTALLERS = ("8.4", "9.1")
FIRST_BOOT_ORDERING = "fully-up"  # after multi-user.target: pve-cluster has written the API certificate


@dataclass(frozen=True)
class AnswerSecrets:
    """Inputs read from outside the repository at render time."""

    root_password_hash: str
    root_ssh_keys: tuple[str, ...]


@dataclass(frozen=True)
class RenderedAnswer:
    hypervisor: str
    macs: tuple[str, ...]
    toml: str


