"""The platform an image boots on (firmware, Secure Boot keys, TPM, machine): one foundation value that the
image wing records and the pve wing asks a hypervisor for."""

from __future__ import annotations

from dataclasses import dataclass, field

# Key sets whose template gets the build's own enrolled variable store (imported into efidisk0) instead of PVE's
# pre-enrolled one, which always holds Microsoft's 2011 CAs (docs/pve-facts.md, "UEFI, Secure Boot").
OWN_STORE_KEYS = frozenset({"microsoft-2023"})


@dataclass(frozen=True)
class Platform:
    """The virtual hardware an image boots on: what its catalogue entry asks (preflight), what its manifest records
    (build, image test, publish), what a template's description says (deploy). One value for every wing."""

    firmware: str = "bios"
    secure_boot: bool = False
    keys: str | None = None
    tpm: bool = False
    machine: str = "pc"
    # The OS family whose own keys "distribution-only" enrols; the build's business, not part of a description.
    family: str = field(default="", compare=False)

    @property
    def own_store(self) -> bool:
        """The template's EFI vars are the build's enrolled store, imported as they are (PVE enrols nothing)."""
        return self.secure_boot and self.keys in OWN_STORE_KEYS

    @property
    def pre_enrolled_keys(self) -> bool:
        """efidisk0's pre-enrolled-keys: PVE copies its Microsoft + distribution store in."""
        return self.secure_boot and self.keys not in (None, "none") and not self.own_store

    @property
    def wants_ms_2023(self) -> bool:
        return self.pre_enrolled_keys and "2023" in str(self.keys)

    def describe(self) -> str:
        """The ``firmware:`` line of a template's description (:meth:`parse` reads it back)."""
        parts = [self.firmware, f"machine={self.machine}"]
        if self.firmware == "uefi":
            parts.append(f"secure_boot={'yes' if self.secure_boot else 'no'}")
            if self.secure_boot:
                parts.append(f"keys={self.keys or 'none'}")
        parts.append(f"tpm={'v2.0' if self.tpm else 'no'}")
        return ",".join(parts)

    @classmethod
    def parse(cls, line: str) -> Platform | None:
        """A description's ``firmware:`` line; None for templates published before it was recorded."""
        head, *rest = [p.strip() for p in line.split(",") if p.strip()] or [""]
        if head not in ("bios", "uefi"):
            return None
        opts = dict(p.partition("=")[::2] for p in rest)
        keys = opts.get("keys")
        return cls(head, opts.get("secure_boot") == "yes", keys if keys not in (None, "") else None,
                   opts.get("tpm", "no") not in ("no", ""), opts.get("machine") or ("q35" if head == "uefi" else "pc"))
