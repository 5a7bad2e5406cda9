"""The nightly pipeline: for each image, build (cache-aware), test, publish to every hypervisor.

One image failing never stops the others; the report says per image and host what happened
and why, and the exit code is non-zero when any image failed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from .console import console, styled
from .errors import FactoryError
from .inventory import Site
from .settings import Settings


@dataclass
class ImageRun:
    image: str
    status: str = "pending"  # ok | failed
    stage: str = ""  # the stage that failed
    error: str = ""
    build: dict[str, Any] = field(default_factory=dict)
    tests: dict[str, Any] = field(default_factory=dict)
    publish: dict[str, Any] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)


@dataclass
class PipelineReport:
    started_at: str
    finished_at: str = ""
    total_s: float = 0.0
    images: list[ImageRun] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(run.status == "ok" for run in self.images)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def default_images(site: Site) -> list[str]:
    """Every image some VM of the inventory uses, in catalogue order."""
    used = {vm.image for vm in site.vms.values()}
    return [name for name in site.images if name in used]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_pipeline(
    settings: Settings,
    site: Site,
    images: list[str] | None = None,
    hypervisors: list[str] | None = None,
    *,
    force: bool = False,
    keep: int = 3,
    transport: str = "ssh",
    accelerator: str | None = None,
    progress: bool = True,
    preflight: bool = True,
    allow_eol: bool = False,
) -> PipelineReport:
    from . import build, imagetest, manifest, publish
    from . import preflight as pf
    from .inventory import eol_gate

    names = images or default_images(site)
    for name in names:
        site.image(name)  # unknown names fail before anything runs
    for warning in eol_gate([site.images[n] for n in names], site.images_path, allow_eol=allow_eol):
        console.print(styled("[yellow]warning:[/] {}", warning))
    hosts = [h.name for h in site.select_hypervisors(hypervisors)]
    if preflight:
        # Before a build is wasted: the hosts must be able to take what this run will publish.
        console.print(f"preflight (publish) on {', '.join(hosts)} ...")
        pf.run_preflight(settings, site, hosts, checks=pf.PUBLISH_CHECKS, images=names).raise_for_failures()
    report = PipelineReport(started_at=_now())
    started = time.monotonic()
    for name in names:
        run = ImageRun(name)
        report.images.append(run)
        image = site.images[name]
        console.rule(styled("[bold]{}", name))
        try:
            run.stage = "build"
            t0 = time.monotonic()
            outcome = build.build_image(
                settings, image, force=force, accelerator=accelerator or settings.accelerator, allow_eol=allow_eol
            )
            run.durations["build"] = round(time.monotonic() - t0, 1)
            m = outcome.manifest
            if m is None:
                raise FactoryError(f"{name}: the build produced no manifest")
            run.build = {
                "status": outcome.status, "build_id": m.build_id, "sha256": m.artifact.sha256,
                "artifact": m.artifact.path, "disk_size": m.artifact.disk_size,
                "ansible_strategy": m.ansible_strategy,
            }

            run.stage = "test"
            t0 = time.monotonic()
            if m.tested_ok():
                run.tests = {"status": "passed", "cached": True}
            else:
                result = imagetest.test_image(settings, image, outcome.build_dir)
                run.tests = {
                    "status": result.status, "passed": result.passed, "failed": result.failed,
                    "errors": result.errors, "failures": result.failures, "cached": False,
                }
                m = manifest.require(outcome.build_dir)
            run.durations["test"] = round(time.monotonic() - t0, 1)
            if not m.tested_ok():
                failing = ", ".join(run.tests.get("failures", [])[:5]) or "see the JUnit report"
                raise FactoryError(f"{name}: image tests failed ({failing}); not publishing")

            run.stage = "publish"
            t0 = time.monotonic()
            pub = publish.publish_image(
                settings, site, name, hypervisors=hypervisors, transport=transport, keep=keep, progress=progress
            )
            run.durations["publish"] = round(time.monotonic() - t0, 1)
            run.publish = pub.to_dict()
            if not pub.ok:
                raise FactoryError(f"{name}: publish failed on {', '.join(pub.failed_hosts())}")
            run.status, run.stage = "ok", ""
        except FactoryError as exc:
            run.status, run.error = "failed", str(exc)
            console.print(styled("[bold red]{} failed at {}:[/] {}", name, run.stage, exc))
    report.finished_at = _now()
    report.total_s = round(time.monotonic() - started, 1)
    return report


# ------------------------------------------------------------------------------------------- demo


@dataclass
class DemoReport:
    lab_dir: str
    inventory: str
    pipeline: dict[str, Any] = field(default_factory=dict)
    deploy: dict[str, Any] = field(default_factory=dict)
    guests: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    ok: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_demo(
    settings: Settings, *, real_boot: str | list[str] = "metrics01", teardown: bool = False, force: bool = False,
    timeout: float = 600.0,
) -> DemoReport:
    """Lab up, base image, pipeline for the fixture image, deploy the example VMs, prove one guest."""
    from . import baseimage, deploy
    from .lab import controller

    t_all = time.monotonic()
    timings: dict[str, float] = {}

    def timed(key: str, t0: float) -> None:
        timings[key] = round(time.monotonic() - t0, 1)

    console.rule(styled("[bold]1/5 lab: two hypervisors on loopback"))
    t0 = time.monotonic()
    paths = controller.LabPaths(settings.lab_dir)
    cfg = controller.load_config(paths) or controller.default_config(settings)
    if cfg.real_boot != real_boot:
        cfg.real_boot = real_boot
        cfg.validate(controller.example_vm_names(settings), "demo --real-boot")  # before anything stops
        controller.down(settings)  # node processes read the boot policy at start
    lab = controller.up(settings, cfg)
    lab_settings = controller.lab_settings(settings, lab.paths)
    site = lab.site()
    timed("lab", t0)
    report = DemoReport(lab_dir=str(lab.paths.lab_dir), inventory=str(lab.inventory), timings=timings)

    console.rule(styled("[bold]2/5 offline base image (debootstrap)"))
    t0 = time.monotonic()
    baseimage.ensure_base_image(settings)
    timed("base_image", t0)

    console.rule(styled("[bold]3/5 pipeline: build, test, publish to both hypervisors"))
    t0 = time.monotonic()
    pipe = run_pipeline(lab_settings, site, images=default_images(site), force=force)
    report.pipeline = pipe.to_dict()
    timed("pipeline", t0)
    if not pipe.ok:
        report.timings["total"] = round(time.monotonic() - t_all, 1)
        return report

    console.rule(styled("[bold]4/5 deploy the example VMs with their fixed MACs"))
    t0 = time.monotonic()
    dep = deploy.deploy_vms(lab_settings, site, None, wait=True, timeout=timeout)
    report.deploy = dep.to_dict()
    timed("deploy", t0)

    console.rule(styled("[bold]5/5 prove a booted guest: SSH with a verified host key, inventory MAC on its NIC"))
    t0 = time.monotonic()
    booted = [n for n in site.vms if real_boot == "all" or (isinstance(real_boot, list) and n in real_boot)
              or n == real_boot]
    for name in booted:
        report.guests.append(_prove_guest(site, name, lab.paths.client_key))
    timed("prove", t0)

    # With real boots, at least one guest must prove its MAC; --real-boot none only proves the API side.
    report.ok = dep.ok and all(g.get("mac_seen") for g in report.guests) and (bool(report.guests) or not booted)
    if teardown:
        controller.down(settings)
    report.timings["total"] = round(time.monotonic() - t_all, 1)
    return report


def _prove_guest(site: Site, name: str, client_key: Any) -> dict[str, Any]:
    from .guest import host_key_via_agent, inspect_over_ssh
    from .pve import PveClient

    vm = site.vms[name]
    hv = site.hypervisor_for(vm)
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
    from .deploy import guest_address

    answer = client.get(f"{client.node_path}/qemu/{vmid}/agent/network-get-interfaces")
    address = guest_address(answer.get("result", []) if isinstance(answer, dict) else answer, mac)
    if address is None:
        raise FactoryError(f"VM {vmid}: the guest agent reports no IPv4 address on {mac}")
    return address
