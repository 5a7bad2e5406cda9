"""publish.*: put a tested build on the hypervisors and register it as a template."""

from __future__ import annotations

from invoke.collection import Collection
from invoke.context import Context
from rich.table import Table

from image_factory import options
from image_factory.console import console, emit_json, styled
from image_factory.publish import DEFAULT_KEEP, PublishReport, check_inputs, publish_image
from image_factory.tasks._common import (
    SITE_HELP,
    dry_run_help,
    exit_plan,
    handle_errors,
    json_help,
    preflight_gate,
    site,
    task,
)


def _default_keep(c: Context) -> int:
    factory = c.config.get("factory", {}) or {}
    publish_cfg = factory.get("publish", {}) or {}
    configured = publish_cfg.get("keep", factory.get("publish_keep", DEFAULT_KEEP))
    return options.whole_number("factory.publish.keep", configured)


@task(
    iterable=["hypervisor"],
    help={
        "name": "image name from the catalogue (its build is read from builds/<name>/manifest.json)",
        "hypervisor": "publish only to this hypervisor (repeat for several; default: all)",
        "transport": "how the image travels: 'ssh' (default, resumable, fastest) or 'api' (PVE upload endpoint)",
        "keep": "templates of this image to keep per hypervisor (default: factory.publish.keep, else 3)",
        "dry_run": dry_run_help("print the plan per hypervisor (upload or skip, VMID, prunes)"),
        "json": json_help("the report"),
        "force_untested": "publish even without a passing image test for this sha256 (tagged 'untested')",
        "engine": "SSH data engine: 'auto' (openssh where the ssh client exists, else exec), 'openssh' (OpenSSH's "
                  "ssh, fastest), 'exec' (paramiko, cat into the file) or 'sftp' (fallback)",
        **SITE_HELP,
        "skip_preflight": "do not run the publish preflight checks first (they are read-only)",
        "full": "send the full image even to hosts that hold the build last published (by default they get only "
                "the changed clusters; on a fast LAN the delta's checks may cost more than the bytes it saves)",
    },
)
@handle_errors(plan="dry_run")
def template(
    c: Context, name: str, hypervisor: list[str] | None = None, transport: str = "ssh", keep: int | None = None,
    dry_run: bool = False, json: bool = False, force_untested: bool = False, engine: str = "auto",
    inventory: str | None = None, catalogue: str | None = None, skip_preflight: bool = False, full: bool = False,
) -> None:
    """Upload a tested image to every hypervisor and register it as a template (idempotent)."""
    settings, model = site(c, inventory, catalogue)
    model.select_hypervisors(hypervisor or None)
    keep_n = _keep(keep) if keep is not None else _default_keep(c)
    # the build, its test and the flags first: a dry run without a build says so without contacting a host
    check_inputs(settings, model, name, transport=transport, keep=keep_n, force_untested=force_untested,
                 engine=engine)
    if not skip_preflight:
        preflight_gate(settings, model, hypervisor or None, "publish", [name], transport=transport)
    report = publish_image(
        settings, model, name, hypervisors=hypervisor or None, transport=transport, keep=keep_n, dry_run=dry_run,
        force_untested=force_untested, progress=not json, engine=engine, delta=not full,
    )
    if json:
        emit_json(report.to_dict())
    else:
        print_report(report)
    report.raise_for_failures()
    if dry_run:
        exit_plan(blocked=False, pending=report.pending)


def _keep(value: object) -> int:
    return options.whole_number("--keep", value)


def print_report(report: PublishReport) -> None:
    title = f"{report.image} build {report.build_id} ({'tested' if report.tested else 'UNTESTED'})"
    if report.dry_run:
        title = "plan (dry run): " + title
    table = Table(title=title)
    for col in ("hypervisor", "action", "upload", "template", "sent", "time", "pruned", "notes"):
        table.add_column(col)
    for h in report.hosts:
        tpl = f"{h.template_vmid} {h.template_name}" if h.template_vmid else h.template_name
        if report.dry_run:
            pruned = ", ".join(str(p["vmid"]) for p in h.plan.get("prune", [])) or "-"
            action = h.plan.get("action", h.action) if h.ok else "failed"
        else:
            pruned = ", ".join(str(p["vmid"]) for p in h.pruned) or "-"
            action = h.action
        notes = list(h.notes) + list(h.warnings) + list(h.cleaned_up)
        if report.dry_run and h.plan.get("delta_base"):
            notes.append(f"a delta of {_size(h.plan['delta_bytes'])} against {h.plan['delta_base']}")
        if h.plan.get("remove_stale"):
            notes.append(f"stale VMs: {h.plan['remove_stale']}")
        if h.kept_for_linked_clones:
            notes.append(f"kept for linked clones: {h.kept_for_linked_clones}")
        if h.error:
            notes.insert(0, f"ERROR: {h.error}")
        table.add_row(
            h.host, action, h.upload or "-", tpl or "-", _size(h.bytes_sent), f"{h.duration_s:.1f}s", pruned,
            "\n".join(notes) or "",
        )
    console.print(table)
    if report.forced_untested:
        console.print(styled("[yellow]warning:[/] published WITHOUT a passing image test (--force-untested)"))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


ns = Collection("publish")
ns.add_task(template)
