"""Preflight: read-only checks that each hypervisor is ready for publish and deploy.

For every selected hypervisor, in parallel (one thread per host), and without changing anything
(API GETs only, and ``df`` over SSH):

========== ===========================================================================
check      what passes
========== ===========================================================================
tls        the API answers over TLS verified with the inventory's CA file or fingerprint
ssh        the SSH host key matches the pinned one and the factory key logs in
token      the API token authenticates
version    PVE 8.4 or newer (``import`` uploads need it)
privileges the token's effective privileges (``GET /access/permissions``) cover
           :data:`REQUIRED_PRIVILEGES` on /vms, /storage/<id>, /sdn/zones/localnetwork/<bridge>
           and /nodes/<node>
storage    the images, cloud-init and import storages exist, are enabled and list the
           content types the factory writes (images; import)
space      the import storage (API ``avail``), the upload staging dir, the import dir and a ``dir``
           images storage beside it (``df`` over SSH, per filesystem), or an LVM-thin images pool's
           data space (API ``avail``) have room for the largest artifact
bridge     every bridge the inventory names for this host exists on the node
vmids      the template and VM id ranges hold no guest the factory does not own
           (owned = tagged :data:`FACTORY_TAG`)
macs       no VM on the node but the inventory VM itself carries an inventory MAC (foreign VMs
           and templates included; each host is checked against the whole inventory)
tags       the datacenter tag policy (``/cluster/options``: ``user-tag-access``, ``registered-tags``)
           lets the token set the factory's tags, which otherwise needs Sys.Modify on /; WARN (not a
           failure) where the token cannot read the policy (Sys.Audit on /)
firmware   the host's PVE can make each UEFI / Secure Boot / vTPM / q35 template the catalogue asks for
           (its key set, Microsoft's 2023 CAs: PVE 9.1.19+) and the images storage holds EFI and TPM volumes
========== ===========================================================================

Each failure carries a hint that says how to fix it. :func:`run_preflight` returns a
:class:`PreflightReport`; :meth:`PreflightReport.raise_for_failures` raises
:class:`PreflightFailed` with the host, check, problem and fix of every failure. publish and
deploy run ``run_preflight(..., checks=PUBLISH_CHECKS)`` / ``DEPLOY_CHECKS`` first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table
from rich.text import Text

from image_factory.errors import FactoryError, RemoteError, TlsVerificationFailed
from image_factory.fanout import per_host
from image_factory.image import manifest as manifest_mod
from image_factory.ownership import FACTORY_TAG
from image_factory.platform import Platform
from image_factory.pve.capabilities import firmware_refusals
from image_factory.pve.client import ApiError, PveClient
from image_factory.pve.codec import DEFAULT_BRIDGE_VIDS, format_vids, parse_tags, parse_vids
from image_factory.pve.livemacs import host_mac_uses, site_collisions
from image_factory.pve.sshlink import HostKeyMismatch, SshLink
from image_factory.pve.upload import transport_kind
from image_factory.reports import Report
from image_factory.settings import Settings
from image_factory.site.inventory import Hypervisor, Site

# ------------------------------------------------------------------------------------- constants

CHECK_TLS = "tls"
CHECK_SSH = "ssh"
CHECK_TOKEN = "token"  # noqa: S105 - a check name, not a secret
CHECK_VERSION = "version"
CHECK_PRIVILEGES = "privileges"
CHECK_STORAGE = "storage"
CHECK_SPACE = "space"
CHECK_BRIDGE = "bridge"
CHECK_VMIDS = "vmids"
CHECK_MACS = "macs"
CHECK_TAGS = "tags"
CHECK_FIRMWARE = "firmware"

MIN_VERSION = (8, 4)
FACTORY_ROLE = "ImageFactory"
SDN_ZONE = "localnetwork"
PLAYBOOK = "ansible/playbooks/hypervisor.yml"

VM_BASE_PRIVILEGES: tuple[str, ...] = (
    "VM.Allocate", "VM.Clone", "VM.Config.Disk", "VM.Config.CDROM", "VM.Config.Cloudinit",
    "VM.Config.Network", "VM.Config.Options", "VM.Config.HWType", "VM.Config.Memory", "VM.Config.CPU",
    "VM.PowerMgmt", "VM.Audit",
)
# Guest-agent privileges by PVE major (docs/pve-facts.md): deploy's readiness wait
# (agent/network-get-interfaces) and the guest host-key read (agent/file-read). PVE 8 checks VM.Monitor
# for every agent call; PVE 9 removed VM.Monitor (`pveum` refuses the name) and checks
# VM.GuestAgent.Audit for read-only commands and VM.GuestAgent.FileRead for file-read.
AGENT_PRIVILEGES: dict[int, tuple[str, ...]] = {
    8: ("VM.Monitor",),
    9: ("VM.GuestAgent.Audit", "VM.GuestAgent.FileRead"),
}
LATEST_MAJOR = max(AGENT_PRIVILEGES)
EOL_MAJORS = {8: "August 2026"}
VM_PRIVILEGES: tuple[str, ...] = (*VM_BASE_PRIVILEGES, *AGENT_PRIVILEGES[8])  # PVE 8.4, kept for callers
STORAGE_PRIVILEGES: tuple[str, ...] = ("Datastore.AllocateSpace", "Datastore.Audit")
IMPORT_STORAGE_PRIVILEGES: tuple[str, ...] = (
    "Datastore.AllocateSpace", "Datastore.AllocateTemplate", "Datastore.Audit",
)
SDN_PRIVILEGES: tuple[str, ...] = ("SDN.Use",)
NODE_PRIVILEGES: tuple[str, ...] = ("Sys.Audit",)
# Every privilege publish and deploy use (docs/pve-facts.md, "Access"): the ImageFactory role, per
# PVE major. ansible/roles/pve_factory/defaults/main.yml holds the same lists (a test compares them).


def vm_privileges(major: int) -> tuple[str, ...]:
    return (*VM_BASE_PRIVILEGES, *AGENT_PRIVILEGES[major_of(major)])


def required_privileges(major: int) -> tuple[str, ...]:
    return (*vm_privileges(major), "Datastore.AllocateSpace", "Datastore.AllocateTemplate", "Datastore.Audit",
            *SDN_PRIVILEGES, *NODE_PRIVILEGES)


def major_of(major: int) -> int:
    """The privilege catalogue a PVE major uses: 9's for anything newer (until a new catalogue appears)."""
    return min(max(major, min(AGENT_PRIVILEGES)), LATEST_MAJOR)


REQUIRED_PRIVILEGES: tuple[str, ...] = required_privileges(8)

DEFAULT_TIMEOUT = 20.0
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)(?:[.-](\d+))?")


# ------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class CheckResult(Report):
    """One check on one host. ``skipped``: not run because a check it depends on failed."""

    json_properties = ("status",)

    name: str
    ok: bool
    detail: str
    hint: str = ""
    skipped: bool = False
    warning: bool = False  # passed, but something could not be verified: the detail says what and why

    @property
    def status(self) -> str:
        return "skip" if self.skipped else ("FAIL" if not self.ok else "WARN" if self.warning else "ok")



@dataclass
class PreflightReport:
    """Results per host (inventory order), each a list of CheckResult in check order."""

    hosts: dict[str, list[CheckResult]] = field(default_factory=dict)
    checks: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(r.ok for results in self.hosts.values() for r in results)

    def host_ok(self, host: str) -> bool:
        return all(r.ok for r in self.hosts[host])

    def result(self, host: str, check: str) -> CheckResult:
        for r in self.hosts[host]:
            if r.name == check:
                return r
        raise KeyError(f"{host}: no result for check {check!r}")

    def failures(self) -> list[tuple[str, CheckResult]]:
        """Failed checks (not the ones skipped because of them), as (host, result)."""
        return [(h, r) for h, results in self.hosts.items() for r in results if not r.ok and not r.skipped]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": list(self.checks),
            "hosts": {
                h: {"ok": self.host_ok(h), "checks": [r.to_dict() for r in results]}
                for h, results in self.hosts.items()
            },
        }

    def raise_for_failures(self) -> None:
        if not self.ok:
            raise PreflightFailed(self)


class PreflightFailed(FactoryError):
    """Raised by :meth:`PreflightReport.raise_for_failures`: lists host, check, problem and fix."""

    exit_code = 3

    def __init__(self, report: PreflightReport):
        self.report = report
        self.failed = report.failures()
        lines = []
        for host, r in self.failed:
            lines.append(f"  - {host}: {r.name}: {r.detail}")
            if r.hint:
                lines.append(f"      fix: {r.hint}")
        super().__init__(f"preflight failed ({len(self.failed)} check(s)):\n" + "\n".join(lines))


# ------------------------------------------------------------------------------------- helpers


def expand_checks(checks: Iterable[str] | None) -> tuple[str, ...]:
    """Validate check names, add their prerequisites, return them in canonical order."""
    wanted = set(CHECKS if checks is None else checks)
    unknown = sorted(wanted - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown preflight check(s) {unknown} (have: {', '.join(CHECKS)})")
    for name in list(wanted):
        wanted.update(CHECKS[name].needs)
    return tuple(c for c in CHECKS if c in wanted)


def parse_version(text: str) -> tuple[int, int, int] | None:
    m = _VERSION_RE.match(text.strip())
    if not m:
        return None
    return int(m[1]), int(m[2]), int(m[3] or 0)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def split_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [p for p in re.split(r"[,;\s]+", str(value)) if p]


@dataclass(frozen=True)
class SpaceNeed:
    """How many bytes an upload needs, and where that figure comes from."""

    bytes: int
    source: str


def largest_artifact(settings: Settings, site: Site, images: Sequence[str] | None = None) -> SpaceNeed:
    """The largest built artifact (manifest artifact.disk_size, the bytes uploaded).

    Before anything is built, the catalogue's largest ``disk_size`` (the virtual size, an upper
    bound of the qcow2 file) stands in, so preflight can warn before a build is wasted.
    """
    names = list(images) if images else list(site.images)
    best: SpaceNeed | None = None
    for name in names:
        try:
            m = manifest_mod.load(settings.builds_dir / name)
        except manifest_mod.ManifestError:
            m = None
        if m is None:
            continue
        size = int(m.artifact.disk_size or 0)
        if best is None or size > best.bytes:
            best = SpaceNeed(size, f"artifact of {name} (build {m.build_id})")
    if best is not None:
        return best
    for name in names:
        img = site.images.get(name)
        if img is None:
            continue
        size = int(img.disk_size[:-1]) * (1024**3 if img.disk_size.endswith("G") else 1024**2)
        if best is None or size > best.bytes:
            best = SpaceNeed(size, f"no build yet: disk_size {img.disk_size} of {name} (upper bound)")
    return best or SpaceNeed(0, "no images")


def _token_user(token_id: str) -> str:
    return token_id.split("!", 1)[0]


def bridges_for(site: Site, hv: Hypervisor) -> list[str]:
    """The bridges this host's templates and VMs use: the host default and every NIC override."""
    names = {hv.bridge}
    for vm in site.vms_on(hv.name):
        for nic in vm.nics:
            names.add(nic.bridge or hv.bridge)
    return sorted(names)


def vlan_users(site: Site, hv: Hypervisor) -> dict[str, dict[int, list[str]]]:
    """bridge -> VLAN tag -> the NICs (``vm nicN``) of this host's VMs that use it."""
    out: dict[str, dict[int, list[str]]] = {}
    for vm in site.vms_on(hv.name):
        for n, nic in enumerate(vm.nics):
            if nic.vlan is not None:
                out.setdefault(nic.bridge or hv.bridge, {}).setdefault(nic.vlan, []).append(f"{vm.name} nic{n}")
    return out


def vlan_problems(bridge: str, iface: dict[str, Any], users: dict[int, list[str]]) -> list[str]:
    """Why ``bridge`` cannot carry the tagged NICs (none if it can): not VLAN-aware, or a VLAN outside its vids."""
    def who(tag: int) -> str:
        return f"vlan {tag} ({', '.join(users[tag])})"

    if str(iface.get("type", "")).lower() == "ovsbridge":
        return []  # an OVS bridge trunks every VLAN
    if str(iface.get("bridge_vlan_aware") or "0") not in ("1", "yes", "on"):
        return [f"bridge {bridge} is not VLAN-aware, but {', '.join(who(t) for t in sorted(users))} use VLAN tags"]
    vids = str(iface.get("bridge_vids") or DEFAULT_BRIDGE_VIDS)
    try:
        ranges = parse_vids(vids)
    except ValueError as exc:
        return [f"bridge {bridge}: bridge_vids {vids!r} does not parse ({exc})"]
    outside = [t for t in sorted(users) if not any(a <= t <= b for a, b in ranges)]
    return [f"bridge {bridge} carries VLANs {vids}, not {', '.join(who(t) for t in outside)}"] if outside else []


def required_acl(site: Site, hv: Hypervisor, major: int = 8) -> dict[str, tuple[str, ...]]:
    """ACL path -> privileges the token must hold there for this host (running PVE ``major``)."""
    need: dict[str, list[str]] = {"/vms": list(vm_privileges(major))}
    st = hv.storage
    for sid in (st.images, st.cloudinit):
        need.setdefault(f"/storage/{sid}", [])
        need[f"/storage/{sid}"] += [p for p in STORAGE_PRIVILEGES if p not in need[f"/storage/{sid}"]]
    imp = f"/storage/{st.import_}"
    need.setdefault(imp, [])
    need[imp] += [p for p in IMPORT_STORAGE_PRIVILEGES if p not in need[imp]]
    for bridge in bridges_for(site, hv):
        need[f"/sdn/zones/{SDN_ZONE}/{bridge}"] = list(SDN_PRIVILEGES)
    need[f"/nodes/{hv.node}"] = list(NODE_PRIVILEGES)
    return {path: tuple(privs) for path, privs in need.items()}


def effective_privileges(answer: Any, path: str) -> set[str]:
    """Privileges held on ``path`` from a ``GET /access/permissions?path=...`` answer.

    PVE answers ``{path: {privilege: propagate}}`` with the effective privileges on exactly that
    path (the value is the propagate flag, not whether it is held). An answer that lists ACL
    entries above the path instead is read as PVE would apply them: propagated privileges only.
    """
    held: set[str] = set()
    if not isinstance(answer, dict):
        return held
    for acl_path, privs in answer.items():
        acl_path = str(acl_path).rstrip("/") or "/"
        if isinstance(privs, dict):
            entries = {str(k): bool(v) for k, v in privs.items()}
        else:
            entries = dict.fromkeys(split_list(privs), True)
        if acl_path == path:
            held.update(entries)
        elif acl_path == "/" or path.startswith(acl_path + "/"):
            held.update(k for k, propagate in entries.items() if propagate)
    return held


# ------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Outcome:
    """What one check found on one host: ``hint`` says how to fix a failure."""

    ok: bool
    detail: str
    hint: str = ""
    skipped: bool = False
    warning: bool = False


def passed(detail: str) -> Outcome:
    return Outcome(True, detail)


def warned(detail: str, hint: str) -> Outcome:
    """Nothing wrong was found, but the check could not see everything it should: the run goes on."""
    return Outcome(True, detail, hint, warning=True)


def failed(detail: str, hint: str) -> Outcome:
    return Outcome(False, detail, hint)


@dataclass(frozen=True)
class Check:
    """One preflight check, declared once: its name, the checks it needs to have passed, whether deploy
    runs it (publish runs every check), and the step that runs it on one host."""

    name: str
    run: Callable[[_HostRun], Outcome]
    needs: tuple[str, ...]
    deploy: bool


CHECKS: dict[str, Check] = {}  # in run order: the order the checks are declared in


def check(name: str, *, needs: tuple[str, ...] = (CHECK_TLS, CHECK_TOKEN), deploy: bool = True
          ) -> Callable[[Callable[[_HostRun], Outcome]], Callable[[_HostRun], Outcome]]:
    def register(step: Callable[[_HostRun], Outcome]) -> Callable[[_HostRun], Outcome]:
        if name in CHECKS:
            raise ValueError(f"preflight check {name!r} is declared twice")
        CHECKS[name] = Check(name, step, tuple(n for n in needs if n != name), deploy)
        return step
    return register


# ------------------------------------------------------------------------------------- per host


@dataclass(eq=False)
class _HostRun:
    """Runs the checks for one hypervisor; every call is read-only."""

    settings: Settings
    site: Site
    hv: Hypervisor
    checks: tuple[str, ...]
    need: SpaceNeed
    timeout: float
    client_factory: Callable[[Hypervisor], PveClient] | None
    transport: str = "ssh"
    images: tuple[str, ...] = ()  # the catalogue images the run is for (space, firmware); () = all
    client: PveClient | None = field(default=None, init=False)
    link: SshLink | None = field(default=None, init=False)
    results: dict[str, CheckResult] = field(default_factory=dict, init=False)
    node_storage: list[dict[str, Any]] | None = field(default=None, init=False)
    version_info: dict[str, Any] = field(default_factory=dict, init=False)
    token_error: ApiError | None = field(default=None, init=False)

    def _passed(self, name: str) -> bool:
        r = self.results.get(name)
        return r is not None and r.ok

    def run(self) -> list[CheckResult]:
        try:
            for name in self.checks:
                if name in self.results:  # decided by an earlier step (an unreadable secret fails the token)
                    continue
                blockers = [p for p in CHECKS[name].needs if not self._passed(p)]
                if blockers:
                    outcome = Outcome(False, f"not run: {', '.join(blockers)} failed", skipped=True)
                else:
                    outcome = self._run_one(name)
                self.results[name] = CheckResult(name, outcome.ok, outcome.detail, outcome.hint, outcome.skipped,
                                                 outcome.warning)
        finally:
            if self.link is not None:
                self.link.close()
        return [self.results[n] for n in self.checks]

    def _run_one(self, name: str) -> Outcome:
        try:
            return CHECKS[name].run(self)
        except RemoteError as exc:
            return failed(exc.message, self._generic_hint(exc, name))
        except Exception as exc:  # noqa: BLE001 - one odd answer must not hide the other hosts' results
            return failed(f"unexpected {type(exc).__name__}: {exc}",
                          f"re-run with the same inventory; if it persists, this is a bug in the {name} check")

    def _generic_hint(self, exc: RemoteError, check: str = "") -> str:
        hv = self.hv
        if isinstance(exc, ApiError) and exc.status == 403:
            return f"grant the token the {FACTORY_ROLE} role: ansible-playbook {PLAYBOOK} -l {hv.name}"
        if check == CHECK_SPACE and not isinstance(exc, ApiError):
            return f"check SSH to {hv.ssh.user}@{hv.ssh.host}:{hv.ssh.port} and that `df` works there"
        return f"check that {hv.api_url} is the PVE API of node {hv.node} and that pveproxy runs"

    # -- checks
    @check(CHECK_TLS, needs=())
    def check_tls(self) -> Outcome:
        hv = self.hv
        how = f"CA file {hv.tls_ca_file}" if hv.tls_ca_file else f"pinned fingerprint {hv.tls_fingerprint}"
        try:
            self.client = (self.client_factory or self._default_client)(hv)
        except RemoteError as exc:  # e.g. the CA file does not exist
            return failed(exc.message, self._tls_hint())
        except FactoryError as exc:  # the token secret cannot be read: TLS is untested, the token is the fault
            self.results[CHECK_TOKEN] = CheckResult(CHECK_TOKEN, False, str(exc), self._secret_hint())
            return Outcome(False, "not run: token secret unavailable", skipped=True)
        try:
            self.version_info = self.client.version()
        except ApiError as exc:  # TLS held; the token check reports the refusal
            self.token_error = exc
        except TlsVerificationFailed as exc:
            return failed(exc.message, self._tls_hint())
        except RemoteError as exc:
            return failed(exc.message, f"check pve.api_url ({hv.api_url}) and that pveproxy runs on {hv.node} "
                                       "(`systemctl status pveproxy`) and is reachable from here")
        return passed(f"{hv.api_url} verified with {how}")

    def _default_client(self, hv: Hypervisor) -> PveClient:
        return PveClient(hv, timeout=self.timeout)

    def _tls_hint(self) -> str:
        hv = self.hv
        if hv.tls_ca_file:
            return (
                f"if {hv.node}'s certificate was renewed legitimately, copy /etc/pve/pve-root-ca.pem from the node "
                f"over a trusted channel to {hv.tls_ca_file}; otherwise find out what answers on {hv.api_url}"
            )
        return (
            f"if {hv.node}'s certificate was renewed legitimately, pin the new one: on the node run "
            f"`openssl x509 -noout -fingerprint -sha256 -in /etc/pve/local/pve-ssl.pem` and set "
            f"pve.tls_fingerprint; otherwise find out what answers on {hv.api_url}"
        )

    def _secret_hint(self) -> str:
        hv = self.hv
        return (f"put the secret of token {hv.token_id} in the {hv.token_secret_source} (it is shown once by "
                "`pveum user token add`)")

    @check(CHECK_SSH, needs=())  # deploy too: it takes its host lock over SSH
    def check_ssh(self) -> Outcome:
        hv = self.hv
        ep = hv.ssh
        link = SshLink(hv.name, ep, timeout=self.timeout)
        try:
            link.connect()
        except HostKeyMismatch as exc:
            return failed(exc.message,
                f"if {hv.node} was reinstalled or its keys rotated, confirm the new key on its console "
                f"(`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`) and put it in pve.ssh.host_key; "
                f"otherwise do not connect: something else answers on {ep.host}:{ep.port}",
            )
        except RemoteError as exc:
            return failed(exc.message,
                f"check pve.ssh (host, port, user {ep.user}, key_file) and that the factory's public key is in "
                f"~{ep.user}/.ssh/authorized_keys on {hv.node} (ansible-playbook {PLAYBOOK} -l {hv.name})",
            )
        self.link = link
        return passed(f"{ep.user}@{ep.host}:{ep.port} host key matches the pinned {ep.host_key.split()[0]}")

    @check(CHECK_TOKEN, needs=(CHECK_TLS,))
    def check_token(self) -> Outcome:
        exc = self.token_error
        hv = self.hv
        if exc is None:
            return passed(f"{hv.token_id} authenticates")
        if exc.status == 401:
            return failed(f"token {hv.token_id} is refused: {exc.pve_message}",
                f"check the token exists (`pveum user token list {_token_user(hv.token_id)}` on {hv.node}) and "
                f"that the secret in the {hv.token_secret_source} is its secret; "
                f"or create it: ansible-playbook {PLAYBOOK} -l {hv.name}",
            )
        else:
            return failed(f"GET /version with token {hv.token_id}: {exc}", self._generic_hint(exc, CHECK_TOKEN)
            )

    @property
    def major(self) -> int:
        parsed = parse_version(str(self.version_info.get("version") or self.version_info.get("release") or ""))
        return parsed[0] if parsed else 8

    @check(CHECK_VERSION)
    def check_version(self) -> Outcome:
        info = self.version_info
        text = str(info.get("version") or info.get("release") or "")
        parsed = parse_version(text)
        need = ".".join(map(str, MIN_VERSION))
        if parsed is None:
            return failed(f"cannot read the PVE version from {info!r}",
                       f"check that {self.hv.api_url} is a Proxmox VE {need}+ node")
        elif parsed[:2] < MIN_VERSION:
            return failed(f"PVE {text} on {self.hv.node} is older than {need}: `import` uploads need {need} or newer",
                f"upgrade {self.hv.node} to Proxmox VE {need} or newer (for 7.x first: pve7to8 --full, then "
                f"switch the repositories to bookworm and apt full-upgrade)",
            )
        elif parsed[0] in EOL_MAJORS:
            return passed(f"PVE {text} (warning: PVE {parsed[0]}.x reached its end of life in "
                                    f"{EOL_MAJORS[parsed[0]]}: upgrade to {LATEST_MAJOR}.x with pve{parsed[0]}to"
                                    f"{LATEST_MAJOR} --full, then re-run {PLAYBOOK})")
        else:
            return passed(f"PVE {text}")

    @check(CHECK_PRIVILEGES)
    def check_privileges(self) -> Outcome:
        assert self.client is not None
        hv = self.hv
        missing: dict[str, list[str]] = {}
        major = self.major
        for path, privs in required_acl(self.site, hv, major).items():
            answer = self.client.permissions(path)
            held = effective_privileges(answer, path)
            lack = [p for p in privs if p not in held]
            if lack:
                missing[path] = lack
        wanted = required_privileges(major)
        if not missing:
            return passed(f"{hv.token_id} holds all {len(wanted)} privileges of PVE {major_of(major)} "
                                       "where needed")
        detail = f"token {hv.token_id} lacks " + "; ".join(f"{', '.join(p)} on {path}" for path, p in missing.items())
        user = _token_user(hv.token_id)
        cmds = "; ".join(
            f"pveum acl modify {path} --users {user} --tokens '{hv.token_id}' --roles {FACTORY_ROLE}"
            for path in missing
        )
        return failed(detail,
            f"ansible-playbook {PLAYBOOK} -l {hv.name}, or on {hv.node} (PVE {major_of(major)} privilege names): "
            f"pveum role modify {FACTORY_ROLE} --privs {','.join(wanted)}; {cmds}",
        )

    def _storages(self) -> list[dict[str, Any]]:
        if self.node_storage is None:
            assert self.client is not None
            self.node_storage = self.client.storages()
        return self.node_storage

    @check(CHECK_STORAGE)
    def check_storage(self) -> Outcome:
        hv = self.hv
        st = hv.storage
        wanted: dict[str, list[str]] = {}
        # and what the VMs on this host ask for: their data disks' storages, the snippets storage for vendor data
        asked = [(d.storage, "images") for vm in self.site.vms_on(hv.name) for d in vm.disks if d.storage]
        asked += [(st.snippets, "snippets")] if st.snippets else []
        for sid, content in ((st.images, "images"), (st.cloudinit, "images"), (st.import_, "import"), *asked):
            wanted.setdefault(sid, [])
            if content not in wanted[sid]:
                wanted[sid].append(content)
        found = {str(s.get("storage")): s for s in self._storages()}
        problems: list[str] = []
        hints: list[str] = []
        for sid, contents in wanted.items():
            s = found.get(sid)
            if s is None:
                problems.append(f"storage {sid!r} not found on node {hv.node} (or not visible to the token)")
                hints.append(
                    f"check `pvesm status` on {hv.node} and pve.storage in the inventory; the token needs "
                    f"Datastore.Audit on /storage/{sid}"
                )
                continue
            if not int(s.get("enabled", 1) or 0) or not int(s.get("active", 1) or 0):
                problems.append(f"storage {sid!r} is disabled or inactive on {hv.node}")
                hints.append(f"pvesm set {sid} --disable 0, and check `pvesm status` on {hv.node}")
            have = split_list(s.get("content"))
            lack = [c for c in contents if c not in have]
            if lack:
                problems.append(
                    f"storage {sid!r} lacks content type {', '.join(lack)} (has: {','.join(have) or 'none'})"
                )
                hints.append(f"pvesm set {sid} --content {','.join([*have, *lack])}")
        if problems:
            return failed("; ".join(problems), "; ".join(hints))
        else:
            return passed("; ".join(f"{sid}: {','.join(c)}" for sid, c in wanted.items()))

    @check(CHECK_SPACE, needs=(CHECK_TLS, CHECK_TOKEN, CHECK_SSH), deploy=False)
    def check_space(self) -> Outcome:
        hv = self.hv
        need = self.need
        problems: list[str] = []
        hints: list[str] = []
        seen: list[str] = []
        sid = hv.storage.import_
        item = next((s for s in self._storages() if str(s.get("storage")) == sid), None)
        if item is None:
            problems.append(f"import storage {sid!r} not found on {hv.node}")
            hints.append("see the storage check")
        else:
            avail = int(item.get("avail") or 0)
            seen.append(f"{sid}: {human_bytes(avail)} free")
            if avail < need.bytes:
                problems.append(
                    f"import storage {sid!r} has {human_bytes(avail)} free, the largest artifact needs "
                    f"{human_bytes(need.bytes)} ({need.source})"
                )
                hints.append(f"free at least {human_bytes(need.bytes - avail)} on storage {sid} of {hv.node} "
                             f"(old uploads: `pvesm list {sid} --content import`)")
        images = next((s for s in self._storages() if str(s.get("storage")) == hv.storage.images), None)
        on_import_fs = hv.storage.images == sid and images is not None and images.get("type") == "dir"
        if images is not None and not on_import_fs:
            # the template's disk, converted from the upload: on an LVM-thin pool it takes the pool's data
            # space (the API's avail), whatever the volume's virtual size
            free = int(images.get("avail") or 0)
            what = f"{images.get('type', '?')} pool" if images.get("type") == "lvmthin" else images.get("type", "?")
            seen.append(f"{hv.storage.images} ({what}): {human_bytes(free)} free")
            if free < need.bytes:
                problems.append(f"images storage {hv.storage.images!r} ({what}) has {human_bytes(free)} free, the "
                                f"template's disk needs {human_bytes(need.bytes)} ({need.source})")
                hints.append(f"free at least {human_bytes(need.bytes - free)} on storage {hv.storage.images} of "
                             f"{hv.node} (old templates and VMs: `pvesm list {hv.storage.images}`)")
        assert self.link is not None
        # Free space is a property of a filesystem, not of a directory. An SSH upload writes the import
        # directory only; an API upload is staged in staging_dir (/var/tmp) and then COPIED into import/,
        # so both copies exist at once (docs/pve-facts.md): on a default install, where both are on the
        # root filesystem, that is twice the artifact there. A `dir` images storage that is the import
        # storage converts the disk into images/ beside them: one more copy on that filesystem.
        uses = [(hv.storage.import_dir, "import")] + ([(hv.storage.staging_dir, "staging")]
                                                       if transport_kind(self.transport).staged else [])
        if on_import_fs:
            uses.append((hv.storage.import_dir.rstrip("/").rsplit("/", 1)[0] + "/images", "images"))
        filesystems: dict[str, dict[str, Any]] = {}
        for d, what in uses:
            res = self.link.run(["df", "-Pk", "--", d], check=False, timeout=self.timeout)
            rows = [ln.split() for ln in res.stdout.splitlines()[1:] if ln.strip()]
            if res.status != 0 or not rows or len(rows[-1]) < 6:
                why = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"df exited {res.status}"
                problems.append(f"cannot measure free space in {d} on {hv.node}: {why}")
                if what in ("import", "images"):
                    hints.append(
                        f"{d} should be storage {sid}'s import/ directory: enable `import` content on {sid} "
                        f"(PVE creates the directory) or fix pve.storage.import_dir"
                    )
                else:
                    hints.append(f"create {d} on {hv.node} or fix pve.storage.staging_dir")
                continue
            mount = rows[-1][5]
            fs = filesystems.setdefault(mount, {"avail": int(rows[-1][3]) * 1024, "dirs": []})
            fs["dirs"].append(d)
        for mount, fs in filesystems.items():
            copies = len(fs["dirs"])
            wanted = need.bytes * copies
            avail = fs["avail"]
            seen.append(f"{mount} ({', '.join(fs['dirs'])}): {human_bytes(avail)} free")
            if avail < wanted:
                times = f"{copies} x " if copies > 1 else ""
                staged = any(d == hv.storage.staging_dir for d in fs["dirs"])
                reasons = [*([] if not staged else ["the API stages the upload and then copies it, both at once"]),
                           *(["the template's disk is converted into images/ beside the upload"]
                             if any(d.endswith("/images") for d in fs["dirs"]) else [])]
                problems.append(
                    f"filesystem {mount} on {hv.node} (holding {' and '.join(fs['dirs'])}) has {human_bytes(avail)} "
                    f"free, {self.transport} uploads need {times}{human_bytes(need.bytes)} there ({need.source})"
                    + (": " + "; ".join(reasons) if reasons else "")
                )
                hints.append(f"free at least {human_bytes(wanted - avail)} on {mount} of {hv.node}"
                             + (", or publish with --transport ssh (one copy fewer)" if staged else ""))
        if problems:
            return failed("; ".join(problems), "; ".join(hints))
        else:
            return passed(f"need {human_bytes(need.bytes)} ({need.source}); " + "; ".join(seen))

    @check(CHECK_BRIDGE)
    def check_bridge(self) -> Outcome:
        assert self.client is not None
        hv = self.hv
        ifaces = self.client.node_networks()
        bridges = {str(i.get("iface")): i for i in ifaces
                   if str(i.get("type", "")).lower() in ("bridge", "ovsbridge")}
        missing = [b for b in bridges_for(self.site, hv) if b not in bridges]
        have = ", ".join(sorted(bridges)) or "none"
        if missing:
            return failed(f"bridge {', '.join(missing)} does not exist on {hv.node} (has: {have})",
                f"create it on {hv.node} (/etc/network/interfaces, then ifreload -a) or fix pve.bridge / "
                f"vm.nics[].bridge in the inventory",
            )
        problems = [p for bridge, users in sorted(vlan_users(self.site, hv).items())
                    for p in vlan_problems(bridge, bridges[bridge], users)]
        if problems:
            return failed("; ".join(problems),
                       f"on {hv.node}: make the bridge VLAN-aware and list the VLANs in its bridge-vids "
                       "(/etc/network/interfaces, then ifreload -a), or fix vm.nics[].vlan in the inventory")
        tagged = sorted({tag for users in vlan_users(self.site, hv).values() for tag in users})
        return passed(", ".join(bridges_for(self.site, hv)) + " present"
                 + (f"; VLANs {format_vids([(t, t) for t in tagged])} carried" if tagged else ""))

    @check(CHECK_VMIDS)
    def check_vmids(self) -> Outcome:
        assert self.client is not None
        hv = self.hv
        guests = self.client.cluster_vms()
        foreign: list[str] = []
        owned = 0
        for g in guests:
            if g.get("node") not in (None, hv.node):
                continue
            try:
                vmid = int(g.get("vmid", -1))
            except (TypeError, ValueError):
                continue
            rng = "template_vmids" if vmid in hv.template_vmids else "vm_vmids" if vmid in hv.vm_vmids else None
            if rng is None:
                continue
            kind = str(g.get("type", "qemu"))
            tags = parse_tags(g.get("tags"))
            if kind == "qemu" and FACTORY_TAG in tags:
                owned += 1
                continue
            what = "container" if kind == "lxc" else ("template" if g.get("template") else "VM")
            foreign.append(f"{what} {vmid} ({g.get('name', '?')}) in {rng} is not tagged {FACTORY_TAG}")
        ranges = (f"templates {hv.template_vmids.first}-{hv.template_vmids.last}, "
                  f"VMs {hv.vm_vmids.first}-{hv.vm_vmids.last}")
        if foreign:
            return failed("; ".join(foreign),
                f"the factory only touches guests it made: move those guests out of the ranges on {hv.node} "
                f"or change pve.template_vmids / pve.vm_vmids in the inventory ({ranges})",
            )
        else:
            return passed(f"{ranges}: free or factory-owned ({owned} owned)")

    @check(CHECK_MACS)
    def check_macs(self) -> Outcome:
        assert self.client is not None
        uses = host_mac_uses(self.client, self.hv.name)
        collisions = site_collisions(self.site, uses)
        if collisions:
            return failed("; ".join(str(c) for c in collisions),
                       "an inventory MAC must be on its own VM only: give the inventory VM a free MAC "
                       "(invoke mac.generate --vm NAME) or change the other VM's NIC")
        else:
            count = sum(len(vm.nics) for vm in self.site.vms.values())
            return passed(f"none of the {count} inventory MACs is on another VM of {self.hv.node}")

    def factory_tags(self) -> set[str]:
        """The tags the factory sets on this host: its marker and test states, the planes, the inventory's
        roles and tags. Image and build tags are made per build and can never be listed in advance."""
        tags = {FACTORY_TAG, "tested", "untested"}
        for vm in self.site.vms_on(self.hv.name):
            tags.update(vm.all_tags)
        return tags

    @check(CHECK_TAGS)
    def check_tags(self) -> Outcome:
        """GET /cluster/options answers every user, but holds the tag policy (`user-tag-access`, an object, and
        `registered-tags`, an array) only for a caller with Sys.Audit on / (pve-manager API2/Cluster.pm
        get_options): without it the policy is unknown, never "free" (docs/pve-facts.md, Templates)."""
        assert self.client is not None
        options = self.client.cluster_options()
        held = effective_privileges(self.client.permissions("/"), "/")
        if "Sys.Modify" in held:
            return passed("the token holds Sys.Modify on /: it may set any tag whatever the datacenter tag policy")
        if not isinstance(options, dict):
            return failed(f"GET /cluster/options answered {options!r}, not an object",
                          f"check that {self.hv.api_url} is the PVE API of node {self.hv.node}")
        if "Sys.Audit" not in held:
            return warned(
                "datacenter tag policy unknown (needs Sys.Audit on /): if `user-tag-access` is not free or a "
                "factory tag is registered, deploy fails configuring a clone and, from qemu-server 9.2.0, every "
                "publish fails creating its VM (Sys.Modify for modifying tag)",
                f"on {self.hv.node} as root, check `pvesh get /cluster/options` shows no user-tag-access (free) and "
                f"none of {', '.join(sorted(self.factory_tags()))} in registered-tags; or let preflight read it: "
                f"pveum acl modify / --tokens '{self.hv.token_id}' --users {_token_user(self.hv.token_id)} "
                "--roles PVEAuditor --propagate 0")
        try:
            allow, allowed, registered = tag_policy(options)
        except ValueError as exc:
            return failed(f"GET /cluster/options: {exc}",
                          f"check that {self.hv.api_url} is the PVE API of node {self.hv.node}")
        ours = self.factory_tags()
        problems = []
        if allow in ("none", "existing"):
            problems.append(f"user-tag-access user-allow={allow}: new tags (image, build-<id>) cannot be set")
        elif allow == "list":
            problems.append(f"user-tag-access user-allow=list ({', '.join(sorted(allowed)) or 'empty'}): per-build "
                            "tags (image, build-<id>) are never on the list"
                            + (f", nor are {', '.join(sorted(ours - allowed))}" if ours - allowed else ""))
        elif allow != "free":
            problems.append(f"user-tag-access user-allow={allow} is not a policy this tool knows")
        if ours & registered:
            problems.append(f"registered-tags holds {', '.join(sorted(ours & registered))}")
        if not problems:
            return passed(f"user-tag-access user-allow={allow}; no factory tag is registered")
        return failed("; ".join(problems) + ": setting the factory's tags needs Sys.Modify on /, which "
                      "the token does not hold",
                      "on the node as root: pvesh set /cluster/options --user-tag-access user-allow=free"
                      + (f" and take {', '.join(sorted(ours & registered))} out of registered-tags"
                         if ours & registered else "") + " (Datacenter > Options > User Tag Access)")

    @check(CHECK_FIRMWARE, needs=(CHECK_TLS, CHECK_TOKEN, CHECK_VERSION, CHECK_STORAGE), deploy=False)
    def check_firmware(self) -> Outcome:
        """Every catalogue image that boots other than BIOS/i440fx: this host's PVE can make its template
        (pve.capabilities.firmware_refusals: the key set, Microsoft's 2023 CAs), and the images storage takes its EFI
        vars and TPM state volumes (content images; PVE 8 allocates the TPM state raw, 9 in the storage's format)."""
        asks = {name: img.platform for name, img in self.site.images.items()
                if not self.images or name in self.images}
        asks = {name: ask for name, ask in asks.items() if ask != Platform()}
        if not asks:
            return passed("no catalogue image asks for UEFI, a vTPM or q35")
        version = str(self.version_info.get("version") or "")
        problems = [f"{name}: {why}" for name, ask in asks.items() for why in firmware_refusals(ask, version)]
        hints = ["change the entry's keys in the catalogue, or upgrade the host as named"] if problems else []
        hv = self.hv
        images = next((s for s in self._storages() if str(s.get("storage")) == hv.storage.images), {})
        if "images" not in split_list(images.get("content")):
            problems.append(f"storage {hv.storage.images!r} cannot hold EFI vars or TPM state volumes (no content "
                            "images)")
            hints.append(f"pvesm set {hv.storage.images} --content images,<its other content types>")
        if problems:
            return failed("; ".join(problems), "; ".join(hints))
        tpm = " and TPM state (4 MiB, raw)" if self.major < 9 else " and TPM state (4 MiB)"
        return passed(f"PVE {version} makes {', '.join(f'{n} ({a.describe()})' for n, a in asks.items())}; EFI vars"
                      f"{tpm if any(a.tpm for a in asks.values()) else ''} on {hv.storage.images} "
                      f"({images.get('type', '?')})")


def tag_policy(options: dict[str, Any]) -> tuple[str, set[str], set[str]]:
    """(user-allow, user-allow-list, registered-tags) from a Sys.Audit caller's GET /cluster/options, where
    absent means PVE's default (free, none registered). Raises ValueError naming a field of another shape."""
    access = options.get("user-tag-access") or {}
    if not isinstance(access, dict):
        raise ValueError(f"user-tag-access is {access!r}, not an object")
    allow = str(access.get("user-allow") or "free")
    listed = access.get("user-allow-list") or []
    registered = options.get("registered-tags") or []
    for name, value in (("user-tag-access.user-allow-list", listed), ("registered-tags", registered)):
        if not isinstance(value, list):
            raise ValueError(f"{name} is {value!r}, not an array")
    return allow, {str(t).lower() for t in listed}, {str(t).lower() for t in registered}



ALL_CHECKS: tuple[str, ...] = tuple(CHECKS)
# publish uploads over SSH and registers templates through the API: everything.
PUBLISH_CHECKS: tuple[str, ...] = ALL_CHECKS
# deploy clones and configures through the API and holds its host lock over SSH: no upload space.
DEPLOY_CHECKS: tuple[str, ...] = tuple(c.name for c in CHECKS.values() if c.deploy)
CHECK_GROUPS: dict[str, tuple[str, ...]] = {"all": ALL_CHECKS, "publish": PUBLISH_CHECKS, "deploy": DEPLOY_CHECKS}


# ------------------------------------------------------------------------------------- entry


def run_preflight(
    settings: Settings,
    site: Site,
    hypervisors: Sequence[str | Hypervisor] | None = None,
    *,
    checks: Iterable[str] | None = None,
    images: Sequence[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    client_factory: Callable[[Hypervisor], PveClient] | None = None,
    transport: str = "ssh",
) -> PreflightReport:
    """Run the (read-only) checks on each selected hypervisor in parallel.

    ``hypervisors``: names or Hypervisor objects (default: all; unknown names raise ValidationFailed
    before anything runs).
    ``checks``: names or a group (:data:`PUBLISH_CHECKS`, :data:`DEPLOY_CHECKS`); prerequisites are
    added. ``images``: restrict the space check's "largest artifact" to these images. ``transport``: how
    publish will upload (the space an API upload needs differs, see check_space).
    """
    transport_kind(transport)  # an unknown one is the caller's mistake, not a host's failure
    names_wanted = [h if isinstance(h, str) else h.name for h in hypervisors or ()]
    selected = site.select_hypervisors(names_wanted or None)
    names = expand_checks(checks)
    need = largest_artifact(settings, site, images) if CHECK_SPACE in names else SpaceNeed(0, "")
    runs = [_HostRun(settings, site, hv, names, need, timeout, client_factory, transport, tuple(images or ()))
            for hv in selected]
    report = PreflightReport(checks=names)
    if not runs:
        return report
    # each host run turns its own failures into check results: every host has one
    done = per_host({r.hv.name: r for r in runs}, lambda r: r.run(), name="preflight")
    report.hosts.update(done.results)
    return report


def render_table(report: PreflightReport) -> Table:
    table = Table(title="preflight: " + ("all checks passed" if report.ok else "FAILED"), show_lines=False)
    for col in ("host", "check", "status", "detail", "fix"):
        table.add_column(col, overflow="fold")
    style = {"ok": "green", "WARN": "yellow", "FAIL": "bold red", "skip": "yellow"}
    for host, results in report.hosts.items():
        for r in results:
            table.add_row(host, r.name, Text(r.status, style=style[r.status]), r.detail, r.hint)
    return table
