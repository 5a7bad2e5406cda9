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
this module adds the namespace rules and the allocator that writes into the inventory with a
round-trip YAML editor. The DHCP/DNS exports of these MACs are a hand-off: :mod:`image_factory.handoffs.dhcp`.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from image_factory.errors import FactoryError, Problem, ValidationFailed
from image_factory.files import write_atomic
from image_factory.site.inventory import (
    HYPERVISOR_GROUP,
    MAC_RE,
    PLANES,
    _read_inventory,
    load_site,
    mac_problem,
    normalize_mac,
    read_tenants,
    tenants_file,
)
from image_factory.site.inventory_edit import find_host, load_round_trip, probe_inventory, quoted

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


def parse_nic(text: str | int | None) -> int | None:
    """The --nic flag: None (every NIC) or a NIC index 0-7."""
    if text is None or isinstance(text, int):
        return text
    if not text.strip().isdigit() or int(text) > NIC_MAX:
        raise ValidationFailed([Problem("--nic", str(text), "", f"must be a NIC index 0-{NIC_MAX}")])
    return int(text)


def _planned_vm(inventory: str | Path, vm_name: str) -> tuple[_VmNics, list[_VmNics], int]:
    """The VM mac.generate works on, every VM of the inventory, and the VM's role code; ValidationFailed naming
    what stops its MACs from being chosen."""
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
    return vm, vms, code


def _parsed(raw: Any) -> NamespaceMac | None:
    try:
        return NamespaceMac.parse(raw) if isinstance(raw, str) else None
    except MacError:
        return None


def _host_index(vm: _VmNics, vms: list[_VmNics], code: int) -> int:
    """The VM's host index: its own when its MACs agree on one that no other VM uses, else the next free one."""
    assert vm.role is not None and vm.tenant_id is not None  # _planned_vm refused the VM otherwise
    plane_code = PLANE_CODES[vm.plane] | vm.tenant_id
    others: dict[str, str] = {}
    for other in vms:
        if other.name != vm.name:
            for _, raw in other.macs:
                if isinstance(raw, str):
                    others[normalize_mac(raw)] = other.name
    own = {
        ns.host for _, raw in vm.macs
        if (ns := _parsed(raw)) is not None and (ns.plane_code, ns.role_code) == (plane_code, code)
    }
    clash = {
        ns.host for m in others
        if (ns := _parsed(m)) is not None and (ns.plane_code, ns.role_code) == (plane_code, code)
    }
    if len(own) == 1 and not own & clash:
        return own.pop()
    try:
        return allocate_host(others, vm.plane, vm.role, vm.tenant_id)
    except MacError as exc:
        raise ValidationFailed([Problem(vm.file, vm.name, "vm.role", str(exc))]) from None


def plan(inventory: str | Path, vm_name: str, nic: int | None = None) -> list[Change]:
    """What mac.generate would write for ``vm_name`` (all NICs, or only ``nic``), without writing."""
    vm, vms, code = _planned_vm(inventory, vm_name)
    assert vm.role is not None and vm.tenant_id is not None  # _planned_vm refused the VM otherwise
    count = len(vm.macs)
    if nic is not None and not 0 <= nic <= min(count, NIC_MAX):
        raise ValidationFailed([Problem(
            vm.file, vm.name, "vm.nics",
            f"NIC {nic} is out of range: the VM has {count} NIC(s), so --nic takes 0-{min(count, NIC_MAX)} "
            f"({count} adds a NIC; the NIC index must equal the position, so no gaps)",
        )])
    host = _host_index(vm, vms, code)
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
    y, doc = load_round_trip(path)
    # The VM's `vm` mapping is in an inventory file (under all:) or is a host_vars file's own top-level key.
    in_host_vars = isinstance(doc, dict) and "all" not in doc and isinstance(doc.get("vm"), dict)
    host = doc if in_host_vars else find_host(doc.get("all") if isinstance(doc, dict) else None, vm_name)
    vm_map = host.get("vm") if host is not None else None
    if isinstance(vm_map, dict) and vm_map.get("nics") is None:
        vm_map["nics"] = CommentedSeq()
    nics = vm_map.get("nics") if isinstance(vm_map, dict) else None
    if not isinstance(nics, list):
        raise ValidationFailed([Problem(
            str(path), vm_name, "vm.nics",
            "the VM's nics are not defined in this host's own vars; cannot edit them here",
        )])
    for c in todo:
        if c.added_nic:
            entry = CommentedMap()
            entry["mac"] = quoted(c.new, None)
            if nics and getattr(nics[-1], "fa", None) is not None and nics[-1].fa.flow_style():
                entry.fa.set_flow_style()
            nics.append(entry)
        else:
            nics[c.nic]["mac"] = quoted(c.new, nics[c.nic].get("mac"))
    out = io.StringIO()
    y.dump(doc, out)
    text = out.getvalue()
    # Prove the edit before replacing the file: re-read a copy of the inventory with it and compare every VM's MACs.
    with tempfile.TemporaryDirectory() as tmp:
        probe = probe_inventory(Path(inventory), path, text, Path(tmp))
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


__all__ = [
    "PLANE_CODES", "PREFIX", "PROXMOX_OUI", "ROLE_CODES", "SITE_CODE",
    "Change", "MacError", "NamespaceMac", "allocate_host", "check", "check_inventory",
    "format_problem", "generate", "namespace_problems", "parse_nic", "plan", "role_code",
]
