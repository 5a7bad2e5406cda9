"""inventory.*: validate the site model."""

from __future__ import annotations

from invoke.collection import Collection
from invoke.context import Context
from invoke.tasks import task
from rich.table import Table

from ..console import console, emit_json
from ._common import handle_errors, site


@task(
    help={
        "inventory": "Ansible inventory file or directory (default: factory.inventory)",
        "images": "image catalogue YAML (default: factory.images)",
        "json": "print the summary as JSON on stdout",
    }
)
@handle_errors
def check(c: Context, inventory: str | None = None, images: str | None = None, json: bool = False) -> None:
    """Validate the inventory and image catalogue; open no connection."""
    _, model = site(c, inventory, images)
    summary = model.summary()
    if json:
        emit_json(summary)
        return
    table = Table(title="site model is valid")
    for col in ("hypervisor", "role", "node", "mgmt VMs", "tenant VMs"):
        table.add_column(col)
    for name, h in summary["hypervisors"].items():
        table.add_row(name, h["role"], h["node"], ", ".join(h["vms"]["mgmt"]), ", ".join(h["vms"]["tenant"]))
    console.print(table)
    console.print("images: " + ", ".join(f"{n} ({i['mode']})" for n, i in summary["images"].items()))


ns = Collection("inventory")
ns.add_task(check)
