#!/usr/bin/env python3
"""deploy: 20 VMs over the two lab hypervisors with PVE-like task durations, no real boots.

Starts a throw-away lab (free slot, temporary directory, ``real_boot="none"``), registers one
tested template per host the way publish does, and deploys 12 mgmt VMs (full clones) and 8 tenant
VMs (linked clones) twice on fresh hosts:

1. fully serial: one host after the other, one VM after another (``max_workers=1``); its per-VM phase times give the
   baseline *serial critical path of the busiest host*: every clone on that host back to back
   (clones on one host must be serialised: PVE's storage lock times out after 10 s) plus the
   shortest post-clone tail (config, start, ready) of one of its VMs;
2. the normal deploy: hosts in parallel, clones serialised per host, config/start/ready overlapping.

Prints both walls and the ratios parallel/critical-path (target <= 1.15) and serial/parallel.
Durations are PVE seconds (clone_full, clone_linked, start) scaled by TIME_SCALE real s per PVE s.
Usage: .venv/bin/python bench/deploy/run.py [time_scale]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from image_factory import deploy as dep
from image_factory.lab.pytest_plugin import LabHandle, start_lab, stop_lab
from image_factory.pve.client import PveClient
from image_factory.pve.templates import DESCRIPTION_HEADER
from image_factory.site.inventory import Nic, Site

MGMT, TENANT = "pve-mgmt", "pve-tenant"
N_MGMT, N_TENANT = 12, 8
DURATIONS = {"clone_full": 8.0, "clone_linked": 3.0, "start": 2.0, "stop": 1.0}  # PVE seconds
TPL_VMID = 9000


def bench_site(site: Site) -> Site:
    """20 VMs modelled on the example site's, with their own names, ids and MACs; 1 GiB disks (the template's)."""
    mgmt = next(v for v in site.vms.values() if v.plane == "mgmt")
    tenant = next(v for v in site.vms.values() if v.plane == "tenant")
    vms = {}
    for i in range(N_MGMT):
        name = f"bench-m{i:02d}"
        vms[name] = mgmt.model_copy(update={
            "name": name, "vmid": 1500 + i, "disk_gb": 1, "hypervisor": None, "template_vmid": None,
            "nics": [Nic(mac=f"02:de:10:0f:{i + 1:02x}:00")]})
    for i in range(N_TENANT):
        name = f"bench-t{i:02d}"
        vms[name] = tenant.model_copy(update={
            "name": name, "vmid": 2500 + i, "disk_gb": 1, "hypervisor": None, "template_vmid": None,
            "nics": [Nic(mac=f"02:de:20:1f:{i + 1:02x}:00")]})
    return Site(site.inventory_path, site.images_path, site.hypervisors, vms, site.images,
                {n: str(site.inventory_path) for n in vms})


def prepare(lab: LabHandle, image_file: Path, time_scale: float) -> None:
    lab.reset()
    image = next(iter({vm.image for vm in lab.site.vms.values()}))
    for host in (MGMT, TENANT):
        hv = lab.hv(host)
        shutil.copyfile(image_file, Path(hv.storage.import_dir) / f"{image}-bench.qcow2")
        c = PveClient(hv)
        description = "\n".join([DESCRIPTION_HEADER, f"image: {image}", "build_id: bench", "digest: bench",
                                 "tested: yes", "published_at: 2026-11-25T12:00:00Z"]) + "\n"
        source = f"{hv.storage.import_}:import/{image}-bench.qcow2"
        c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=TPL_VMID, name=f"tpl-{image}-bench", memory=512, cores=1,
                   scsihw="virtio-scsi-pci", scsi0=f"{hv.storage.images}:0,import-from={source}",
                   ide2=f"{hv.storage.cloudinit}:cloudinit", boot="order=scsi0", serial0="socket", vga="serial0",
                   agent="enabled=1", net0="virtio,bridge=vmbr0",
                   tags=";".join(sorted({"image-factory", image, "build-bench", "tested"})), description=description,
                   timeout=120)
        c.run_task("POST", f"/nodes/{c.node}/qemu/{TPL_VMID}/template", timeout=60)
        lab.time_scale(host, time_scale)
        lab.durations(host, **DURATIONS)


def run(lab: LabHandle, site: Site, *, serial: bool) -> dep.DeployReport:
    if serial:  # one host after the other, one VM at a time
        reports = [dep.deploy_vms(lab.settings, site, None, plane=plane, progress=False, timeout=300, max_workers=1)
                   for plane in ("mgmt", "tenant")]
        report = dep.DeployReport([r for rep in reports for r in rep.results], False, sum(r.wall_s for r in reports))
    else:
        report = dep.deploy_vms(lab.settings, site, None, progress=False, timeout=300)
    bad = [(r.plan.vm, r.state, r.error) for r in report.results if not r.ok]
    if bad:
        raise SystemExit(f"deploy failed: {bad}")
    return report


def main() -> int:
    time_scale = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        image = Path(tmp) / "tpl.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"], check=True)
        handle, slot_lock = start_lab(Path(tmp) / "lab", real_boot="none", time_scale=time_scale)
        try:
            site = bench_site(handle.site)
            prepare(handle, image, time_scale)
            serial = run(handle, site, serial=True)
            prepare(handle, image, time_scale)
            parallel = run(handle, site, serial=False)
        finally:
            stop_lab(handle, slot_lock)
    per_host: dict[str, list[dep.VmResult]] = {}
    for r in serial.results:
        per_host.setdefault(r.plan.host, []).append(r)
    critical = {}
    for host, results in per_host.items():
        clones = sum(r.phases.get("clone", 0.0) for r in results)
        tail = min(r.phases["total"] - r.phases.get("clone", 0.0) for r in results)
        critical[host] = clones + tail
    busiest = max(critical, key=lambda h: critical[h])
    cp = critical[busiest]
    kind = "clone_full" if busiest == MGMT else "clone_linked"
    nominal = (len(per_host[busiest]) * DURATIONS[kind] + DURATIONS["start"]) * time_scale
    print(f"deploy bench: {N_MGMT} mgmt (full) + {N_TENANT} tenant (linked) VMs, time_scale {time_scale}, "
          f"durations {DURATIONS} PVE s, no real boots")
    print(f"  fully serial deploy:                 {serial.wall_s:7.2f} s")
    print(f"  serial critical path of {busiest}: {cp:7.2f} s  "
          f"({len(per_host[busiest])} clones back to back + shortest post-clone tail)")
    print(f"  nominal critical path (PVE task durations only, no API/polling time): {nominal:7.2f} s")
    print(f"  parallel deploy (hosts in parallel, clones serialised per host): {parallel.wall_s:7.2f} s")
    print(f"  ratio parallel / critical path: {parallel.wall_s / cp:.3f}  (target <= 1.15)")
    print(f"  ratio parallel / nominal critical path: {parallel.wall_s / nominal:.3f}")
    print(f"  ratio serial / parallel:        {serial.wall_s / parallel.wall_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
