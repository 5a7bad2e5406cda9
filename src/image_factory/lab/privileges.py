"""The privilege names each PVE major knows, as the lab's nodes (and the pveum shim) check them.

fakepve models PVE 9's catalogue. PVE 8.4's differs in the guest-agent privileges: it has VM.Monitor and
none of the VM.GuestAgent.* names, nor VM.Replicate (docs/pve-facts.md, "Proxmox VE 9"). A name the
running version does not know is refused by `pveum role add|modify` with "invalid privilege '<name>'".
"""

from __future__ import annotations

from functools import cache


@cache
def catalogue(major: int) -> frozenset[str]:
    from fakepve import shapes  # local: ~0.2 s to import, paid only when a lab node is made

    nine = frozenset(shapes.PRIVILEGES)
    if major >= 9:
        return nine - {"VM.Monitor"}
    return frozenset({p for p in nine if not p.startswith("VM.GuestAgent.")} - {"VM.Replicate"} | {"VM.Monitor"})


def major(version: str) -> int:
    return int(str(version).split(".", 1)[0])


def invalid(privileges: list[str] | tuple[str, ...], version: str) -> list[str]:
    known = catalogue(major(version))
    return [p for p in privileges if p not in known]
