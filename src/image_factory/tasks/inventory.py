"""inventory.*: validate the site model; preflight-check the hypervisors."""

from __future__ import annotations

from invoke.collection import Collection
from invoke.context import Context
from rich.table import Table

from image_factory.console import console, emit_json, styled
from image_factory.errors import bad_flag
from image_factory.preflight import CHECK_GROUPS, render_table, run_preflight
from image_factory.site.inventory import eol_gate
from image_factory.tasks._common import SITE_HELP, exit_unless, handle_errors, json_help, site, task


@task(
    help={
        **SITE_HELP,
        "json": json_help("the summary"),
        "allow_eol": "do not count catalogue images past their end of life as errors",
    }
)
@handle_errors
def check(c: Context, inventory: str | None = None, catalogue: str | None = None, json: bool = False,
          allow_eol: bool = False) -> None:
    """Validate the inventory and image catalogue; open no connection."""
    _, model = site(c, inventory, catalogue)
    warnings = eol_gate(model.images.values(), model.images_path, allow_eol=allow_eol)
    summary = model.summary()
    summary["warnings"] = warnings
    if json:
        emit_json(summary)
        return
    for warning in warnings:
        console.print(styled("[yellow]warning:[/] {}", warning))
    table = Table(title="site model is valid")
    for col in ("hypervisor", "role", "node", "mgmt VMs", "tenant VMs"):
        table.add_column(col)
    for name, h in summary["hypervisors"].items():
        table.add_row(name, h["role"], h["node"], ", ".join(h["vms"]["mgmt"]), ", ".join(h["vms"]["tenant"]))
    console.print(table)
    placed = [f"{plane} {policy}" for plane, policy in summary["placement"].items() if policy != "pinned"]
    if placed:
        console.print("placement: " + ", ".join(placed) + " (a VM marked ? is placed on one of its hosts by deploy)")
    console.print("images: " + ", ".join(f"{n} ({i['mode']})" for n, i in summary["images"].items()))


@task(
    iterable=["hypervisor"],
    help={
        "hypervisor": "check only this hypervisor (repeatable; default: all in the inventory)",
        **SITE_HELP,
        "json": json_help("the report"),
        "checks": "comma-separated checks or a group (all, publish, deploy); default: all",
    }
)
@handle_errors
def preflight(
    c: Context, hypervisor: list[str] | None = None, inventory: str | None = None, catalogue: str | None = None,
    json: bool = False, checks: str | None = None,
) -> None:
    """Check, read-only and in parallel, that each hypervisor is ready for publish and deploy.

    TLS, SSH host key, token, PVE version, privileges, storages, free space, bridge, VM id ranges.
    Exits non-zero (3) if any check fails; each failure carries a fix hint.
    """
    cfg, model = site(c, inventory, catalogue)
    selected: tuple[str, ...] | None = None
    if checks:
        names: list[str] = []
        for part in (p.strip() for p in checks.split(",") if p.strip()):
            names.extend(CHECK_GROUPS.get(part, (part,)))
        selected = tuple(names)
    try:
        report = run_preflight(cfg, model, hypervisor or None, checks=selected)
    except ValueError as exc:  # an unknown check's name
        raise bad_flag("--checks", str(exc)) from None
    if json:
        emit_json(report.to_dict())
    else:
        console.print(render_table(report))
    if not report.ok:
        failed = report.failures()
        console.print(styled("[bold red]preflight failed:[/] {} check(s) on {}", len(failed),
                             ", ".join(sorted({h for h, _ in failed}))))
    exit_unless(report.ok, code=3)


ns = Collection("inventory")
ns.add_task(check)
ns.add_task(preflight)
