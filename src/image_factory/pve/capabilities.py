"""What a Proxmox VE release can do for a template's platform (qemu-server's efidisk0 options by version)."""

from __future__ import annotations

import re

from image_factory.platform import Platform

MS_2023_MIN_PVE = (9, 1, 19)
# efidisk0 `import-from` an `import` volume (qemu-server create_disks: copied as it is, clone_disk's `qemu-img dd`)
# is in qemu-server 8.3.12 and every 9.x; the `import` content it reads came with PVE 8.4 (pve-storage 8.3.6).
OWN_STORE_MIN_PVE = (8, 4)
KEYS_PVE_CANNOT_MAKE = {
    "distribution-only": "PVE's pre-enrolled key set always holds Microsoft's CAs beside the distribution's",
}


def pve_version_tuple(pve_version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", pve_version)[:3])


def firmware_refusals(ask: Platform, pve_version: str) -> list[str]:
    """Why this host cannot carry the template's firmware as asked ([] if it can): each says what to change."""
    refusals: list[str] = []
    if ask.keys in KEYS_PVE_CANNOT_MAKE and ask.pre_enrolled_keys:
        refusals.append(f"keys: {ask.keys}: {KEYS_PVE_CANNOT_MAKE[ask.keys]} (efidisk0 pre-enrolled-keys=1); "
                        "choose keys: microsoft-2011+2023 for a template PVE makes")
    have = pve_version_tuple(pve_version)
    if ask.own_store and have < OWN_STORE_MIN_PVE:
        refusals.append(f"keys: {ask.keys} needs the build's own EFI variable store imported into efidisk0 from an "
                        f"`import` volume, which PVE {pve_version or '?'} cannot do (no `import` content before "
                        f"pve-storage 8.3.6): upgrade the host to PVE {'.'.join(map(str, OWN_STORE_MIN_PVE))} "
                        "or newer")
    if ask.wants_ms_2023 and have < MS_2023_MIN_PVE:
        refusals.append(f"keys: {ask.keys} needs Microsoft's 2023 UEFI CAs enrolled (efidisk0 ms-cert), which PVE "
                        f"{pve_version or '?'} cannot do (qemu-server before 9.1.13): upgrade the host to PVE "
                        f"{'.'.join(map(str, MS_2023_MIN_PVE))} or newer")
    return refusals
