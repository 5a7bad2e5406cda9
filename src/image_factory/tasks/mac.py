"""mac.*: the deevnet MAC namespace (docs/mac-namespace.md): generate, check, and export (handoffs.dhcp)."""

from __future__ import annotations

import sys

from invoke.collection import Collection
from invoke.context import Context

from image_factory.console import console, styled
from image_factory.handoffs import dhcp
from image_factory.handoffs.output import write_output
from image_factory.pve.livemacs import read_all, site_collisions
from image_factory.site import mac as macs
from image_factory.site.inventory import load_site
from image_factory.tasks._common import INVENTORY_HELP, SITE_HELP, exit_unless, handle_errors, settings, site, task


@task(
    positional=[],
    help={
        "vm": "inventory name of the VM (mgmt or tenant group)",
        "nic": "only this NIC index; the VM's NIC count adds a NIC (default: every NIC of the VM)",
        "inventory": INVENTORY_HELP,
    }
)
@handle_errors
def generate(c: Context, vm: str = "", nic: str | None = None, inventory: str | None = None) -> None:
    """Give a VM namespace MACs and write them into the inventory (comments and layout kept)."""
    s = settings(c, inventory=inventory)
    for ch in macs.generate(s.inventory, vm, macs.parse_nic(nic)):
        if ch.added_nic:
            console.print(f"{ch.vm} NIC {ch.nic}: added with {ch.new}  ({ch.file})")
        elif ch.changed:
            console.print(f"{ch.vm} NIC {ch.nic}: {ch.old or '(none)'} -> {ch.new}  ({ch.file})")
        else:
            console.print(f"{ch.vm} NIC {ch.nic}: {ch.new} (unchanged)")


@task(
    help={
        "inventory": INVENTORY_HELP,
        "catalogue": "image catalogue YAML (default: factory.images); the whole site model is validated too",
        "live": "also read every VM on every hypervisor (read-only) and report inventory MACs another VM "
                "carries, with host, VMID and NIC",
    }
)
@handle_errors
def check(c: Context, inventory: str | None = None, catalogue: str | None = None, live: bool = False) -> None:
    """Check every MAC against the namespace; list all problems (file, host) and exit non-zero."""
    s = settings(c, inventory=inventory, images=catalogue)
    count = macs.check(s.inventory, s.images)
    console.print(styled("[green]ok:[/] {} MAC(s) in {} follow the namespace and are unique", count, s.inventory))
    if live:
        model = load_site(s.inventory, s.images)
        uses, unreadable = read_all(model)
        collisions = site_collisions(model, uses)
        for collision in collisions:
            console.print(styled("[bold red]collision:[/] {}", collision))
        for host, why in unreadable.items():
            console.print(styled("[bold red]unreadable:[/] {}: {}", host, why))
        exit_unless(not (collisions or unreadable))
        console.print(styled("[green]ok:[/] no inventory MAC is on another VM of {}", ", ".join(model.hypervisors)))


@task(
    positional=[],
    help={
        "format": f"one of {', '.join(dhcp.FORMATS)}",
        "output": "write here (atomically) instead of stdout",
        "domain": f"DNS domain for VMs without cloudinit.searchdomain (default {dhcp.DEFAULT_DOMAIN})",
        "interfaces": "opnsense-isc only: plane=interface pairs (default mgmt=lan,tenant=opt1)",
        **SITE_HELP,
    }
)
@handle_errors
def export(
    c: Context, format: str = "", output: str | None = None, domain: str = dhcp.DEFAULT_DOMAIN,
    interfaces: str | None = None, inventory: str | None = None, catalogue: str | None = None,
) -> None:
    """DHCP reservations and DNS entries from the inventory MACs; same inventory, same bytes."""
    _, model = site(c, inventory, catalogue)
    text = dhcp.export(model, format, domain=domain, interfaces=dhcp.parse_interfaces(interfaces))
    if output:
        path = write_output(text, output)
        console.print(f"wrote {path} ({format})")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


ns = Collection("mac")
ns.add_task(generate)
ns.add_task(check)
ns.add_task(export)
