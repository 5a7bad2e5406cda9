"""The one rule for "is this ours?": a template the factory published, a VM it deployed, and that VM's state.

A published template carries the ``image-factory`` tag and a description whose first line is
:data:`TEMPLATE_HEADER` (:func:`owns_template`; the description's other lines are pve/templates' codec).
A listing shows tags only: :func:`tagged` is the first look a scan of guests can take, never the answer.

A deployed VM carries a marker block at the end of its description, written only by the factory:

    managed-by: deevnet-image-factory
    factory-vm: metrics01
    factory-vmid: 201
    factory-template: tpl-fedora-45-20261128t0100z (vmid 9000)
    factory-run: 3f2a9c0d1e2b
    factory-state: complete
    factory-seal: <sha256 of the lines above>

The seal covers the VMID and the run, so a block copied from another VM, typed by hand, or damaged
does not count: such a VM is treated as foreign (never touched). Free text cannot imitate a block,
since the inventory refuses descriptions and tags that contain the factory's marker words
(:func:`imitates_marker`), and tags never carry state (a ``factory-incomplete`` tag set in the UI is
only a hint for humans). Blocks written before sealing existed ("legacy") still mark a VM as managed,
so upgrades keep working, but never as incomplete and never as destroyable; the next config update
rewrites them sealed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

MANAGED_MARKER = "managed-by: deevnet-image-factory"
FACTORY_TAG = "image-factory"  # on every template and VM the factory made
TEMPLATE_HEADER = "image-factory template"  # the first line of a published template's description
INCOMPLETE_TAG = "factory-incomplete"
_STATES = ("complete", "incomplete")
_TEMPLATE_RE = re.compile(r"^(\S+) \(vmid (\d+)\)$")
# Words the factory writes into descriptions and tags; user text carrying them could imitate a marker.
_RESERVED_LINE_RE = re.compile(r"^\s*(managed-by\s*:|factory-[a-z-]*\s*:)", re.IGNORECASE | re.MULTILINE)
_RESERVED_TAG_RE = re.compile(r"^factory-", re.IGNORECASE)


def imitates_marker(text: str) -> bool:
    """True when free text (an inventory description) holds a line the marker block is made of."""
    return bool(_RESERVED_LINE_RE.search(text or ""))


def reserved_tag(tag: str) -> bool:
    return bool(_RESERVED_TAG_RE.match(tag))


def tagged(tags: Iterable[str]) -> bool:
    """The factory's tag is on the guest: what a listing can tell; ownership needs the description too."""
    return FACTORY_TAG in tags


def has_template_header(description: str | None) -> bool:
    lines = (description or "").splitlines()
    return bool(lines) and lines[0].strip() == TEMPLATE_HEADER


def owns_template(tags: Iterable[str], description: str | None) -> bool:
    """A template (or a half-made one) is the factory's: its tag and its description's header, both."""
    return tagged(tags) and has_template_header(description)


def owns_vm(description: str | None, vmid: int) -> bool:
    """A deployed VM is the factory's: its description ends in a marker block that holds for this VMID."""
    return Marker.parse(description, vmid).managed


def _seal(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def marker_block(*, vm_name: str, vmid: int, template: str, template_vmid: int, run_id: str,
                 incomplete: bool, template_digest: str = "") -> str:
    lines = [MANAGED_MARKER, f"factory-vm: {vm_name}", f"factory-vmid: {vmid}",
             f"factory-template: {template} (vmid {template_vmid})"]
    if template_digest:
        lines.append(f"factory-template-digest: {template_digest}")
    lines += [f"factory-run: {run_id}", f"factory-state: {'incomplete' if incomplete else 'complete'}"]
    return "\n".join([*lines, f"factory-seal: {_seal(lines)}"])


def with_marker(user_text: str, block: str) -> str:
    text = (user_text or "").strip()
    return f"{text}\n\n{block}" if text else block


@dataclass(frozen=True)
class Marker:
    """What a VM's description says about its ownership, checked against the VM's real VMID."""

    managed: bool
    vm_name: str | None = None
    template: str | None = None
    template_vmid: int | None = None
    incomplete: bool = False
    run_id: str | None = None
    sealed: bool = False
    problem: str = ""  # why a block that looks like a marker does not count

    @classmethod
    def parse(cls, description: str | None, vmid: int) -> Marker:
        lines = [line.strip() for line in (description or "").splitlines()]
        starts = [i for i, line in enumerate(lines) if line == MANAGED_MARKER]
        if not starts:
            return cls(False)
        block = [line for line in lines[starts[-1]:] if line]
        fields: dict[str, str] = {}
        for line in block[1:]:
            key, sep, value = line.partition(": ")
            if not sep or key in fields:
                return cls(False, problem=f"damaged factory marker (line {line[:60]!r})")
            fields[key] = value.strip()
        tpl = _TEMPLATE_RE.match(fields.get("factory-template", ""))
        template, template_vmid = (tpl[1], int(tpl[2])) if tpl else (None, None)
        if "factory-seal" not in fields:
            # Written before sealing: managed (upgrades keep working), but never trusted as a state.
            return cls(True, fields.get("factory-vm"), template, template_vmid)
        if block[-1] != f"factory-seal: {fields['factory-seal']}" or fields["factory-seal"] != _seal(block[:-1]):
            return cls(False, problem="factory marker with a wrong seal (edited by hand or forged)")
        if fields.get("factory-vmid") != str(vmid):
            return cls(False, problem=f"factory marker of VMID {fields.get('factory-vmid')} copied onto VMID {vmid}")
        state = fields.get("factory-state")
        if state not in _STATES or tpl is None or not fields.get("factory-vm") or not fields.get("factory-run"):
            return cls(False, problem="factory marker without vm, template, run or state")
        return cls(True, fields["factory-vm"], template, template_vmid, state == "incomplete",
                   fields["factory-run"], True)


def user_description(description: str | None) -> str:
    """The part of a description before the factory's marker block (the inventory's text)."""
    lines = (description or "").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == MANAGED_MARKER]
    return "\n".join(lines[: starts[-1]] if starts else lines).strip()
