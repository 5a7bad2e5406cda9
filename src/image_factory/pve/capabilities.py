"""What a Proxmox VE release can do for a template's platform (qemu-server's efidisk0 options by version)."""

from __future__ import annotations

import re

from image_factory.platform import Platform

MS_2023_MIN_PVE = (9, 1, 19)
KEYS_PVE_CANNOT_MAKE = {
    "microsoft-2023": "PVE's pre-enrolled key set always holds Microsoft's expired 2011 CAs beside the 2023 ones",
    "distribution-only": "PVE's pre-enrolled key set always holds Microsoft's CAs beside the distribution's",
}


def firmware_refusals(ask: Platform, pve_version: str) -> list[str]:
    """Why this host cannot carry the template's firmware as asked ([] if it can): each says what to change."""
    refusals: list[str] = []
    if ask.keys in KEYS_PVE_CANNOT_MAKE and ask.pre_enrolled_keys:
        refusals.append(f"keys: {ask.keys}: {KEYS_PVE_CANNOT_MAKE[ask.keys]} (efidisk0 pre-enrolled-keys=1); "
                        "choose keys: microsoft-2011+2023 for a template PVE makes")
    have = tuple(int(x) for x in re.findall(r"\d+", pve_version)[:3])
    if ask.wants_ms_2023 and have < MS_2023_MIN_PVE:
        refusals.append(f"keys: {ask.keys} needs Microsoft's 2023 UEFI CAs enrolled (efidisk0 ms-cert), which PVE "
                        f"{pve_version or '?'} cannot do (qemu-server before 9.1.13): upgrade the host to PVE "
                        f"{'.'.join(map(str, MS_2023_MIN_PVE))} or newer")
    return refusals
