"""What publish works with: the artifact, a host's plan and result, the run's report, and its errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from image_factory.errors import FactoryError
from image_factory.image.delta import Delta
from image_factory.image.manifest import Manifest
from image_factory.pve.templates import TemplateInfo
from image_factory.reports import Report
from image_factory.site.inventory import Image

DEFAULT_KEEP = 3

ProgressHook = Callable[[str, int, int], None]  # (host, completed bytes, total bytes)


class PublishError(FactoryError):
    """Publishing cannot start (bad input) or a host failed."""


class HostFailed(PublishError):
    """One host's publish cannot go on; ``reason`` is the message without the host's name (the report names it)."""

    def __init__(self, host: str, reason: str):
        self.host = host
        self.reason = reason
        super().__init__(f"{host}: {reason}")


class Delivery(Protocol):
    """What the decision needs of a transport (pve.upload.TransportKind): whether it continues a partial file, and
    whether it can rebuild an image from a delta on the host."""

    @property
    def resumable(self) -> bool: ...

    @property
    def rebuilds_delta(self) -> bool: ...


@dataclass(frozen=True)
class Artifact:
    manifest: Manifest
    image: Image
    path: Path
    size: int
    tested: bool
    forced: bool
    import_file: str
    template_name: str
    # The build's enrolled EFI variable store, for a template that imports it (Platform.own_store): the local
    # file, checked against the manifest's sha256, and its import file name on the host.
    efi_vars: Path | None = None
    efi_vars_file: str = ""
    delta: Delta | None = None  # against the artifact last published from this build directory (image/delta.py)
    no_delta: str = ""  # why no delta could be made although a base is kept (said in each host's notes)


@dataclass
class HostPlan:
    host: str
    node: str
    import_file: str
    template_name: str
    existing: TemplateInfo | None = None  # a template of this digest is already there
    same_content: bool = False  # existing is another build with the same recipe and installed packages
    upload: str = "upload"  # upload | resume | delta | skip | none
    partial_bytes: int = 0
    efi_vars_upload: str = "none"  # upload | skip | none: the build's EFI vars store, beside the disk
    delta_base: str = ""  # upload=delta: the import file the host rebuilds the image on
    delta_bytes: int = 0
    no_delta: str = ""  # why a delta made for this build is not sent to this host ("" when none was made)
    vmid: int | None = None
    stale: list[TemplateInfo] = field(default_factory=list)  # half-made factory VMs to remove
    stale_partials: list[str] = field(default_factory=list)  # partial uploads of other builds (crashed runs)
    busy: list[int] = field(default_factory=list)  # half-made VMs a task is still working on: left alone
    prune: list[TemplateInfo] = field(default_factory=list)
    keep_for_clones: dict[int, list[int]] = field(default_factory=dict)
    retention_waits: str = ""  # why nothing is pruned now (a cluster node that may hold clones is offline)

    @property
    def action(self) -> str:
        return "unchanged" if self.existing else "create"

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host, "node": self.node, "action": self.action, "upload": self.upload,
            "partial_bytes": self.partial_bytes, "import_file": self.import_file,
            "efi_vars_upload": self.efi_vars_upload,
            "delta_base": self.delta_base or None, "delta_bytes": self.delta_bytes, "no_delta": self.no_delta or None,
            "same_content_as": self.existing.build_id if self.same_content and self.existing else None,
            "vmid": self.existing.vmid if self.existing else self.vmid,
            "template_name": self.existing.name if self.existing else self.template_name,
            "remove_stale": [t.vmid for t in self.stale],
            "left_to_running_tasks": self.busy,
            "remove_partials": self.stale_partials,
            "prune": [{"vmid": t.vmid, "name": t.name, "build_id": t.build_id} for t in self.prune],
            "kept_for_linked_clones": {str(k): v for k, v in self.keep_for_clones.items()},
            "retention_waits": self.retention_waits,
        }


@dataclass
class HostResult(Report):
    json_properties = ("ok",)

    host: str
    node: str = ""
    action: str = "failed"  # created | unchanged | planned | failed
    template_vmid: int | None = None
    template_name: str = ""
    upload: str = ""  # the plan's, then what happened: uploaded | resumed | delta | skipped
    bytes_sent: int = 0
    duration_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pruned: list[dict[str, Any]] = field(default_factory=list)
    kept_for_linked_clones: dict[str, list[int]] = field(default_factory=dict)
    cleaned_up: list[str] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class PublishReport(Report):
    json_properties = ("ok", "bytes_sent")

    image: str
    build_id: str
    sha256: str
    digest: str
    transport: str
    dry_run: bool
    tested: bool
    forced_untested: bool
    keep: int
    hosts: list[HostResult] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(h.ok for h in self.hosts)

    @property
    def bytes_sent(self) -> int:
        return sum(h.bytes_sent for h in self.hosts)

    def host(self, name: str) -> HostResult:
        return next(h for h in self.hosts if h.host == name)

    @property
    def pending(self) -> bool:
        """A dry run's plan would change a host: a template to make, or templates and leftovers to remove."""
        return any(h.plan.get("action") == "create" or h.plan.get("prune") or h.plan.get("remove_stale")
                   or h.plan.get("remove_partials") for h in self.hosts)

    def failed_hosts(self) -> list[str]:
        return [h.host for h in self.hosts if not h.ok]

    def raise_for_failures(self) -> None:
        bad = [h for h in self.hosts if not h.ok]
        if bad:
            raise PublishError("publish failed on " + "; ".join(f"{h.host}: {h.error}" for h in bad))
