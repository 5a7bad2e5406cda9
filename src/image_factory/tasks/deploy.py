"""deploy.*: clone VMs from tested templates with their fixed inventory MACs; plan, converge, destroy."""

from __future__ import annotations

from invoke.collection import Collection
from invoke.context import Context

from image_factory import deploy as dep
from image_factory import options
from image_factory.console import console, emit_json, styled
from image_factory.deploy.gather import hosts_to_check
from image_factory.errors import bad_flag
from image_factory.tasks._common import (
    SITE_HELP,
    dry_run_help,
    exit_plan,
    exit_unless,
    handle_errors,
    json_help,
    preflight_gate,
    site,
    task,
)

_COMMON_HELP = {**SITE_HELP, "json": json_help("the plan/report")}
_SELECT_HELP = {
    "name": "VM name from the inventory; repeat (-n a -n b) or give a comma list (-n a,b)",
    "plane": "only VMs of this plane: mgmt or tenant",
    "all": "every VM of the inventory (or of --plane)",
    "recreate": "destroy and re-create VMs with unsafe drift (template lineage, disk shrink); "
                "the only way a drifted mgmt VM is ever re-created",
    "i_know_this_is_mgmt": "also needed (with --recreate) to re-create a running mgmt VM; no short form",
}
_LOCK_HELP = ("seconds to wait for another run's host lock (publish, retention or deploy) before stopping with "
              "whom it waited for; 0 = do not wait (default 900)")


def _names(name: list[str] | None, all_: bool, plane: str | None) -> list[str] | None:
    names = [n.strip() for item in (name or []) for n in item.split(",") if n.strip()]
    if names and all_:
        raise bad_flag("--all", "give VM names or --all, not both")
    if not names and not all_ and plane is None:
        raise bad_flag("--name", "name VMs (-n NAME), or use --all / --plane")
    return names or None


@task(
    iterable=["name"],
    help={
        **_COMMON_HELP, **_SELECT_HELP,
        "dry_run": dry_run_help("show the plan (create / in-sync / drift / recreate / blocked)"),
        "no_wait": "do not wait for the guests to report their address (tasks are still awaited)",
        "timeout": "seconds to wait for each PVE task and for each guest to become ready (default 600)",
        "skip_preflight": "do not run the deploy preflight checks first (they are read-only)",
        "lock_wait": _LOCK_HELP,
    },
)
@handle_errors(plan="dry_run")
def vm(
    c: Context, name: list[str] | None = None, plane: str | None = None, all: bool = False,  # noqa: A002
    dry_run: bool = False, no_wait: bool = False, timeout: int = int(dep.DEFAULT_TIMEOUT), recreate: bool = False,
    inventory: str | None = None, catalogue: str | None = None, json: bool = False, skip_preflight: bool = False,
    i_know_this_is_mgmt: bool = False, lock_wait: int = dep.DEFAULT_WAIT,
) -> None:
    """Deploy VMs: clone the newest tested template, write the inventory MACs, start, wait; converge drift."""
    options.seconds("--timeout", timeout)
    settings, model = site(c, inventory, catalogue)
    names = _names(name, all, plane)
    lock_wait = _lock_wait(lock_wait)
    if not skip_preflight:
        preflight_gate(settings, model, hosts_to_check(model, names, plane), "deploy")
    report = dep.deploy_vms(settings, model, names, plane=plane, dry_run=dry_run, wait=not no_wait,
                            timeout=float(timeout), recreate=recreate, allow_mgmt=i_know_this_is_mgmt,
                            progress=not json, lock_wait=lock_wait)
    if json:
        emit_json(report.to_dict())
    else:
        console.print(dep.report_table(report))
    if dry_run:
        planned = dep.DeployPlan([r.plan for r in report.results])
        exit_plan(blocked=planned.blocked, pending=planned.pending)
    if not report.ok and not json:
        console.print(styled("[bold red]not deployed:[/] {}", ", ".join(r.plan.vm for r in report.results if not r.ok)))
    exit_unless(report.ok)


def _lock_wait(value: int) -> int:
    if value < 0:
        raise bad_flag("--lock-wait", f"must be 0 or more seconds (got {value})")
    return value


@task(iterable=["name"], help={**_COMMON_HELP, **_SELECT_HELP})
@handle_errors(plan=True)
def plan(
    c: Context, name: list[str] | None = None, plane: str | None = None, all: bool = False,  # noqa: A002
    recreate: bool = False, inventory: str | None = None, catalogue: str | None = None, json: bool = False,
    i_know_this_is_mgmt: bool = False,
) -> None:
    """Show what deploy.vm would do (same as deploy.vm --dry-run); reads the hypervisors, changes nothing.

    Exit 0: every VM in sync; 2: VMs to create, re-create or correct; 1: a VM is blocked or keeps unsafe drift
    (or an error).
    """
    settings, model = site(c, inventory, catalogue)
    result = dep.plan_deploy(settings, model, _names(name, all, plane), plane=plane, recreate=recreate,
                             allow_mgmt=i_know_this_is_mgmt)
    if json:
        emit_json(result.to_dict())
    else:
        console.print(dep.plan_table(result))
    exit_plan(blocked=result.blocked, pending=result.pending)


@task(
    help={
        "name": "the inventory VM to destroy",
        "i_know_this_is_mgmt": "required to destroy a mgmt (infrastructure-critical) VM",
        "timeout": "seconds to wait for the stop and destroy tasks",
        **SITE_HELP,
        "lock_wait": _LOCK_HELP,
    }
)
@handle_errors
def destroy(
    c: Context, name: str, i_know_this_is_mgmt: bool = False, timeout: int = int(dep.DEFAULT_TIMEOUT),
    inventory: str | None = None, catalogue: str | None = None, lock_wait: int = dep.DEFAULT_WAIT,
) -> None:
    """Stop and destroy one VM this tool created (tenant VMs; mgmt VMs only with --i-know-this-is-mgmt)."""
    options.seconds("--timeout", timeout)
    settings, model = site(c, inventory, catalogue)
    console.print(dep.destroy_vm(settings, model, name, allow_mgmt=i_know_this_is_mgmt, timeout=float(timeout),
                                 lock_wait=_lock_wait(lock_wait)))


ns = Collection("deploy")
ns.add_task(vm)
ns.add_task(plan)
ns.add_task(destroy)
