"""The deevnet MAC namespace: parse, check, allocate and export fixed inventory MACs.

Layout (docs/mac-namespace.md): ``02:de:<plane>:<role>:<host>:<nic>``

- byte 0 ``02``: locally administered, unicast (never a vendor OUI such as Proxmox's BC:24:11)
- byte 1 ``de``: the site (deevnet)
- byte 2: plane, ``10`` mgmt, ``20`` tenant; ``2T`` a VM of tenant id T (1-15)
- byte 3: role category (ROLE_CODES); mgmt codes are 01-0f, tenant codes 11-1f, so the
  role byte alone also names the plane
- byte 4: host index within plane+role, 01-ff (00 is reserved)
- byte 5: NIC index, equal to the NIC's position in ``vm.nics``

Format and bit checks come from :mod:`image_factory.site.inventory` (``normalize_mac``, ``mac_problem``);
this module adds the namespace rules, the allocator that writes into the inventory with a
round-trip YAML editor, and the DHCP/DNS exports.
"""

from __future__ import annotations

import contextlib
import csv
import io
import ipaddress
import json
import re
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from image_factory.errors import FactoryError, Problem, ValidationFailed
from image_factory.files import write_atomic
from image_factory.site.inventory import (
    HYPERVISOR_GROUP,
    MAC_RE,
    PLANES,
    Site,
    StaticIp,
    StaticIp6,
    Tenant,
    _read_inventory,
    load_site,
    mac_problem,
    normalize_mac,
    read_tenants,
    tenants_file,
)

PREFIX = 0x02
SITE_CODE = 0xDE
PLANE_CODES: Mapping[str, int] = {"mgmt": 0x10, "tenant": 0x20}
TENANT_MAX = 15  # a tenant VM's byte 2 is 0x20 + its tenant's id (1-15); 0x20 itself: a tenant VM of no tenant
ROLE_CODES: Mapping[str, Mapping[str, int]] = {
    "mgmt": {
        "observability": 0x01,
        "automation": 0x02,
        "access": 0x03,
        "network": 0x04,
        "storage": 0x05,
        "identity": 0x06,
    },
    "tenant": {
        "app": 0x11,
        "experiment": 0x12,
        "ephemeral": 0x13,
        "data": 0x14,
        "ci": 0x15,
    },
}
HOST_MIN, HOST_MAX = 0x01, 0xFF
NIC_MAX = 7  # the site model allows 8 NICs per VM (net0..net7)
PROXMOX_OUI = "bc:24:11"
DEFAULT_DOMAIN = "deevnet.lan"
DEFAULT_INTERFACES: Mapping[str, str] = {"mgmt": "lan", "tenant": "opt1"}
_UUID_NS = uuid.UUID("6f1c3a52-5c0e-4d7e-9a51-de0000000000")
_MAC_KEY_RE = re.compile(r"^vm\.nics(\.\d+)?\.mac$")


class MacError(ValueError):
    """A text that is not an address of the namespace; the message says why."""


def _code_name(codes: Mapping[str, int], code: int) -> str | None:
    return next((name for name, c in codes.items() if c == code), None)


@dataclass(frozen=True, order=True)
class NamespaceMac:
    """One address of the namespace, as its four variable fields."""

    plane_code: int
    role_code: int
    host: int
    nic: int

    def __post_init__(self) -> None:
        for name in ("plane_code", "role_code", "host", "nic"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFF:
                raise MacError(f"{name} {value} does not fit in one byte")

    @property
    def plane(self) -> str | None:
        return _code_name(PLANE_CODES, self.plane_code & 0xF0)

    @property
    def tenant_id(self) -> int:
        """The tenant a tenant-plane address belongs to (byte 2's low nibble); 0 = no tenant."""
        return self.plane_code & 0x0F

    @property
    def role(self) -> str | None:
        plane = self.plane
        return _code_name(ROLE_CODES[plane], self.role_code) if plane else None

    def __str__(self) -> str:
        return ":".join(f"{b:02x}" for b in (PREFIX, SITE_CODE, self.plane_code, self.role_code, self.host, self.nic))

    @classmethod
    def for_vm(cls, plane: str, role: str, host: int, nic: int, tenant_id: int = 0) -> NamespaceMac:
        """The address of NIC ``nic`` of host index ``host`` in ``plane``/``role`` (and tenant, 1-15)."""
        if plane not in PLANE_CODES:
            raise MacError(f"unknown plane {plane!r} (have: {', '.join(PLANE_CODES)})")
        if tenant_id and (plane != "tenant" or not 1 <= tenant_id <= TENANT_MAX):
            raise MacError(f"tenant id {tenant_id} is not 1-{TENANT_MAX} of the tenant plane")
        code = role_code(plane, role)
        if not HOST_MIN <= host <= HOST_MAX:
            raise MacError(f"host index {host} is outside {HOST_MIN}-{HOST_MAX}")
        if not 0 <= nic <= NIC_MAX:
            raise MacError(f"NIC index {nic} is outside 0-{NIC_MAX}")
        return cls(PLANE_CODES[plane] | tenant_id, code, host, nic)

    @classmethod
    def parse(cls, text: str) -> NamespaceMac:
        """Parse any spelling (case, '-' separators) of a namespace address; raise MacError otherwise."""
        mac = normalize_mac(text)
        why = format_problem(mac)
        if why:
            raise MacError(f"MAC {mac!r} {why}")
        b = [int(x, 16) for x in mac.split(":")]
        if b[0] != PREFIX or b[1] != SITE_CODE:
            raise MacError(
                f"MAC {mac!r} is outside the deevnet namespace (must start with "
                f"{PREFIX:02x}:{SITE_CODE:02x}, i.e. 02:de:<plane>:<role>:<host>:<nic>)"
            )
        plane = _code_name(PLANE_CODES, b[2] & 0xF0)
        if plane is None or (b[2] & 0x0F and plane != "tenant"):
            raise MacError(f"MAC {mac!r}: byte 2 (plane) {b[2]:02x} is not a plane code ({_codes(PLANE_CODES)}; "
                           f"tenant VMs {PLANE_CODES['tenant'] + 1:02x}-{PLANE_CODES['tenant'] + TENANT_MAX:02x})")
        if b[4] == 0:
            raise MacError(f"MAC {mac!r}: byte 4 (host index) 00 is reserved; host indexes are 01-ff")
        return cls(b[2], b[3], b[4], b[5])


def _codes(codes: Mapping[str, int]) -> str:
    return ", ".join(f"{c:02x} {n}" for n, c in codes.items())


def role_code(plane: str, role: str) -> int:
    """The role byte for ``role`` in ``plane``; MacError naming the known roles if it has none."""
    codes = ROLE_CODES.get(plane, {})
    if role not in codes:
        raise MacError(
            f"role {role!r} has no MAC role code in the {plane} plane (have: {_codes(codes)}); "
            "add one to ROLE_CODES in src/image_factory/site/mac.py and docs/mac-namespace.md"
        )
    return codes[role]


def format_problem(mac: str) -> str | None:
    """Why the canonical ``mac`` is not a usable fixed MAC (format, multicast, OUI), or None.

    The verdict is inventory.mac_problem's; this only makes the reason more specific.
    """
    why = mac_problem(mac)
    if why is None:
        return None
    if not MAC_RE.match(mac):
        parts = mac.split(":")
        bad = sorted({ch for ch in mac if ch not in "0123456789abcdef:"})
        if bad:
            return f"{why}: contains {''.join(bad)!r} (only 0-9 and a-f are hex digits)"
        if len(parts) != 6:
            return f"{why}: has {len(parts)} group(s), a MAC has 6"
        short = [p for p in parts if len(p) != 2]
        return f"{why}: group(s) {', '.join(repr(p) for p in short)} are not two hex digits"
    if mac.startswith(PROXMOX_OUI):
        return f"{why}; bc:24:11 is Proxmox's OUI for generated MACs and may collide with any VM it creates"
    if "locally administered" in why:
        return f"{why}; it is a vendor (universally administered) OUI"
    return why


def namespace_problems(mac: str, plane: str, role: str | None, position: int, tenant_id: int = 0) -> list[str]:
    """Every way the canonical ``mac`` disagrees with NIC ``position`` of a VM in ``plane``/``role`` (and tenant)."""
    try:
        ns = NamespaceMac.parse(mac)
    except MacError as exc:
        return [str(exc)]
    out: list[str] = []
    if ns.plane != plane:
        out.append(
            f"MAC {mac!r}: byte 2 (plane) {ns.plane_code:02x} means {ns.plane}, "
            f"but the VM is in the {plane} plane ({PLANE_CODES[plane]:02x})"
        )
    elif ns.tenant_id != tenant_id:
        have = f"tenant id {ns.tenant_id}" if ns.tenant_id else "no tenant"
        want = f"tenant id {tenant_id}" if tenant_id else "no tenant"
        out.append(f"MAC {mac!r}: byte 2 {ns.plane_code:02x} means {have}, but the VM's is {want} "
                   f"({PLANE_CODES[plane] | tenant_id:02x})")
    if ns.plane == plane and role is not None and role in ROLE_CODES[plane] and ns.role_code != ROLE_CODES[plane][role]:
        meaning = ns.role or "no role"
        out.append(
            f"MAC {mac!r}: byte 3 (role) {ns.role_code:02x} means {meaning}, "
            f"but the VM's role is {role} ({ROLE_CODES[plane][role]:02x})"
        )
    if ns.nic != position:
        out.append(f"MAC {mac!r}: byte 5 (NIC index) is {ns.nic:02x}, but this is NIC {position}")
    return out


# ------------------------------------------------------------------------------------- raw inventory


@dataclass
class _VmNics:
    name: str
    file: str
    plane: str
    role: str | None
    macs: list[tuple[int, Any]]  # (position, raw value or _MISSING)
    tenant_id: int | None = 0  # None: it names a tenant the site model does not have (reported there)


_MISSING = object()


def _raw_vms(inventory: Path, problems: list[Problem]) -> list[_VmNics]:
    groups: dict[str, Any] = {}
    group_files: dict[str, dict[str, str]] = {}
    records = _read_inventory(inventory, problems, groups, group_files)
    # the site model's reading of the tenants (strict ids), never the raw YAML; its problems are ours too
    tenant_ids = {t.name: t.id for t in read_tenants(groups, tenants_file(group_files, inventory), problems).values()}
    out: list[_VmNics] = []
    for rec in records.values():
        planes = sorted(rec.groups & set(PLANES))
        if len(planes) != 1 or HYPERVISOR_GROUP in rec.groups:
            continue  # load_site reports these
        body = rec.vars.get("vm")
        if not isinstance(body, dict):
            continue
        role = body.get("role") if isinstance(body.get("role"), str) else None
        nics = body.get("nics")
        macs: list[tuple[int, Any]] = []
        if isinstance(nics, list):
            for i, nic in enumerate(nics):
                if isinstance(nic, dict):
                    macs.append((i, nic.get("mac", _MISSING)))
        tenant = body.get("tenant")
        out.append(_VmNics(rec.name, rec.source("vm"), planes[0], role, macs,
                           0 if tenant is None else tenant_ids.get(tenant) if isinstance(tenant, str) else None))
    return sorted(out, key=lambda v: v.name)


def _vm_problems(vm: _VmNics) -> Iterator[Problem]:
    if vm.role is not None:
        try:
            role_code(vm.plane, vm.role)
        except MacError as exc:
            yield Problem(vm.file, vm.name, "vm.role", str(exc))
    hosts: dict[int, list[int]] = defaultdict(list)
    for i, raw in vm.macs:
        key = f"vm.nics.{i}.mac"
        if raw is _MISSING:
            yield Problem(vm.file, vm.name, key, f"NIC {i} has no MAC; run: invoke mac.generate --vm {vm.name}")
            continue
        if not isinstance(raw, str):
            yield Problem(vm.file, vm.name, key, f"MAC {raw!r} is not a string (quote MACs in YAML)")
            continue
        mac = normalize_mac(raw)
        if vm.tenant_id is None:
            continue  # its tenant is not valid: which byte it needs is unknown until it is
        for why in namespace_problems(mac, vm.plane, vm.role, i, vm.tenant_id):
            yield Problem(vm.file, vm.name, key, why)
        with contextlib.suppress(MacError):
            hosts[NamespaceMac.parse(mac).host].append(i)
    if len(hosts) > 1:
        detail = "; ".join(f"host {h:02x} on NIC(s) {', '.join(map(str, n))}" for h, n in sorted(hosts.items()))
        yield Problem(vm.file, vm.name, "vm.nics", f"NICs disagree on byte 4 (host index): {detail}")


def _duplicate_problems(vms: list[_VmNics]) -> Iterator[Problem]:
    users: dict[str, list[tuple[_VmNics, int]]] = defaultdict(list)
    for vm in vms:
        for i, raw in vm.macs:
            if isinstance(raw, str) and not mac_problem(normalize_mac(raw)):
                users[normalize_mac(raw)].append((vm, i))
    for mac, owners in sorted(users.items()):
        if len(owners) < 2:
            continue
        for vm, i in owners:
            others = ", ".join(f"{o.name} NIC {j} ({o.file})" for o, j in owners if (o, j) != (vm, i))
            yield Problem(vm.file, vm.name, f"vm.nics.{i}.mac", f"MAC {mac!r} is also used by {others}")


def check_inventory(inventory: str | Path, images: str | Path | None = None) -> list[Problem]:
    """Every MAC problem of the inventory, each with file and host; [] when all is well.

    Works on the raw inventory, so it reports per-host MAC problems even where load_site fails.
    With ``images``, the rest of the site model is validated too: load_site's non-MAC problems are
    added (its MAC messages are replaced by the more specific ones here), so one run lists everything.
    """
    problems: list[Problem] = []
    vms = _raw_vms(Path(inventory), problems)
    for vm in vms:
        problems.extend(_vm_problems(vm))
    problems.extend(_duplicate_problems(vms))
    if images is not None:
        try:
            load_site(inventory, images)
        except ValidationFailed as exc:
            mine = list(problems)

            def covered(p: Problem) -> bool:
                # load_site's MAC messages are dropped only where a more specific one above covers them
                if not _MAC_KEY_RE.match(p.key):
                    return False
                if p.key == "vm.nics.mac":
                    return any("is also used by" in q.message for q in mine)
                return any(q.entry == p.entry for q in mine)

            problems.extend(p for p in exc.problems if not covered(p) and p not in mine)
    return problems


def check(inventory: str | Path, images: str | Path | None = None) -> int:
    """Raise ValidationFailed listing every MAC problem; return the number of MACs checked."""
    problems = check_inventory(inventory, images)
    if problems:
        raise ValidationFailed(problems)
    sink: list[Problem] = []
    return sum(len(vm.macs) for vm in _raw_vms(Path(inventory), sink))


# ------------------------------------------------------------------------------------------ allocate


def allocate_host(used: Iterable[NamespaceMac | str], plane: str, role: str, tenant_id: int = 0) -> int:
    """The next free host index in ``plane``/``role``: one above the highest in use, else the lowest gap.

    Counting up (rather than refilling gaps first) keeps a retired host's address out of circulation
    while DHCP leases and ARP caches may still remember it; gaps are reused only once ff is taken.
    """
    p, r = PLANE_CODES[plane] | tenant_id, role_code(plane, role)
    taken: set[int] = set()
    for item in used:
        try:
            ns = item if isinstance(item, NamespaceMac) else NamespaceMac.parse(item)
        except MacError:
            continue
        if (ns.plane_code, ns.role_code) == (p, r):
            taken.add(ns.host)
    if not taken or max(taken) < HOST_MAX:
        return max(taken, default=0) + 1
    free = [h for h in range(HOST_MIN, HOST_MAX + 1) if h not in taken]
    if not free:
        raise MacError(f"all {HOST_MAX} host indexes of {plane}/{role} are taken")
    return free[0]


@dataclass(frozen=True)
class Change:
    """One NIC's MAC as mac.generate left it."""

    vm: str
    file: str
    nic: int
    old: str | None
    new: str
    added_nic: bool = False

    @property
    def changed(self) -> bool:
        return self.old != self.new


def _round_trip_yaml() -> Any:
    from ruamel.yaml import YAML

    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 1 << 16
    return y


# Indentation styles tried in order; the first whose plain round-trip reproduces the file is used.
_STYLES = ((2, 4, 2), (2, 2, 0), (4, 4, 2), (4, 6, 4), (2, 2, 2), (4, 4, 0))


def _load_rt(path: Path) -> tuple[Any, Any]:
    """Load ``path`` for round-trip editing with the one indentation style that reproduces it exactly."""
    from ruamel.yaml.error import YAMLError

    text = path.read_text(encoding="utf-8")
    for mapping, sequence, offset in _STYLES:
        y = _round_trip_yaml()
        y.indent(mapping=mapping, sequence=sequence, offset=offset)
        try:
            doc = y.load(text)
        except YAMLError as exc:
            raise ValidationFailed([Problem(str(path), "", "", f"invalid YAML: {exc}")]) from None
        out = io.StringIO()
        y.dump(doc, out)
        if out.getvalue() == text:
            return y, doc
    raise ValidationFailed([Problem(
        str(path), "", "",
        "cannot edit this file without reformatting it (mixed indentation?); "
        "indent mappings consistently (2 spaces, lists '  - ') and retry, or edit the MAC by hand",
    )])


def _find_host(node: Any, host: str) -> Any:
    """The host's vars mapping inside an Ansible YAML inventory document, or None."""
    if not isinstance(node, dict):
        return None
    hosts = node.get("hosts")
    if isinstance(hosts, dict) and host in hosts and isinstance(hosts[host], dict) and "vm" in hosts[host]:
        return hosts[host]
    for child in (node.get("children") or {}).values():
        found = _find_host(child, host)
        if found is not None:
            return found
    return None


def _quoted(value: str, like: Any) -> Any:
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString

    if isinstance(like, SingleQuotedScalarString):
        return SingleQuotedScalarString(value)
    return DoubleQuotedScalarString(value)


def parse_nic(text: str | int | None) -> int | None:
    """The --nic flag: None (every NIC) or a NIC index 0-7."""
    if text is None or isinstance(text, int):
        return text
    if not text.strip().isdigit() or int(text) > NIC_MAX:
        raise ValidationFailed([Problem("--nic", str(text), "", f"must be a NIC index 0-{NIC_MAX}")])
    return int(text)


def plan(inventory: str | Path, vm_name: str, nic: int | None = None) -> list[Change]:
    """What mac.generate would write for ``vm_name`` (all NICs, or only ``nic``), without writing."""
    problems: list[Problem] = []
    if not vm_name:
        raise ValidationFailed([Problem("--vm", "", "", "name the VM: --vm NAME")])
    vms = _raw_vms(Path(inventory), problems)
    if problems:
        raise ValidationFailed(problems)
    by_name = {v.name: v for v in vms}
    if vm_name not in by_name:
        raise ValidationFailed([Problem(
            str(inventory), vm_name, "", f"no VM named {vm_name!r} in the mgmt or tenant groups "
            f"(have: {', '.join(sorted(by_name)) or 'none'})",
        )])
    vm = by_name[vm_name]
    if vm.tenant_id is None:
        raise ValidationFailed([Problem(vm.file, vm.name, "vm.tenant",
                                        "names no tenant of the site model: its MACs cannot be chosen")])
    if vm.role is None:
        raise ValidationFailed([Problem(vm.file, vm.name, "vm.role", "the VM needs a role to get a MAC")])
    try:
        code = role_code(vm.plane, vm.role)
    except MacError as exc:
        raise ValidationFailed([Problem(vm.file, vm.name, "vm.role", str(exc))]) from None
    count = len(vm.macs)
    if nic is not None and not 0 <= nic <= min(count, NIC_MAX):
        raise ValidationFailed([Problem(
            vm.file, vm.name, "vm.nics",
            f"NIC {nic} is out of range: the VM has {count} NIC(s), so --nic takes 0-{min(count, NIC_MAX)} "
            f"({count} adds a NIC; the NIC index must equal the position, so no gaps)",
        )])

    def parsed(raw: Any) -> NamespaceMac | None:
        try:
            return NamespaceMac.parse(raw) if isinstance(raw, str) else None
        except MacError:
            return None

    plane_code = PLANE_CODES[vm.plane] | vm.tenant_id
    others: dict[str, str] = {}
    for other in vms:
        if other.name != vm.name:
            for _, raw in other.macs:
                if isinstance(raw, str):
                    others[normalize_mac(raw)] = other.name
    # Keep the VM's host index when its own MACs agree on one that no other VM uses.
    own = {
        ns.host for _, raw in vm.macs
        if (ns := parsed(raw)) is not None and (ns.plane_code, ns.role_code) == (plane_code, code)
    }
    clash = {
        ns.host for m in others
        if (ns := parsed(m)) is not None and (ns.plane_code, ns.role_code) == (plane_code, code)
    }
    if len(own) == 1 and not own & clash:
        host = own.pop()
    else:
        try:
            host = allocate_host(others, vm.plane, vm.role, vm.tenant_id)
        except MacError as exc:
            raise ValidationFailed([Problem(vm.file, vm.name, "vm.role", str(exc))]) from None
    current = dict(vm.macs)
    targets = range(count) if nic is None else [nic]
    if nic is None and count == 0:
        targets = [0]
    changes = []
    for i in targets:
        raw = current.get(i)
        old = normalize_mac(raw) if isinstance(raw, str) else None
        new = str(NamespaceMac.for_vm(vm.plane, vm.role, host, i, vm.tenant_id))
        changes.append(Change(vm.name, vm.file, i, old, new, added_nic=i >= count))
    return changes


def _probe_inventory(inventory: Path, edited: Path, text: str, tmp: Path) -> Path:
    """A copy of ``inventory`` under ``tmp`` (its files, group_vars/ and host_vars/) with ``edited`` holding
    ``text``: what the inventory reads as once the edit is written."""
    import shutil

    root = inventory if inventory.is_dir() else inventory.parent
    parts = [inventory] if inventory.is_dir() else [inventory, root / "group_vars", root / "host_vars"]
    for part in parts:
        if part.is_dir():
            shutil.copytree(part, tmp / part.relative_to(root) if part != root else tmp, dirs_exist_ok=True)
        elif part.is_file():
            shutil.copy2(part, tmp / part.name)
    target = tmp / edited.resolve().relative_to(root.resolve())
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return tmp if inventory.is_dir() else tmp / inventory.name


def _norm(raw: Any) -> Any:
    return normalize_mac(raw) if isinstance(raw, str) else raw


def generate(inventory: str | Path, vm_name: str, nic: int | None = None) -> list[Change]:
    """Give ``vm_name`` namespace MACs (all NICs, or only ``nic``; ``nic`` = NIC count adds a NIC).

    NICs that already carry the right address are left alone, so a re-run changes nothing. The file is
    edited with a round-trip YAML editor (comments, order, quoting and layout preserved), checked by
    re-reading, and replaced atomically; nothing is written if any step fails.
    """
    changes = plan(inventory, vm_name, nic)
    todo = [c for c in changes if c.changed]
    if not todo:
        return changes
    path = Path(todo[0].file)
    y, doc = _load_rt(path)
    # The VM's `vm` mapping is in an inventory file (under all:) or is a host_vars file's own top-level key.
    in_host_vars = isinstance(doc, dict) and "all" not in doc and isinstance(doc.get("vm"), dict)
    host = doc if in_host_vars else _find_host(doc.get("all") if isinstance(doc, dict) else None, vm_name)
    vm_map = host.get("vm") if host is not None else None
    if isinstance(vm_map, dict) and vm_map.get("nics") is None:
        from ruamel.yaml.comments import CommentedSeq

        vm_map["nics"] = CommentedSeq()
    nics = vm_map.get("nics") if isinstance(vm_map, dict) else None
    if not isinstance(nics, list):
        raise ValidationFailed([Problem(
            str(path), vm_name, "vm.nics",
            "the VM's nics are not defined in this host's own vars; cannot edit them here",
        )])
    for c in todo:
        if c.added_nic:
            from ruamel.yaml.comments import CommentedMap

            entry = CommentedMap()
            entry["mac"] = _quoted(c.new, None)
            if nics and getattr(nics[-1], "fa", None) is not None and nics[-1].fa.flow_style():
                entry.fa.set_flow_style()
            nics.append(entry)
        else:
            nics[c.nic]["mac"] = _quoted(c.new, nics[c.nic].get("mac"))
    out = io.StringIO()
    y.dump(doc, out)
    text = out.getvalue()
    # Prove the edit before replacing the file: re-read a copy of the inventory with it and compare every VM's MACs.
    with tempfile.TemporaryDirectory() as tmp:
        probe = _probe_inventory(Path(inventory), path, text, Path(tmp))
        sink: list[Problem] = []
        after = {v.name: dict(v.macs) for v in _raw_vms(probe, sink)}
        before = {v.name: dict(v.macs) for v in _raw_vms(Path(inventory), sink)}
    expected = {k: {i: _norm(m) for i, m in v.items()} for k, v in before.items()}
    for c in todo:
        expected[vm_name][c.nic] = c.new
    if sink or expected != {k: {i: _norm(m) for i, m in v.items()} for k, v in after.items()}:
        raise FactoryError(f"{path}: the edited inventory did not read back as intended; nothing was written")
    write_atomic(path, text)
    return changes


# -------------------------------------------------------------------------------------------- export


@dataclass(frozen=True, order=True)
class Reservation:
    """One DHCP/DNS entry: a NIC of a VM, with its address when the inventory gives one."""

    mac: str
    hostname: str
    domain: str
    address: str | None
    vm: str
    nic: int
    plane: str
    role: str
    hypervisor: str
    vmid: int
    tenant: str | None = None
    address6: str | None = None

    @property
    def fqdn(self) -> str:
        return f"{self.hostname}.{self.domain}"


def reservations(site: Site, domain: str = DEFAULT_DOMAIN) -> list[Reservation]:
    """Every NIC of every VM, sorted by MAC; NIC 0 is named after the VM, NIC n after ``<vm>-nic<n>``.

    The address is the NIC's ``address``, or for NIC 0 the static cloud-init ipconfig address.
    """
    out = []
    for vm in site.vms.values():
        tenant = site.tenants.get(vm.tenant) if vm.tenant else None
        static = vm.cloudinit.ipconfig
        for i, nic in enumerate(vm.nics):
            address, address6 = nic.address, nic.address6
            if address is None and i == 0 and isinstance(static, StaticIp):
                address = str(ipaddress.ip_interface(static.ip).ip)
            if address6 is None and i == 0 and isinstance(vm.cloudinit.ip6, StaticIp6):
                address6 = str(ipaddress.ip_interface(vm.cloudinit.ip6.ip).ip)
            out.append(Reservation(
                mac=nic.mac, hostname=vm.name if i == 0 else f"{vm.name}-nic{i}",
                domain=vm.cloudinit.searchdomain or (tenant.domain if tenant else domain), address=address,
                vm=vm.name, nic=i, plane=vm.plane, role=vm.role,
                hypervisor=" or ".join(h.name for h in site.candidates(vm)), vmid=vm.vmid, tenant=vm.tenant,
                address6=address6,
            ))
    return sorted(out)


HEADER = "generated by deevnet-image-factory `invoke mac.export` from the inventory; do not edit"


def _opnsense_isc(rs: list[Reservation], interfaces: Mapping[str, str]) -> str:
    lines = ['<?xml version="1.0"?>', f"<!-- {HEADER} -->",
             "<!-- ISC DHCP: merge each <staticmap> under <dhcpd><IFACE>; DNS: merge each <host> under",
             "     <OPNsense><unboundplus><hosts>. A staticmap without <ipaddr> is a MAC-only mapping",
             "     (hostname only, address from the pool); such NICs get no host override. -->",
             *_not_carried(rs, "ISC DHCP's static maps"), "<opnsense>", "  <dhcpd>"]
    for plane in PLANES:
        group = [r for r in rs if r.plane == plane]
        if not group:
            continue
        iface = interfaces[plane]
        lines.append(f"    <{iface}>  <!-- {plane} plane -->")
        for r in group:
            lines += [
                "      <staticmap>",
                f"        <mac>{r.mac}</mac>",
                f"        <ipaddr>{r.address}</ipaddr>" if r.address else "        <ipaddr/>",
                f"        <hostname>{escape(r.hostname)}</hostname>",
                f"        <descr>{escape(_descr(r))}</descr>",
                "      </staticmap>",
            ]
        lines.append(f"    </{iface}>")
    lines += ["  </dhcpd>", "  <OPNsense>", "    <unboundplus>", "      <hosts>"]
    for r in rs:
        if not r.address:
            lines.append(f"        <!-- {escape(r.fqdn)} ({r.mac}): no address in the inventory, no override -->")
            continue
        uid = uuid.uuid5(_UUID_NS, f"{r.fqdn}|{r.mac}")
        lines += [
            f'        <host uuid="{uid}">',
            "          <enabled>1</enabled>",
            f"          <hostname>{escape(r.hostname)}</hostname>",
            f"          <domain>{escape(r.domain)}</domain>",
            "          <rr>A</rr>",
            "          <mxprio/>",
            "          <mx/>",
            f"          <server>{r.address}</server>",
            f"          <description>{escape(_descr(r))}</description>",
            "        </host>",
        ]
    lines += ["      </hosts>", "    </unboundplus>", "  </OPNsense>", "</opnsense>"]
    return "\n".join(lines) + "\n"


DHCP_MARKER = "[image-factory]"  # starts the description of every DHCP object the factory owns in OPNsense


def host_marker(r: Reservation) -> str:
    """The description of a NIC's Dnsmasq host reservation, in an export and through the API alike: an imported
    export is the factory's own to opnsense.sync."""
    return f"{DHCP_MARKER} {r.vm} nic{r.nic} {r.plane}/{r.role} on {r.hypervisor}"


def tenant_tag(t: Tenant) -> str:
    """The name of a tenant's Dnsmasq tag (its range and hosts set it, its domain-name option matches it)."""
    return f"{DHCP_MARKER} tenant {t.name}"


def tenant_marker(t: Tenant) -> str:
    """The description of a tenant's DHCP range, in an export and through the API alike."""
    return f"{DHCP_MARKER} tenant {t.name}: VLAN {t.vlan}, {t.subnet}, gateway {t.gateway}"


def _tenant_checklist(tenants: Mapping[str, Tenant]) -> list[str]:
    """What stays manual per tenant in OPNsense (interface assignments have no stable API), as XML comments
    (which may not hold a double hyphen)."""
    lines = []
    for t in sorted(tenants.values(), key=lambda t: t.id):
        lines += [
            f"<!-- tenant {escape(t.name)}: 1. Interfaces: Devices: VLAN, tag {t.vlan} on the trunk to the tenant",
            "     bridge (or opnsense.sync with a VLAN parent); 2. Interfaces: Assignments: assign it, enable,",
            f"     static IPv4 {t.gateway}/{t.network.prefixlen}, description {escape(t.name)}; 3. Firewall: Rules",
            f"     on it (the tenant's own policy); 4. merge its dhcp_tags, dhcp_ranges ({t.dhcp_range.first} to "
            f"{t.dhcp_range.last}) and dhcp_options below. -->",
        ]
    return lines


def _opnsense_dnsmasq(rs: list[Reservation], interfaces: Mapping[str, str], tenants: Mapping[str, Tenant]) -> str:
    """OPNsense 25.7+ (Dnsmasq is its default DHCP server; ISC DHCP a plugin from 26.1): one ``<hosts>`` per NIC
    in the Dnsmasq model (mount /dnsmasq, OPNsense core's Dnsmasq.xml): MAC, address, host and domain, which
    also answers DNS for the name; one ``<dhcp_ranges>`` per tenant. Field order as the model declares it."""
    lines = ['<?xml version="1.0"?>', f"<!-- {HEADER} -->",
             "<!-- OPNsense Dnsmasq DHCP (25.7+): merge each <hosts> under <dnsmasq> (Services: Dnsmasq DNS & DHCP:",
             "     Hosts). An entry without <ip> is a MAC-only reservation (hostname, address from the range).",
             "     The uuid comes from fqdn+MAC: a re-export updates the same entries. ISC DHCP: opnsense-isc.",
             "     Descriptions carry opnsense.sync's marker: after an import, sync owns these entries. -->",
             *_tenant_checklist(tenants), *_not_carried(rs, "this fragment (opnsense.sync writes IPv4 only)"),
             "<opnsense>", "  <dnsmasq>"]
    tags = {t.name: uuid.uuid5(_UUID_NS, f"dnsmasq-tag|{t.name}") for t in tenants.values()}
    for t in sorted(tenants.values(), key=lambda t: t.id):
        # the tenant's tag, set by its range and hosts, and its domain-name option (15) for that tag: the domain
        # reaches its fixed reservations too (domain_type range covers the dynamic pool only)
        lines += [f'    <dhcp_tags uuid="{tags[t.name]}">', f"      <tag>{escape(tenant_tag(t))}</tag>",
                  "    </dhcp_tags>"]
    for t in sorted(tenants.values(), key=lambda t: t.id):
        uid = uuid.uuid5(_UUID_NS, f"dnsmasq-range|{t.name}")
        lines += [
            f'    <dhcp_ranges uuid="{uid}">',
            "      <interface/>", f"      <set_tag>{tags[t.name]}</set_tag>",
            f"      <start_addr>{t.dhcp_range.first}</start_addr>",
            f"      <end_addr>{t.dhcp_range.last}</end_addr>",
            f"      <subnet_mask>{t.network.netmask}</subnet_mask>",
            "      <constructor/>", "      <mode/>", "      <prefix_len/>", "      <lease_time/>",
            "      <domain_type>range</domain_type>",
            f"      <domain>{escape(t.domain)}</domain>",
            "      <nosync>0</nosync>", "      <ra_mode/>", "      <ra_priority/>", "      <ra_mtu/>",
            "      <ra_interval/>", "      <ra_router_lifetime/>",
            f"      <description>{escape(tenant_marker(t))}</description>",
            "    </dhcp_ranges>",
        ]
    for t in sorted(tenants.values(), key=lambda t: t.id):
        uid = uuid.uuid5(_UUID_NS, f"dnsmasq-option|{t.name}")
        lines += [
            f'    <dhcp_options uuid="{uid}">',
            "      <type>set</type>", "      <option>15</option>", "      <option6/>", "      <interface/>",
            f"      <tag>{tags[t.name]}</tag>", "      <set_tag/>", f"      <value>{escape(t.domain)}</value>",
            "      <force>0</force>",
            f"      <description>{escape(tenant_marker(t))}: domain-name {escape(t.domain)}</description>",
            "    </dhcp_options>",
        ]
    for r in rs:
        uid = uuid.uuid5(_UUID_NS, f"dnsmasq|{r.fqdn}|{r.mac}")
        lines += [
            f'    <hosts uuid="{uid}">',
            f"      <host>{escape(r.hostname)}</host>",
            f"      <domain>{escape(r.domain)}</domain>",
            "      <local>0</local>",
            f"      <ip>{r.address}</ip>" if r.address else "      <ip/>",
            "      <cnames/>",
            "      <client_id/>",
            f"      <hwaddr>{r.mac}</hwaddr>",
            "      <lease_time/>",
            "      <ignore>0</ignore>",
            f"      <set_tag>{tags[r.tenant]}</set_tag>" if r.tenant in tags else "      <set_tag/>",
            f"      <descr>{escape(host_marker(r))}</descr>",
            "      <comments/>",
            "      <aliases/>",
            "    </hosts>",
        ]
    lines += ["  </dnsmasq>", "</opnsense>"]
    return "\n".join(lines) + "\n"


def _descr(r: Reservation) -> str:
    return f"{r.vm} nic{r.nic} {r.plane}/{r.role} on {r.hypervisor} (vmid {r.vmid})"


def _kea_context(r: Reservation) -> dict[str, Any]:
    return {"fqdn": r.fqdn, "vm": r.vm, "nic": r.nic, "plane": r.plane, "role": r.role, "hypervisor": r.hypervisor,
            "vmid": r.vmid, "generated-by": "deevnet-image-factory mac.export"}


def _kea(rs: list[Reservation], tenants: Mapping[str, Tenant]) -> str:
    """Global reservations, and per tenant a subnet (its pool, router and domain) holding its VMs' reservations."""
    def entry(r: Reservation) -> dict[str, Any]:
        out: dict[str, Any] = {"hw-address": r.mac}
        if r.address:
            out["ip-address"] = r.address
        out["hostname"] = r.hostname
        out["user-context"] = _kea_context(r)
        return out

    dhcp4: dict[str, Any] = {"reservations-global": True,
                             "reservations": [entry(r) for r in rs if r.tenant not in tenants]}
    if tenants:
        dhcp4["reservations-in-subnet"] = True
        dhcp4["subnet4"] = [{
            "id": t.id, "subnet": t.subnet,
            "pools": [{"pool": f"{t.dhcp_range.first} - {t.dhcp_range.last}"}],
            "option-data": [{"name": "routers", "data": t.gateway}, {"name": "domain-name", "data": t.domain}],
            "user-context": {"tenant": t.name, "vlan": t.vlan},
            "reservations": [entry(r) for r in rs if r.tenant == t.name],
        } for t in sorted(tenants.values(), key=lambda t: t.id)]
    return json.dumps({"Dhcp4": dhcp4}, indent=2, sort_keys=False) + "\n"


def _kea6(rs: list[Reservation]) -> str:
    """Kea DHCPv6: a global reservation (by the NIC's MAC: Kea's hw-address identifier) for every NIC with an IPv6
    address; the tenants have no IPv6 subnets in the site model, so no subnet6 and no pools (add yours)."""
    reservations = [{
        "hw-address": r.mac, "ip-addresses": [r.address6], "hostname": r.hostname,
        "user-context": _kea_context(r)} for r in rs if r.address6]
    return json.dumps({"Dhcp6": {"reservations-global": True, "reservations": reservations}}, indent=2) + "\n"


def _not_carried(rs: list[Reservation], what: str) -> list[str]:
    """A note where an export has no place for the inventory's IPv6 addresses (empty when there are none)."""
    if not any(r.address6 for r in rs):
        return []
    return [f"<!-- IPv6: {what} does not carry the inventory's IPv6 addresses (mac.export --format kea6 or dnsmasq "
            "does) -->"]


def _dnsmasq(rs: list[Reservation], tenants: Mapping[str, Tenant]) -> str:
    lines = [f"# {HEADER}", "# dhcp-host=<mac>,<address>,<hostname>; without an address: a name-only reservation"]
    for t in sorted(tenants.values(), key=lambda t: t.id):
        lines += [
            f"# tenant {t.name}: VLAN {t.vlan}, {t.subnet}",
            f"dhcp-range=set:{t.name},{t.dhcp_range.first},{t.dhcp_range.last},{t.network.netmask},12h",
            f"dhcp-option=tag:{t.name},option:router,{t.gateway}",
            f"dhcp-option=tag:{t.name},option:domain-name,{t.domain}",
        ]
    for r in rs:
        lines.append(f"# {_descr(r)}")
        parts = [r.mac, *([r.address] if r.address else []), *([f"[{r.address6}]"] if r.address6 else []), r.hostname]
        lines.append("dhcp-host=" + ",".join(parts))
    return "\n".join(lines) + "\n"


def _csv(rs: list[Reservation]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["mac", "address", "hostname", "fqdn", "vm", "nic", "plane", "role", "hypervisor", "vmid"])
    for r in rs:
        w.writerow([r.mac, r.address or "", r.hostname, r.fqdn, r.vm, r.nic, r.plane, r.role, r.hypervisor, r.vmid])
    return buf.getvalue()


def _hosts(rs: list[Reservation]) -> str:
    lines = [f"# {HEADER}"]
    for r in sorted(rs, key=lambda r: (r.address is None, int(ipaddress.IPv4Address(r.address or 0)), r.mac)):
        if r.address:
            lines.append(f"{r.address}\t{r.fqdn} {r.hostname}")
        elif not r.address6:
            lines.append(f"# {r.fqdn} ({r.mac}): no address in the inventory (DHCP from the pool)")
    lines += [f"{r.address6}\t{r.fqdn} {r.hostname}" for r in rs if r.address6]
    return "\n".join(lines) + "\n"


def parse_interfaces(spec: str | None) -> dict[str, str]:
    """``mgmt=lan,tenant=opt1`` -> mapping plane -> OPNsense interface; defaults fill the rest."""
    out = dict(DEFAULT_INTERFACES)
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        plane, sep, iface = item.partition("=")
        if not sep or plane not in PLANES or not re.match(r"^[a-z][a-z0-9_]*$", iface):
            raise ValidationFailed([Problem(
                "--interfaces", item, "", "expected plane=interface, e.g. mgmt=lan,tenant=opt1",
            )])
        out[plane] = iface
    return out


@dataclass(frozen=True)
class Exporter:
    """One DHCP/DNS export format: what it is for, and how it renders the reservations."""

    description: str
    render: Callable[[list[Reservation], Mapping[str, str], Mapping[str, Tenant]], str]


EXPORTERS: dict[str, Exporter] = {
    "opnsense": Exporter("OPNsense 25.7+ Dnsmasq DHCP ranges per tenant and host reservations (config.xml fragment)",
                         _opnsense_dnsmasq),
    "opnsense-isc": Exporter("OPNsense ISC DHCP static maps and Unbound host overrides (config.xml fragment)",
                             lambda rs, i, _t: _opnsense_isc(rs, i)),
    "kea": Exporter("Kea DHCPv4: global reservations, and per tenant a subnet with its pool (JSON)",
                    lambda rs, _i, t: _kea(rs, t)),
    "kea6": Exporter("Kea DHCPv6: global reservations by MAC for the NICs with an IPv6 address (JSON)",
                     lambda rs, _i, _t: _kea6(rs)),
    "dnsmasq": Exporter("dnsmasq: a tagged dhcp-range per tenant, dhcp-host lines (IPv4 and [IPv6])",
                        lambda rs, _i, t: _dnsmasq(rs, t)),
    "csv": Exporter("one row per NIC", lambda rs, _i, _t: _csv(rs)),
    "hosts": Exporter("/etc/hosts lines", lambda rs, _i, _t: _hosts(rs)),
}
FORMATS = tuple(EXPORTERS)


def export(site: Site, fmt: str, domain: str = DEFAULT_DOMAIN, interfaces: Mapping[str, str] | None = None) -> str:
    """Render the site's reservations in ``fmt`` (one of FORMATS); the same site gives the same bytes."""
    exporter = EXPORTERS.get(fmt)
    if exporter is None:
        raise ValidationFailed([Problem("--format", fmt, "", f"unknown format (have: {', '.join(FORMATS)})")])
    return exporter.render(checked_reservations(site, domain), interfaces or DEFAULT_INTERFACES, site.tenants)


def checked_reservations(site: Site, domain: str = DEFAULT_DOMAIN) -> list[Reservation]:
    """The site's reservations once its MACs pass mac.check's namespace rules (addresses are the site model's:
    load_site refuses one held twice); ValidationFailed listing every problem otherwise."""
    problems = check_inventory(site.inventory_path)
    if problems:
        raise ValidationFailed(problems)
    return reservations(site, domain)


def write_output(text: str, output: str | Path) -> Path:
    """Write an export atomically (a reader never sees half a file); a path that cannot be written is bad input,
    named by the flag that gave it."""
    path = Path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
    except OSError as exc:
        raise ValidationFailed([Problem("command line", "", "--output",
                                        f"cannot write {path}: {exc.strerror or exc} ({exc.filename or path})")
                                ]) from None
    return path


__all__ = [
    "DEFAULT_DOMAIN", "EXPORTERS", "FORMATS", "PLANE_CODES", "PREFIX", "PROXMOX_OUI", "ROLE_CODES", "SITE_CODE",
    "Change", "Exporter", "MacError", "NamespaceMac", "Reservation", "allocate_host", "check", "check_inventory",
    "checked_reservations",
    "export", "format_problem", "generate", "namespace_problems", "parse_interfaces", "parse_nic", "plan",
    "reservations", "role_code", "write_output",
]
