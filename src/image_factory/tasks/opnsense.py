"""opnsense.*: OPNsense's Dnsmasq DHCP ranges (one per tenant) and host reservations from the inventory."""

from __future__ import annotations

import os
from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context
from rich.table import Table

from image_factory.console import console, emit_json, styled
from image_factory.handoffs import dhcp
from image_factory.handoffs import opnsense as opn
from image_factory.site.secrets import read_key_pair
from image_factory.tasks import _common
from image_factory.tasks._common import (
    SITE_HELP,
    dry_run_help,
    exit_plan,
    handle_errors,
    json_help,
    site,
    task,
)

CONNECTION_HELP = {
    "url": "OPNsense base URL, https only (default: $OPNSENSE_URL)",
    "key_file": "0600 file outside the repository with key=... and secret=... lines (OPNsense's apikey.txt); "
                "default: $OPNSENSE_API_KEY and $OPNSENSE_API_SECRET",
    "ca_file": "CA certificate that signed OPNsense's certificate (default: the system's CAs)",
    "fingerprint": "or: the SHA-256 fingerprint of OPNsense's certificate, pinned",
    "domain": f"DNS domain for VMs without cloudinit.searchdomain (default {dhcp.DEFAULT_DOMAIN})",
    "json": json_help("the plan (or what was done)"),
    **SITE_HELP,
    "vlan_parent": "OPNsense's interface on the trunk to the tenant bridge (e.g. vtnet1): also keep one VLAN device "
                   "per tenant on it; without it VLAN devices are left alone",
}


def _client(url: str | None, key_file: str | None, ca_file: str | None, fingerprint: str | None) -> opn.OpnsenseClient:
    base = url or os.environ.get("OPNSENSE_URL")
    if not base:
        raise opn.OpnsenseError("no OPNsense URL: pass --url or set OPNSENSE_URL")
    key, secret = read_key_pair(key_env="OPNSENSE_API_KEY", secret_env="OPNSENSE_API_SECRET",  # noqa: S106
                                file=key_file,
                                what="OPNsense API")
    return opn.OpnsenseClient(base, key, secret, ca_file=Path(ca_file).expanduser() if ca_file else None,
                              fingerprint=fingerprint)


def _show(report: opn.SyncReport, as_json: bool) -> None:
    if as_json:
        emit_json(report.to_dict())
    else:
        table = Table(title="opnsense dnsmasq ranges and hosts" + (" (dry run)" if report.dry_run else ""))
        for col in ("action", "kind", "key", "name", "change"):
            table.add_column(col, overflow="fold")
        for c in report.changes:
            if c.action == "unchanged":
                continue
            change = ", ".join(f"{k}: {a or '-'} -> {b or '-'}" for k, (a, b) in c.diff.items()) or c.why
            table.add_row(c.action, c.kind, c.key, c.name, change)
        console.print(table)
        unchanged = sum(c.action == "unchanged" for c in report.changes)
        console.print(f"{report.writes} to write, {unchanged} unchanged"
                      + (f"; reconfigured {', '.join(report.reconfigured)}" if report.reconfigured else ""))
        if report.pending and report.dry_run:
            console.print(f"to reconfigure: {', '.join(report.pending)} (saved by an earlier run, not applied yet)")
        for note in report.notes:
            console.print(f"note: {note}")
    for c in report.changes:
        if c.action in ("conflict", "blocked"):
            console.print(styled("[bold red]{}:[/] {} {}: {}", c.action, c.kind, c.name, c.why))
    if report.refused:
        console.print(styled("[bold red]refused:[/] {}", "nothing was written; resolve the conflicts and re-run"))
    if report.failed:
        console.print(styled("[bold red]write failed:[/] {}", report.failed))
    for path, why in report.reconfigure_failed.items():
        console.print(styled("[bold red]reconfigure failed:[/] {}: {}", path, why))
    if report.failed and report.reconfigured:
        console.print(styled("applied what was saved before the failure: {}", ", ".join(report.reconfigured)))
    _common.exit_unless(report.ok)


def _run(c: Context, dry_run: bool, url: str | None, key_file: str | None, ca_file: str | None,
         fingerprint: str | None, domain: str, json: bool, inventory: str | None, catalogue: str | None,
         vlan_parent: str | None) -> None:
    _, model = site(c, inventory, catalogue)
    rs = dhcp.checked_reservations(model, domain)  # mac.check's rules, before any connection
    report = opn.sync(_client(url, key_file, ca_file, fingerprint), rs, dry_run=dry_run, tenants=model.tenants,
                      vlan_parent=vlan_parent)
    _show(report, json)  # a refusal, a blocked change or a failure exits 1 here
    if dry_run:
        exit_plan(blocked=False, pending=report.writes > 0 or bool(report.pending))


@task(positional=[], help=CONNECTION_HELP)
@handle_errors(plan=True)
def plan(c: Context, url: str | None = None, key_file: str | None = None, ca_file: str | None = None,
         fingerprint: str | None = None, domain: str = dhcp.DEFAULT_DOMAIN, json: bool = False,
         inventory: str | None = None, catalogue: str | None = None, vlan_parent: str | None = None) -> None:
    """What opnsense.sync would change in OPNsense's tenant VLANs, Dnsmasq ranges and hosts (reads only).

    Exit 0: nothing to change; 2: changes pending; 1: a conflict (an entry it does not own) or an error.
    """
    _run(c, True, url, key_file, ca_file, fingerprint, domain, json, inventory, catalogue, vlan_parent)


@task(positional=[], help={**CONNECTION_HELP, "dry_run": dry_run_help("plan only (the same as opnsense.plan)")})
@handle_errors(plan="dry_run")
def sync(c: Context, dry_run: bool = False, url: str | None = None, key_file: str | None = None,
         ca_file: str | None = None, fingerprint: str | None = None, domain: str = dhcp.DEFAULT_DOMAIN,
         json: bool = False, inventory: str | None = None, catalogue: str | None = None,
         vlan_parent: str | None = None) -> None:
    """Converge OPNsense's tenant VLANs, Dnsmasq ranges and host reservations to the inventory (its own only)."""
    _run(c, dry_run, url, key_file, ca_file, fingerprint, domain, json, inventory, catalogue, vlan_parent)


ns = Collection("opnsense")
ns.add_task(plan)
ns.add_task(sync)
