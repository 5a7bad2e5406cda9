"""lab.*: bring the two-hypervisor lab up, show it, tear it down (logic in image_factory.lab)."""

from __future__ import annotations

import time

from invoke.collection import Collection
from invoke.context import Context

from image_factory.console import console, emit_json, styled
from image_factory.lab import cluster as lab_cluster
from image_factory.lab import controller
from image_factory.tasks import baseimage
from image_factory.tasks._common import handle_errors, json_help, settings, shared_help, task


def _real_boot(value: str | None) -> str | list[str] | None:
    if value is None:
        return None
    if value in ("all", "none"):
        return value
    return [v for v in value.split(",") if v]


@task(help={
    **shared_help("lab_dir"),
    "real_boot": "which started VMs boot a real qemu: all, none, or comma-separated VM names",
    "time_scale": "real seconds per PVE second for tasks and lock waits (0: tasks finish at once)",
    "durations": "add PVE-like task durations (clone, import, start, ...)",
    "wire": "put each host behind a shaped wire: lan, remote, or none (docs/lab.md)",
    "wire_layout": "with --wire: separate (a link per host) or shared (one client uplink)",
    "cluster": "a modelled PVE cluster beside the hosts: NAME or NAME:NODES (3 by default), or none (docs/lab.md)",
    "json": json_help("the lab status"),
})
@handle_errors
def up(c: Context, lab_dir: str | None = None, real_boot: str | None = None, time_scale: float | None = None,
       durations: bool = False, wire: str | None = None, wire_layout: str | None = None, cluster: str | None = None,
       json: bool = False) -> None:
    """Start the lab: per hypervisor an sshd and a fakepve API on its own 127.0.0.x (idempotent)."""
    s = settings(c, lab_dir=lab_dir)
    t0 = time.monotonic()
    cfg = controller.load_config(controller.LabPaths(s.lab_dir)) or controller.default_config(s)
    changed = False
    if real_boot is not None:
        cfg.real_boot = _real_boot(real_boot) or "none"
        changed = True
    if time_scale is not None:
        try:
            cfg.time_scale = float(time_scale)
        except ValueError:
            raise controller.LabError(f"--time-scale must be a number (got {time_scale!r})") from None
        changed = True
    if durations:
        cfg.durations = True
        changed = True
    if wire is not None or wire_layout is not None:
        profile = (cfg.wire or {}).get("profile") if wire is None else (None if wire == "none" else wire)
        layout = wire_layout or (cfg.wire or {}).get("layout", "separate")
        cfg.wire = {**(cfg.wire or {}), "profile": profile, "layout": layout} if profile else None
        changed = True
    if cluster is not None:
        lab_cluster.apply_option(cfg, cluster, "lab.up --cluster")
        changed = True
    if changed:
        cfg.validate(controller.example_vm_names(s), "lab.up options")  # before anything is stopped
        controller.down(s)  # the node processes read their config at start
    lab = controller.up(s, cfg)
    info = controller.status(s)
    if json:
        emit_json(info)
        return
    console.print(styled("[green]lab up[/] in {}s: {}", f"{time.monotonic() - t0:.1f}", lab.paths.lab_dir))
    _print_status(info)
    console.print(f"inventory: {lab.paths.inventory}   (INVOKE_FACTORY_INVENTORY={lab.paths.inventory_dir})")
    variables = controller.vault_variables(lab.paths)
    console.print("its vaulted token secret needs: export " + " ".join(f"{k}={v}" for k, v in variables.items()))


def _print_status(info: dict[str, object]) -> None:
    hosts = info.get("hosts") or {}
    assert isinstance(hosts, dict)
    for name, h in hosts.items():
        console.print(
            f"  {name:12} node={h['node']} api={h['api']} ssh={h['ssh']} "
            f"sshd_pid={h['sshd_pid'] or '-'} pve_pid={h['pve_pid'] or '-'}"
        )
        for vm in h["vms"]:
            q = vm.get("qemu") or {}
            extra = f" qemu pid={q['pid']} ssh={q['ssh_host']}:{q['ssh_port']}" if q else ""
            console.print(f"      vm {vm['vmid']} {vm['name']} {vm['status']}"
                          f"{' template' if vm['template'] else ''}{extra}")


@task(help={**shared_help("lab_dir"), "json": json_help("the status")})
@handle_errors
def status(c: Context, lab_dir: str | None = None, json: bool = False) -> None:
    """Show the lab: hosts, addresses, pids, VMs and their qemu."""
    s = settings(c, lab_dir=lab_dir)
    info = controller.status(s)
    if json:
        emit_json(info)
        return
    console.print(styled("lab {}: " + ("[green]up[/]" if info["up"] else "[yellow]down[/]"), info["lab_dir"]))
    _print_status(info)


@task(help=shared_help("lab_dir"))
@handle_errors
def down(c: Context, lab_dir: str | None = None) -> None:
    """Stop exactly the lab's tracked processes (VM qemus, API servers, sshds)."""
    s = settings(c, lab_dir=lab_dir)
    stopped = controller.down(s)
    left = controller.leftovers(s)
    console.print(f"lab down: stopped {len(stopped)} process(es)" + (f"; still running: {left}" if left else ""))


@task(help=shared_help("lab_dir"))
@handle_errors
def reset(c: Context, lab_dir: str | None = None) -> None:
    """Wipe the running lab's hosts: no VMs, templates, disks, imports, tasks or faults."""
    s = settings(c, lab_dir=lab_dir)
    controller.reset(s)
    console.print("lab reset: both hosts are empty")


ns = Collection("lab")
ns.add_task(up)
ns.add_task(status)
ns.add_task(down)
ns.add_task(reset)

ns.add_task(baseimage.base_image, name="base-image")
ns.add_task(baseimage.fetch_debs, name="fetch-debs")
