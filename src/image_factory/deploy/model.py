"""What a deploy plans and reports: the plan per VM, its differing fields, the results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from image_factory.errors import FactoryError
from image_factory.pve.livemacs import MacUse
from image_factory.pve.templates import TemplateInfo
from image_factory.reports import Report

DEFAULT_TIMEOUT = 600.0

Action = Literal["create", "in-sync", "drift", "recreate", "blocked"]


class DeployError(FactoryError):
    """A deploy step failed for one VM (carried in the report, not raised out of deploy_vms)."""


class NotReady(DeployError):
    """The VM is configured and started, but the guest did not show up in time (it is kept)."""


@dataclass
class FieldDiff(Report):
    field: str
    current: Any
    desired: Any
    safe: bool

    def __str__(self) -> str:
        return f"{self.field}: {self.current!r} -> {self.desired!r}" + ("" if self.safe else " (unsafe)")


@dataclass
class VmPlan(Report):
    vm: str
    plane: str
    host: str
    node: str
    vmid: int
    action: Action
    reason: str = ""
    template: str | None = None
    template_vmid: int | None = None
    template_node: str = ""  # a cluster's template on another node (cloned from there with target): its node
    clone_mode: str = "full"
    macs: list[str] = field(default_factory=list)
    diffs: list[FieldDiff] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    running: bool | None = None
    placement: str = ""  # why this host: named, the only one, already there, or the plane's policy

    @property
    def unsafe(self) -> list[FieldDiff]:
        return [d for d in self.diffs if not d.safe]

    @property
    def safe_diffs(self) -> list[FieldDiff]:
        return [d for d in self.diffs if d.safe]

    @property
    def pending(self) -> bool:
        """deploy.vm would change this VM: create or re-create it, or correct safe drift."""
        return self.action in ("create", "recreate") or (self.action == "drift" and bool(self.safe_diffs))

    @property
    def blocked(self) -> bool:
        """deploy.vm cannot bring this VM to the inventory without someone's decision: it refuses the VM,
        or keeps unsafe drift it only reports (re-creating needs --recreate)."""
        return self.action == "blocked" or (self.action == "drift" and bool(self.unsafe))



@dataclass
class DeployPlan(Report):
    json_properties = ("counts",)

    vms: list[VmPlan]
    recreate: bool = False

    @property
    def pending(self) -> bool:
        return any(p.pending for p in self.vms)

    @property
    def blocked(self) -> bool:
        return any(p.blocked for p in self.vms)

    @property
    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in self.vms:
            counts[p.action] = counts.get(p.action, 0) + 1
        return counts


State = Literal["planned", "created", "recreated", "corrected", "unchanged", "drift-unresolved", "blocked",
                "failed", "not-ready"]


@dataclass
class VmResult:
    plan: VmPlan
    state: State = "planned"
    error: str | None = None
    cleanup: str | None = None  # "removed" | "left-incomplete" | None
    macs: list[str] = field(default_factory=list)  # read back from the API after the run
    address: str | None = None
    pending_restart: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state not in ("failed", "blocked", "not-ready")

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.plan.vm, "host": self.plan.host, "placement": self.plan.placement, "vmid": self.plan.vmid,
            "plane": self.plan.plane,
            "action": self.plan.action, "state": self.state, "error": self.error, "cleanup": self.cleanup,
            "template": self.plan.template, "template_vmid": self.plan.template_vmid,
            "macs": self.macs or self.plan.macs, "address": self.address, "pending_restart": self.pending_restart,
            "phases": {k: round(v, 3) for k, v in self.phases.items()}, "notes": self.plan.notes + self.notes,
            "diffs": [d.to_dict() for d in self.plan.diffs], "reason": self.plan.reason,
        }


@dataclass
class DeployReport:
    results: list[VmResult]
    dry_run: bool = False
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "dry_run": self.dry_run, "wall_s": round(self.wall_s, 3),
                "vms": [r.to_dict() for r in self.results]}



@dataclass
class Observed:
    """What one host looks like for one inventory VM: the facts decide() needs, gathered by gather_host."""

    entry: dict[str, Any] | None
    config: dict[str, Any] = field(default_factory=dict)
    pending_keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class HostLoad:
    """What the placement policies weigh: the node's guests (templates aside), its physical memory and the
    memory its guests are configured with (bytes, as PVE reports maxmem)."""

    guests: int = 0
    memory_total: int = 0
    memory_committed: int = 0


@dataclass
class HostState:
    templates: dict[str, list[TemplateInfo]]
    vms: dict[int, Observed]
    macs: dict[str, list[MacUse]]
    load: HostLoad = HostLoad()
    elsewhere: dict[int, str] = field(default_factory=dict)  # a cluster node's: guest ids on its peers -> node


@dataclass(frozen=True)
class Placed:
    """Where a VM goes (None: nowhere, blocked) and why, as the plan shows it."""

    host: str | None
    how: str


