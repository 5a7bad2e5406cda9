"""UEFI firmware for builds and image tests: OVMF from the distribution's package, as QEMU needs it.

An ``iso``-mode image may say ``firmware: uefi``: Packer's QEMU then boots q35 with OVMF's code
read-only and a per-build copy of its variable store (the installer writes its boot entry there),
the image test boots the artifact the same way, and publish gives the template ``bios: ovmf``, q35
and an EFI disk.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import FactoryError
from .tools import OVMF_LOCATIONS, provided_by

VARS_NAME = "efivars.fd"


class FirmwareError(FactoryError):
    pass


def locate_ovmf(locations: tuple[tuple[str, str], ...] = OVMF_LOCATIONS) -> tuple[Path, Path]:
    for code, variables in locations:
        if Path(code).is_file() and Path(variables).is_file():
            return Path(code), Path(variables)
    raise FirmwareError(f"firmware: uefi needs OVMF ({provided_by('ovmf')}); looked for "
                        + ", ".join(code for code, _ in locations))


def private_vars(work_dir: Path, template: Path) -> Path:
    """A writable copy of the variable store for one VM: the installer's boot entry lands there."""
    work_dir.mkdir(parents=True, exist_ok=True)
    target = work_dir / VARS_NAME
    shutil.copyfile(template, target)
    target.chmod(0o600)
    return target


def qemu_args(code: Path, variables: Path) -> list[str]:
    """pflash drives for a q35 machine (the caller sets ``-machine q35``)."""
    return ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={variables}"]
