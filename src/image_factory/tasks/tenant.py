"""tenant.*: hand a tenant's VMs to OpenTofu/Terraform (image_factory.handoffs.tofu)."""

from __future__ import annotations

from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context

from image_factory import deploy as dep
from image_factory.console import console
from image_factory.errors import bad_flag
from image_factory.handoffs import tofu
from image_factory.tasks._common import SITE_HELP, handle_errors, site, task

FORMATS = ("tofu",)


@task(
    help={
        "tenant": "the tenant (the tenant group's vars.tenants)",
        "format": "tofu: OpenTofu/Terraform JSON for the bpg/proxmox provider",
        "output": "directory to write <tenant>/main.tf.json into (default: tofu)",
        **SITE_HELP,
    }
)
@handle_errors
def export(c: Context, tenant: str, format: str = "tofu", output: str = "tofu",  # noqa: A002
           inventory: str | None = None, catalogue: str | None = None) -> None:
    """A tenant's VMs as OpenTofu configuration, from the deploy plan and the configs of the VMs (or the
    templates they clone): reads the hypervisors, changes nothing."""
    if format not in FORMATS:
        raise bad_flag("--format", f"unknown format {format!r} (have: tofu)")
    settings, model = site(c, inventory, catalogue)
    names = [vm.name for vm in model.vms.values() if vm.tenant == tenant]
    plan = dep.plan_deploy(settings, model, names) if names else dep.DeployPlan([])
    bases = tofu.read_bases(model, plan, tenant)
    done = tofu.write_tenant(model, plan, tenant, Path(output), bases)
    console.print(f"wrote {done.path}: {done.vms} VM(s), {done.imports} to import (already made by the factory)")


ns = Collection("tenant")
ns.add_task(export)
