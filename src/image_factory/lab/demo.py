"""The demo: the whole path on one machine against the built-in lab (invoke demo, ./dev demo).

Lab up, offline base image, the nightly pipeline for the fixture image, deploy of the example VMs with
their fixed MACs, and a proof over SSH that a booted guest carries its inventory MAC. It lives in the
lab package because it drives the lab; the product's stages never import it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from image_factory import deploy
from image_factory.console import console, styled
from image_factory.deploy import guest_address
from image_factory.errors import FactoryError
from image_factory.lab import baseimage, controller
from image_factory.pipeline import default_images, run_pipeline
from image_factory.pve.client import PveClient
from image_factory.pve.guest import host_key_via_agent, inspect_over_ssh
from image_factory.reports import Report
from image_factory.settings import Settings
from image_factory.site.inventory import Site


@dataclass
class DemoReport(Report):
    lab_dir: str
    inventory: str
    pipeline: dict[str, Any] = field(default_factory=dict)
    deploy: dict[str, Any] = field(default_factory=dict)
    guests: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    ok: bool = False



def run_demo(
    settings: Settings, *, real_boot: str | list[str] = "metrics01", teardown: bool = False, force: bool = False,
    timeout: float = 600.0,
) -> DemoReport:
    """Lab up, base image, pipeline for the fixture image, deploy the example VMs, prove one guest."""
    t_all = time.monotonic()
    timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(key: str, title: str) -> Iterator[None]:
        console.rule(styled("[bold]" + title))
        t0 = time.monotonic()
        yield
        timings[key] = round(time.monotonic() - t0, 1)

    with step("lab", "1/5 lab: two hypervisors on loopback"):
        paths = controller.LabPaths(settings.lab_dir)
        cfg = controller.load_config(paths) or controller.default_config(settings)
        if cfg.real_boot != real_boot:
            cfg.real_boot = real_boot
            cfg.validate(controller.example_vm_names(settings), "demo --real-boot")  # before anything stops
            controller.down(settings)  # node processes read the boot policy at start
        lab = controller.up(settings, cfg)
        lab_settings = controller.lab_settings(settings, lab.paths)
        site = lab.site()
    report = DemoReport(lab_dir=str(lab.paths.lab_dir), inventory=str(lab.inventory), timings=timings)

    with step("base_image", "2/5 offline base image (debootstrap)"):
        baseimage.ensure_base_image(settings)

    with step("pipeline", "3/5 pipeline: build, test, publish to both hypervisors"):
        pipe = run_pipeline(lab_settings, site, images=default_images(site), force=force)
        report.pipeline = pipe.to_dict()
    if not pipe.ok:
        report.timings["total"] = round(time.monotonic() - t_all, 1)
        return report

    with step("deploy", "4/5 deploy the example VMs with their fixed MACs"):
        dep = deploy.deploy_vms(lab_settings, site, None, wait=True, timeout=timeout)
        report.deploy = dep.to_dict()

    with step("prove", "5/5 prove a booted guest: SSH with a verified host key, inventory MAC on its NIC"):
        booted = [n for n in site.vms if real_boot == "all" or (isinstance(real_boot, list) and n in real_boot)
                  or n == real_boot]
        placed = {r.plan.vm: r.plan.host for r in dep.results}  # the plan's host: a plane's policy may place it
        for name in booted:
            report.guests.append(_prove_guest(site, name, placed[name], lab.paths.client_key))

    # With real boots, at least one guest must prove its MAC; --real-boot none only proves the API side.
    report.ok = dep.ok and all(g.get("mac_seen") for g in report.guests) and (bool(report.guests) or not booted)
    if teardown:
        controller.down(settings)
    report.timings["total"] = round(time.monotonic() - t_all, 1)
    return report


def _prove_guest(site: Site, name: str, host: str, client_key: Any) -> dict[str, Any]:
    vm = site.vms[name]
    hv = site.hypervisors[host]
    client = PveClient(hv)
    address = _guest_address(client, vm.vmid, vm.macs[0])
    host_key = host_key_via_agent(client, vm.vmid)
    view = inspect_over_ssh(name, address, vm.cloudinit.user, client_key, host_key)
    mac_seen = vm.macs[0].lower() in view.links.lower()
    console.print(styled("[bold]{}[/] on {}: ssh {}@{} (host key via guest agent)", name, hv.name,
                         vm.cloudinit.user, address))
    console.print(f"  hostname: {view.hostname}")
    for line in view.links.splitlines():
        console.print(f"  {line}")
    seen = "[green]seen on the NIC" if mac_seen else "[red]NOT seen"
    console.print(styled("  inventory MAC {}: " + seen, vm.macs[0]))
    return {"vm": name, "host": hv.name, "address": address, "hostname": view.hostname, "links": view.links,
            "host_key": view.host_key, "mac": vm.macs[0], "mac_seen": mac_seen}


def _guest_address(client: Any, vmid: int, mac: str) -> str:
    """The IPv4 address the guest agent reports on the NIC carrying ``mac`` (deploy's own reading)."""
    answer = client.get(f"{client.node_path}/qemu/{vmid}/agent/network-get-interfaces")
    address = guest_address(answer.get("result", []) if isinstance(answer, dict) else answer, mac)
    if address is None:
        raise FactoryError(f"VM {vmid}: the guest agent reports no IPv4 address on {mac}")
    return address
