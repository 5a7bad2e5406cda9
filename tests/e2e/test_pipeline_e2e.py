"""End to end, all real parts: offline base image -> real packer build (TCG) -> testinfra -> publish to
the two-host lab -> deploy the example site with its fixed MACs -> a booted guest shows its MAC.

The lab inventory mirrors the example site (same VM names, VMIDs, planes and MACs) with the offline
fixture image. Only metrics01 boots a real qemu guest (2 cores, TCG); the other VMs are started
through the API like every other and their agent answers from their configured NICs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from image_factory import deploy
from image_factory.lab.baseimage import ensure_base_image
from image_factory.lab.demo import _prove_guest
from image_factory.lab.pytest_plugin import LabHandle, running_lab
from image_factory.pipeline import run_pipeline
from image_factory.pve import codec as pvecodec
from image_factory.pve.client import PveClient
from image_factory.settings import REPO_ROOT, Settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REAL_GUEST = "metrics01"


@pytest.fixture(scope="module")
def e2e_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    ensure_base_image(Settings.from_mapping({}))
    with running_lab(tmp_path_factory.mktemp("e2e-lab"), real_boot=[REAL_GUEST]) as handle:
        yield handle


def test_whole_path_against_the_two_host_lab(e2e_lab: LabHandle, tmp_path: Path) -> None:
    settings, site = e2e_lab.settings, e2e_lab.site
    assert {vm.image for vm in site.vms.values()} == {"debian-lab"}

    # 1. pipeline: build (or reuse the cached build), test, publish to both hypervisors
    first = run_pipeline(settings, site, ["debian-lab"], progress=False)
    run = first.images[0]
    assert first.ok, run.error
    assert run.build["status"] in ("built", "cached")
    assert run.tests["status"] == "passed"
    hosts = {h["host"]: h for h in run.publish["hosts"]}
    assert set(hosts) == {"pve-mgmt", "pve-tenant"}
    assert all(h["action"] == "created" and h["template_vmid"] for h in hosts.values())

    # 2. the nightly job as CI types it: everything cached, nothing sent, JSON report on disk
    report_path = tmp_path / "pipeline.json"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "invoke"), "pipeline", "--images", "debian-lab",
         "--inventory", str(settings.inventory), "--json-file", str(report_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["ok"] is True
    (again,) = report["images"]
    assert again["build"]["status"] == "cached" and again["tests"]["cached"] is True
    assert {h["host"]: h["action"] for h in again["publish"]["hosts"]} == {
        "pve-mgmt": "unchanged", "pve-tenant": "unchanged"}
    assert sum(h["bytes_sent"] for h in again["publish"]["hosts"]) == 0

    # 3. deploy the example site: right hosts, exact inventory MACs read back through the API
    result = deploy.deploy_vms(settings, site, None, wait=True, timeout=900, progress=False)
    assert result.ok, [r.to_dict() for r in result.results if not r.ok]
    for r in result.results:
        vm = site.vms[r.plan.vm]
        hv = site.hypervisor_for(vm)
        assert r.plan.host == hv.name and hv.role == vm.plane
        config = PveClient(hv).vm_config(vm.vmid)
        macs = [pvecodec.NetSpec.parse(config[f"net{i}"]).mac for i in range(len(vm.nics))]
        assert macs == vm.macs, vm.name

    # 4. the real guest: SSH with the host key read through the guest agent, MAC seen on its NIC
    placed = {r.plan.vm: r.plan.host for r in result.results}
    guest = _prove_guest(site, REAL_GUEST, placed[REAL_GUEST], e2e_lab.paths.client_key)
    assert guest["hostname"] == REAL_GUEST
    assert guest["mac_seen"], guest["links"]

    # 5. a second deploy changes nothing
    second = deploy.deploy_vms(settings, site, None, wait=True, timeout=300, progress=False)
    assert {r.state for r in second.results} == {"unchanged"}
