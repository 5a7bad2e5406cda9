"""What preflight reports: one check's outcome on one host, the report over all hosts, and the failure it raises."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from image_factory.errors import FactoryError, RemoteError
from image_factory.pve.client import ApiError
from image_factory.reports import Report
from image_factory.site.inventory import Hypervisor, Site

CHECK_TLS = "tls"
CHECK_SSH = "ssh"
CHECK_TOKEN = "token"  # noqa: S105 - a check name, not a secret
CHECK_VERSION = "version"
CHECK_CLUSTER = "cluster"
CHECK_PRIVILEGES = "privileges"
CHECK_STORAGE = "storage"
CHECK_SPACE = "space"
CHECK_BRIDGE = "bridge"
CHECK_VMIDS = "vmids"
CHECK_MACS = "macs"
CHECK_TAGS = "tags"
CHECK_FIRMWARE = "firmware"

FACTORY_ROLE = "ImageFactory"
PLAYBOOK = "ansible/playbooks/hypervisor.yml"


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


def not_run(blockers: list[str]) -> Outcome:
    """Skipped: the checks it depends on failed (they carry the reason and the fix)."""
    return Outcome(False, f"not run: {', '.join(blockers)} failed", skipped=True)


def generic_hint(hv: Hypervisor, exc: RemoteError, check: str = "") -> str:
    """The fix for an API or SSH error no check explains better."""
    if isinstance(exc, ApiError) and exc.status == 403:
        return f"grant the token the {FACTORY_ROLE} role: ansible-playbook {PLAYBOOK} -l {hv.name}"
    if check == CHECK_SPACE and not isinstance(exc, ApiError):
        return f"check SSH to {hv.ssh.user}@{hv.ssh.host}:{hv.ssh.port} and that `df` works there"
    return f"check that {hv.api_url} is the PVE API of node {hv.node} and that pveproxy runs"


@dataclass(frozen=True)
class SpaceNeed:
    """How many bytes an upload needs, and where that figure comes from."""

    bytes: int
    source: str


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


def token_user(token_id: str) -> str:
    return token_id.split("!", 1)[0]


def bridges_for(site: Site, hv: Hypervisor) -> list[str]:
    """The bridges this host's templates and VMs use: the host default and every NIC override."""
    names = {hv.bridge}
    for vm in site.vms_on(hv.name):
        for nic in vm.nics:
            names.add(nic.bridge or hv.bridge)
    return sorted(names)
