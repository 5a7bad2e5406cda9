"""deploy against the two-hypervisor lab: the example site's VMs land, boot and converge.

The lab's hosts are LabPve (fakepve made PVE 8.4-like): clones get fresh random MACs, disks are real
files, clones contend for the storage lock, and a started VM named in ``real_boot`` runs a real
qemu whose guest agent answers. One VM (sandbox01, a linked clone of the Debian base image) really
boots here; the others start without qemu (the lab answers their agent from the config).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from image_factory import deploy as dep
from image_factory.errors import ValidationFailed
from image_factory.lab import controller
from image_factory.lab.baseimage import ensure_base_image
from image_factory.lab.pve import NEWER_PARAMETERS, formats
from image_factory.lab.pytest_plugin import NODE_RELEASE_IDS, NODE_RELEASES, LabHandle, running_lab
from image_factory.lab.spec import RELEASES, version_tuple
from image_factory.ownership import Marker
from image_factory.pve import codec as pvecodec
from image_factory.pve import templates
from image_factory.pve.client import PveClient
from image_factory.pve.sshlink import connect
from image_factory.settings import REPO_ROOT, Settings
from image_factory.site.inventory import Site, SshEndpoint, load_site

pytestmark = pytest.mark.lab

MGMT, TENANT = "pve-mgmt", "pve-tenant"
REAL_BOOT = "sandbox01"
BASE_IMAGE = REPO_ROOT / "builds/base/debian-13-base.qcow2"
BUILD = "20261125t1200z"
TPL_VMID = 9000


@pytest.fixture(scope="module")
def dlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    """A lab of our own: only sandbox01 boots a real qemu (2 CPU cores on this machine)."""
    with running_lab(tmp_path_factory.mktemp("deploy-lab"), real_boot=[REAL_BOOT]) as handle:
        yield handle


def publish_like_template(lab: LabHandle, host: str, image_file: Path, *, vmid: int = TPL_VMID,
                          build: str = BUILD, tested: bool = True) -> None:
    """Register a template the way publish does: import-from, cloud-init drive, agent, its tags and header."""
    hv = lab.hv(host)
    image = next(iter({vm.image for vm in lab.site.vms.values()}))
    name = f"{image}-{build}.qcow2"
    shutil.copyfile(image_file, Path(hv.storage.import_dir) / name)
    c = PveClient(hv)
    description = "\n".join([
        templates.DESCRIPTION_HEADER, f"image: {image}", f"build_id: {build}", f"digest: d-{build}",
        f"tested: {'yes' if tested else 'no'}", f"published_at: 2026-11-25T12:00:{vmid % 60:02d}Z",
    ]) + "\n"
    tags = sorted({"image-factory", image, f"build-{build}", "tested" if tested else "untested"})
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=vmid, name=f"tpl-{image}-{build}", memory=512, cores=1,
               scsihw="virtio-scsi-pci", scsi0=f"{hv.storage.images}:0,import-from={hv.storage.import_}:import/{name}",
               ide2=f"{hv.storage.cloudinit}:cloudinit", boot="order=scsi0", serial0="socket", vga="serial0",
               agent="enabled=1", net0="virtio,bridge=vmbr0", tags=";".join(tags), description=description,
               timeout=120)
    c.run_task("POST", f"/nodes/{c.node}/qemu/{vmid}/template", timeout=60)


@pytest.fixture(scope="module")
def tiny_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "tiny.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    return path


@pytest.fixture
def lab(dlab: LabHandle, tiny_image: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LabHandle]:
    """Fresh hosts, each with one tested template of the lab image (a tiny disk: nothing boots from it)."""
    monkeypatch.setattr(dep.act, "LOCK_RETRY_DELAY", 0.2)
    monkeypatch.setattr(dep.ready, "READY_POLL_INTERVAL", 0.5)
    dlab.reset()
    for host in (MGMT, TENANT):
        publish_like_template(dlab, host, tiny_image)
    yield dlab
    dlab.clear_faults()


def sized(site: Site, disk_gb: int) -> Site:
    """The lab site with every VM's disk_gb replaced (e.g. smaller than deployed: a shrink)."""
    vms = {n: vm.model_copy(update={"disk_gb": disk_gb}) for n, vm in site.vms.items()}
    return Site(site.inventory_path, site.images_path, site.hypervisors, vms, site.images, site.vm_sources)


def api_config(lab: LabHandle, host: str, vmid: int) -> dict[str, Any]:
    return PveClient(lab.hv(host)).vm_config(vmid)


def api_vmids(lab: LabHandle, host: str) -> set[int]:
    return {int(v["vmid"]) for v in PveClient(lab.hv(host)).list_vms() if not int(v.get("template") or 0)}


def errors(report: dep.DeployReport) -> list[tuple[str, str, str | None]]:
    return [(r.plan.vm, r.state, r.error or r.plan.reason) for r in report.results if not r.ok]


def deploy(lab: LabHandle, names: list[str] | None = None, *, site: Site | None = None, **kw: Any) -> dep.DeployReport:
    kw.setdefault("timeout", 120)
    kw.setdefault("progress", False)
    return dep.deploy_vms(lab.settings, site or lab.site, names, **kw)


def plan(lab: LabHandle, names: list[str]) -> dep.DeployPlan:
    return dep.plan_deploy(lab.settings, lab.site, names)


# ------------------------------------------------------------------------------------------- tests


def test_example_site_lands_with_inventory_macs_and_second_run_changes_nothing(lab: LabHandle) -> None:
    site = lab.site
    others = [n for n in site.vms if n != REAL_BOOT]
    report = deploy(lab, others)
    assert report.ok, errors(report)
    for vm in (site.vms[n] for n in others):
        host = MGMT if vm.plane == "mgmt" else TENANT
        assert vm.vmid in api_vmids(lab, host) and vm.vmid not in api_vmids(lab, lab.other(host))
        cfg = api_config(lab, host, vm.vmid)
        macs = [pvecodec.NetSpec.parse(cfg[f"net{i}"]).mac for i in range(len(vm.nics))]
        assert macs == vm.macs, f"{vm.name}: the API reads back {macs}, inventory says {vm.macs}"
        assert not any(k for k in cfg if re.fullmatch(r"net\d+", k) and int(k[3:]) >= len(vm.nics))
        assert cfg["ciuser"] == vm.cloudinit.user and str(cfg["ciupgrade"]) == "0"
        assert dep.decode_sshkeys(cfg["sshkeys"]) == vm.cloudinit.ssh_keys
        assert "%20" in cfg["sshkeys"] and " " not in cfg["sshkeys"] and "+" not in cfg["sshkeys"]
        assert cfg["ipconfig0"] == dep.ipconfig_value(vm)
        assert cfg["tags"] == ";".join(vm.all_tags)
        assert Marker.parse(cfg["description"], vm.vmid).template_vmid == TPL_VMID
        assert dep.boot_disk(cfg) == ("scsi0", vm.disk_gb * 1024**3)
        status = PveClient(lab.hv(host)).get(f"/nodes/{host}/qemu/{vm.vmid}/status/current")
        assert status["status"] == "running"
    by = {r.plan.vm: r for r in report.results}
    assert all(r.state == "created" and r.address for r in by.values())
    jump = api_config(lab, MGMT, site.vms["jump01"].vmid)
    assert jump["net1"].lower() == "virtio=02:de:10:03:01:01,bridge=vmbr1,firewall=1,tag=99"
    assert jump["ipconfig0"] == "ip=192.168.10.30/24,gw=192.168.10.1" and jump["nameserver"] == "192.168.10.1"

    again = deploy(lab, others)
    assert again.ok
    assert {r.plan.vm: r.state for r in again.results} == {n: "unchanged" for n in others}, [
        (r.plan.vm, [str(d) for d in r.plan.diffs]) for r in again.results]
    assert all(not r.plan.diffs for r in again.results)


@pytest.mark.slow
def test_really_booted_guest_has_its_inventory_mac(dlab: LabHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_base_image(Settings.from_mapping({}))  # cached; built offline on a fresh machine
    monkeypatch.setattr(dep.ready, "READY_POLL_INTERVAL", 1.0)
    lab = dlab
    lab.reset()
    publish_like_template(lab, TENANT, BASE_IMAGE)
    site = lab.site
    vm = site.vms[REAL_BOOT]
    report = deploy(lab, [REAL_BOOT], site=site, timeout=900)  # a TCG boot on a loaded machine: 6-7 min seen
    [r] = report.results
    assert r.state == "created", r.to_dict()
    assert r.macs == vm.macs and r.address
    qemu = lab.qemu(TENANT, vm.vmid)
    assert qemu is not None, "sandbox01 must run a real qemu"
    # inside the guest: log in with the lab key cloud-init installed, host key pinned from the serial console
    host, port = lab.vm_ssh_address(vm.vmid)
    host_key = _console_host_key(lab.serial_log(TENANT, vm.vmid))
    # the same key through the guest agent (agent/file-read over the verified API; PVE 9 host: FileRead)
    from image_factory.pve.guest import host_key_via_agent

    assert host_key_via_agent(PveClient(lab.hv(TENANT)), vm.vmid, timeout=60) == host_key
    ep = SshEndpoint(host=host, port=port, user=vm.cloudinit.user, host_key=host_key, key_file=lab.paths.client_key)
    with connect(vm.name, ep, timeout=30) as link:
        out = link.run(["cat", "/sys/class/net/eth0/address"])
        hostname = link.run(["hostname"])
    assert out.stdout.strip() == vm.nics[0].mac
    assert hostname.stdout.strip() == vm.name
    again = deploy(lab, [REAL_BOOT], site=site)
    assert [x.state for x in again.results] == ["unchanged"], again.to_dict()
    # the guest's own network setup fails (its DHCP client gone, its address removed): the agent reports what the
    # guest has, no IPv4 on the NIC, and so no lab address either; deploy's readiness sees a guest not ready
    with connect(vm.name, ep, timeout=30) as link:
        link.run(["sh", "-c", "nohup sudo sh -c 'sleep 1; dhclient -x eth0; ip -4 addr flush dev eth0' "
                              ">/dev/null 2>&1 &"])
    c = PveClient(lab.hv(TENANT))

    def nic0() -> dict[str, Any]:
        answer = c.vm_agent(vm.vmid, "network-get-interfaces")["result"]
        return next(i for i in answer if str(i.get("hardware-address")).lower() == vm.nics[0].mac)

    deadline = time.monotonic() + 60
    while any(a["ip-address-type"] == "ipv4" for a in nic0().get("ip-addresses") or []):
        assert time.monotonic() < deadline, nic0()
        time.sleep(0.5)
    with pytest.raises(dep.ready.NotReady, match=f"no NIC {vm.nics[0].mac} with an IPv4 address"):
        dep.ready.wait_ready(c, vm, timeout=2)


def _console_host_key(log: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        block = re.search(r"-----BEGIN SSH HOST KEY KEYS-----(.*?)-----END SSH HOST KEY KEYS-----", text, re.S)
        if block:
            m = re.search(r"(ssh-ed25519 [A-Za-z0-9+/=]+)", block.group(1))
            if m:
                return m.group(1)
        time.sleep(1)
    pytest.fail(f"no SSH host key on the guest's serial console ({log})")


def test_hand_changed_mac_shows_as_drift_and_is_corrected(lab: LabHandle) -> None:
    vm = lab.site.vms["iot-api01"]
    assert deploy(lab, [vm.name]).ok
    c = PveClient(lab.hv(TENANT))
    c.post(f"/nodes/{TENANT}/qemu/{vm.vmid}/status/stop")
    _wait_status(c, vm.vmid, "stopped")
    c.put(f"/nodes/{TENANT}/qemu/{vm.vmid}/config", net0="virtio=BC:24:11:DE:AD:01,bridge=vmbr0,firewall=1")
    [p] = plan(lab, [vm.name]).vms
    assert p.action == "drift"
    assert {d.field: (d.current, d.desired) for d in p.diffs} == {  # noqa: SIM300
        "net0.mac": ("bc:24:11:de:ad:01", vm.nics[0].mac), "status": ("stopped", "running")}
    [r] = deploy(lab, [vm.name]).results
    assert r.state == "corrected", r.to_dict()
    assert pvecodec.NetSpec.parse(api_config(lab, TENANT, vm.vmid)["net0"]).mac == vm.nics[0].mac
    assert plan(lab, [vm.name]).vms[0].action == "in-sync"


def test_a_pending_change_by_another_writer_between_read_and_write_is_refused_and_a_rerun_converges(
        lab: LabHandle) -> None:
    """PVE's digest covers the whole config file, [PENDING] included: another writer's change that lands pending
    (the VM runs) after deploy read the config makes deploy's write fail as a stale digest. Deploy writes nothing,
    says to re-run, keeps the other writer's change; the re-run converges."""
    vm = lab.site.vms["iot-api01"]
    assert deploy(lab, [vm.name], wait=False).ok
    c = PveClient(lab.hv(TENANT))
    path = f"/nodes/{TENANT}/qemu/{vm.vmid}/config"
    c.put(path, net0="virtio=BC:24:11:DE:AD:01,bridge=vmbr0,firewall=1")  # a hand change, pending (running VM)
    assert plan(lab, [vm.name]).vms[0].action == "drift"

    class Racing(PveClient):
        def update_vm_config(self, vmid: int, *, digest: str | None, timeout: float, **params: Any) -> None:
            PveClient(self.hv).put(path, cpulimit="2")  # the other writer, just before deploy's write
            super().update_vm_config(vmid, digest=digest, timeout=timeout, **params)

    [r] = deploy(lab, [vm.name], wait=False, client_factory=lambda hv: Racing(hv, timeout=20)).results
    assert r.state == "failed" and "changed after this run read it" in (r.error or ""), r.to_dict()
    pending = {i["key"]: i.get("pending") for i in c.vm_pending(vm.vmid) if "pending" in i}
    assert pending["cpulimit"] == "2" and "DE:AD:01" in pending["net0"]  # nothing of deploy's written
    [r] = deploy(lab, [vm.name], wait=False).results
    assert r.state == "corrected", r.to_dict()
    assert pvecodec.NetSpec.parse(PveClient(lab.hv(TENANT)).vm_config(vm.vmid)["net0"]).mac == vm.nics[0].mac


def test_deploy_sends_the_84_node_only_what_its_schema_defines(lab: LabHandle) -> None:
    """Clone, config, resize, start, the readiness wait (guest agent): no call to the 8.4 node carries a parameter
    or a property-string sub-key only 9.x's qemu-server defines (lab.pve.NEWER_PARAMETERS, lab.pve.formats; the
    8.4 node would refuse it): each property string is parsed with 8.4's own format."""
    sent: list[tuple[str, str, dict[str, Any]]] = []

    class Recording(PveClient):
        def call(self, method: str, path: str, /, **params: Any) -> Any:
            sent.append((method, path, dict(params)))
            return super().call(method, path, **params)

    [r] = deploy(lab, ["jump01"], client_factory=lambda hv: Recording(hv, timeout=30)).results
    assert r.ok, r.to_dict()
    newer = {name for params in NEWER_PARAMETERS.values() for name in params}
    assert {path.rsplit("/", 1)[-1] for _, path, _ in sent} >= {"clone", "config", "start", "network-get-interfaces"}
    assert [(m, p, set(params) & newer) for m, p, params in sent if set(params) & newer] == []
    walked = {key for _, _, params in sent for key in params if formats.format_of(key)}
    assert walked >= {"net0", "net1", "ipconfig0"}, walked
    release = RELEASES[lab.config.host(lab.site.hypervisor_for(lab.site.vms["jump01"]).name).pve_version]
    assert release.manager == "8.4.1"
    assert [(m, p, refused) for m, p, params in sent
            if (refused := formats.check_property_strings(params, version_tuple(release.qemu_server),
                                                          version_tuple(release.common)))] == []


def _wait_status(c: PveClient, vmid: int, want: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while c.get(f"/nodes/{c.node}/qemu/{vmid}/status/current")["status"] != want:
        assert time.monotonic() < deadline, f"VM {vmid} never became {want}"
        time.sleep(0.2)


def test_mgmt_vm_on_tenant_host_refused_before_any_api_call(lab: LabHandle) -> None:
    site = lab.site
    bad = site.vms["logs01"].model_copy(update={"hypervisor": TENANT})
    broken = Site(site.inventory_path, site.images_path, site.hypervisors, {**site.vms, "logs01": bad},
                  site.images, site.vm_sources)
    before = {h: lab.state(h)["tasks"] for h in (MGMT, TENANT)}
    calls: list[str] = []

    def spy(hv: Any) -> PveClient:
        calls.append(hv.name)
        return PveClient(hv)

    with pytest.raises(ValidationFailed, match="logs01: vm.hypervisor: refused: mgmt VMs may only run on the mgmt"):
        dep.deploy_vms(lab.settings, broken, None, progress=False, client_factory=spy)
    assert calls == []
    assert {h: lab.state(h)["tasks"] for h in (MGMT, TENANT)} == before
    assert api_vmids(lab, MGMT) == set() and api_vmids(lab, TENANT) == set()


def clone_tasks(lab: LabHandle, host: str) -> list[str]:
    """Exit statuses of the host's clone tasks, oldest first (by the pid in their UPID)."""
    tasks = PveClient(lab.hv(host)).get(f"/nodes/{host}/tasks", typefilter="qmclone", limit=500)
    tasks = [t for t in tasks if t.get("type") == "qmclone"]
    return [str(t.get("exitstatus") or t.get("status")) for t in sorted(tasks, key=lambda t: int(t["pid"]))]


def test_clone_storage_lock_timeout_is_retried(lab: LabHandle) -> None:
    """Another worker holds the storage lock: the first clone waits PVE's 10 s and fails with the lock timeout, the
    retry wins once the lock is released. The lock is released when the timeout has been seen, not after a fixed
    time (a 1.4 s hold had expired before a loaded machine sent the first clone)."""
    lab.time_scale(MGMT, 0.1)
    lab.lock_storage(MGMT, "local")
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(deploy(lab, ["runner01"])), daemon=True)
    worker.start()
    deadline = time.monotonic() + 300
    while not any("got timeout" in s for s in clone_tasks(lab, MGMT)) and time.monotonic() < deadline:
        assert worker.is_alive(), "deploy ended before its clone met the held lock"
        time.sleep(0.1)
    lab.control(MGMT).call("release_storage_lock", storage="local")
    worker.join(300)
    [r] = outcome[0].results
    assert r.state == "created", r.to_dict()
    assert pvecodec.NetSpec.parse(api_config(lab, MGMT, 1201)["net0"]).mac == "02:de:10:02:01:00"
    statuses = clone_tasks(lab, MGMT)
    assert len(statuses) >= 2 and "got timeout" in statuses[0] and statuses[-1] == "OK", statuses


@pytest.mark.parametrize(("method", "suffix"), [("POST", "/qemu/2101/config"), ("POST", "/qemu/2101/status/start")])
def test_failure_at_config_or_start_leaves_nothing_half_made(lab: LabHandle, method: str, suffix: str) -> None:
    lab.fail(TENANT, method, suffix, status=500, message="injected failure", times=1)
    report = deploy(lab, ["iot-api01"])
    [r] = report.results
    assert not report.ok and r.state == "failed" and "injected failure" in (r.error or "")
    assert r.cleanup == "removed"
    assert api_vmids(lab, TENANT) == set()
    leftovers = list((lab.paths.storage_dir(TENANT) / "images").glob("2101/*"))
    assert leftovers == [], leftovers
    [r2] = deploy(lab, ["iot-api01"]).results
    assert r2.state == "created"


def test_concurrent_deploy_of_both_hosts_serialises_clones_per_host(lab: LabHandle) -> None:
    """With PVE-like clone durations, parallel clones on one host would time out on the storage lock."""
    for h in (MGMT, TENANT):
        lab.time_scale(h, 0.05)
        lab.durations(h, clone_full=20, clone_linked=15)  # PVE s: longer than the other clone's 10 s lock wait
    report = deploy(lab, [n for n in lab.site.vms if n != REAL_BOOT])
    assert report.ok, errors(report)
    assert {r.state for r in report.results} == {"created"}


def test_disk_is_grown_to_the_inventory_size_never_shrunk(lab: LabHandle) -> None:
    vm = lab.site.vms["iot-api01"]  # 20G in the inventory; the template's disk is 1G
    [r] = deploy(lab, [vm.name], site=lab.site).results
    assert r.state == "created", r.to_dict()
    assert dep.boot_disk(api_config(lab, TENANT, vm.vmid)) == ("scsi0", 20 * 1024**3)
    [p] = dep.plan_deploy(lab.settings, sized(lab.site, 10), [vm.name]).vms
    assert [(d.field, d.safe) for d in p.diffs] == [("scsi0.size", False)]
    [r2] = deploy(lab, [vm.name], site=sized(lab.site, 10)).results
    assert r2.state == "drift-unresolved"
    assert dep.boot_disk(api_config(lab, TENANT, vm.vmid)) == ("scsi0", 20 * 1024**3)


def invoke(lab: LabHandle, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO_ROOT / ".venv/bin/invoke"), *args, "--inventory", str(lab.settings.inventory)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )


def test_cli_plan_vm_json_and_destroy(lab: LabHandle) -> None:
    import json

    planned = invoke(lab, "deploy.plan", "--plane", "tenant", "--json")
    assert planned.returncode == 2, planned.stderr  # changes pending
    assert {v["vm"]: v["action"] for v in json.loads(planned.stdout)["vms"]} == {
        "iot-api01": "create", "sandbox01": "create"}
    dry = invoke(lab, "deploy.vm", "-n", "iot-api01", "--dry-run", "--json")
    assert dry.returncode == 2 and json.loads(dry.stdout)["vms"][0]["state"] == "planned"
    assert api_vmids(lab, TENANT) == set()
    done = invoke(lab, "deploy.vm", "-n", "iot-api01", "--json")
    assert done.returncode == 0, done.stderr
    [vm] = json.loads(done.stdout)["vms"]
    assert (vm["state"], vm["macs"], vm["host"], vm["vmid"]) == ("created", ["02:de:20:11:01:00"], TENANT, 2101)
    table = invoke(lab, "deploy.vm", "-n", "iot-api01")
    assert table.returncode == 0 and "unchanged" in table.stderr and "02:de:20:11:01:00" in table.stderr
    in_sync = invoke(lab, "deploy.vm", "-n", "iot-api01", "--dry-run")
    assert in_sync.returncode == 0, in_sync.stderr  # nothing to do
    refused = invoke(lab, "deploy.destroy", "jump01")
    assert refused.returncode != 0 and "--i-know-this-is-mgmt" in refused.stderr
    gone = invoke(lab, "deploy.destroy", "iot-api01")
    assert gone.returncode == 0 and "destroyed" in gone.stderr
    assert api_vmids(lab, TENANT) == set()
    nothing = invoke(lab, "deploy.vm")
    assert nothing.returncode != 0 and "--all" in nothing.stderr


def test_two_concurrent_deploys_of_one_mgmt_vm_leave_exactly_one_running_vm(
    lab: LabHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 trials, the second run starting at a random moment of the first (half of them exactly between
    clone and config update): the host lock over SSH serialises them, the second finds the VM in sync."""
    import contextlib
    import random
    import threading

    vm = lab.site.vms["metrics01"]
    hv = lab.hv(MGMT)
    client = PveClient(hv)
    gate: dict[str, threading.Event] = {}

    def progress(enabled: bool, vms: Any) -> Any:
        def hook(name: str, text: str) -> None:
            if text.startswith("configuring") and "at-config" in gate:
                gate["at-config"].set()
                time.sleep(0.2)  # hold the first run between clone and config while the second starts
        return contextlib.nullcontext(hook if enabled else (lambda name, text: None))

    monkeypatch.setattr(dep.act, "progress_reporter", progress)
    rng = random.Random(20261128)
    outcomes = []
    for trial in range(20):
        if vm.vmid in api_vmids(lab, MGMT):
            dep.destroy_vm(lab.settings, lab.site, vm.name, allow_mgmt=True, timeout=60)
        at_config = trial % 2 == 0
        gate.clear()
        if at_config:
            gate["at-config"] = threading.Event()
        results: dict[str, dep.DeployReport] = {}

        def first(into: dict[str, dep.DeployReport]) -> None:
            into["first"] = deploy(lab, [vm.name], wait=False, progress=True)

        t = threading.Thread(target=first, args=(results,))
        t.start()
        if at_config:
            assert gate["at-config"].wait(60), f"trial {trial}: the first run never reached config"
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        results["second"] = deploy(lab, [vm.name], wait=False)
        t.join(120)
        states = sorted(r.results[0].state for r in results.values())
        mine = [v for v in client.list_vms() if int(v["vmid"]) == vm.vmid]
        cfg = client.vm_config(vm.vmid) if mine else {}
        outcomes.append((trial, at_config, states, len(mine), mine[0].get("status") if mine else None,
                         pvecodec.NetSpec.parse(cfg["net0"]).mac if cfg else None))
        assert all(r.ok for r in results.values()), (trial, [r.to_dict() for r in results.values()])
    good = [o for o in outcomes if o[3] == 1 and o[4] == "running" and o[5] == vm.macs[0]]
    assert len(good) == 20, outcomes
    # every trial: one run created it, the other found it in sync (never two creates, never a destroy)
    assert all(o[2] in (["created", "unchanged"], ["corrected", "created"]) for o in outcomes), outcomes


def test_markers_forged_through_the_api_never_cause_a_destroy(lab: LabHandle) -> None:
    """A tag and description text set through the API (as a person in the PVE UI would) are not state."""
    assert deploy(lab, ["metrics01", "sandbox01"], wait=False).ok
    for host, vmid in ((MGMT, 1101), (TENANT, 2201)):
        c = PveClient(lab.hv(host))
        cfg = c.vm_config(vmid)
        c.put(f"/nodes/{c.node}/qemu/{vmid}/config", tags=cfg["tags"] + ";factory-incomplete",
              description=cfg["description"] + "\nfactory-state: incomplete")
    for recreate in (False, True):
        report = deploy(lab, ["metrics01", "sandbox01"], wait=False, recreate=recreate, allow_mgmt=True)
        assert {r.state for r in report.results} == {"blocked"}, report.to_dict()
        assert all("not made by this tool (damaged factory marker" in r.plan.reason for r in report.results), [
            r.plan.reason for r in report.results]
    for host, vmid in ((MGMT, 1101), (TENANT, 2201)):
        assert vmid in api_vmids(lab, host)
        assert PveClient(lab.hv(host)).get(f"/nodes/{host}/qemu/{vmid}/status/current")["status"] == "running"


def test_guest_agent_answers_before_the_guest_has_an_address(lab: LabHandle) -> None:
    """Right after the start the agent reports the NIC without an address (DHCP not done yet): readiness
    waits for the address on the inventory MAC instead of taking the first answer."""
    vm = lab.site.vms["metrics01"]
    [r] = deploy(lab, [vm.name], wait=False).results
    assert r.state == "created", r.to_dict()
    c = PveClient(lab.hv(MGMT))
    first = c.get(f"/nodes/{MGMT}/qemu/{vm.vmid}/agent/network-get-interfaces")["result"]
    nic = next(i for i in first if i["hardware-address"] == vm.macs[0])
    assert nic["ip-addresses"] == []
    assert dep.guest_address(first, vm.macs[0]) is None
    address = dep.wait_ready(c, vm, timeout=30)
    assert address == lab.vm_ssh_address(vm.vmid)[0]


def test_a_bridge_without_sdn_use_is_refused_and_nothing_is_left(lab: LabHandle) -> None:
    """PVE checks SDN.Use on the bridge of every NIC written; without it the config update fails and deploy
    removes the half-made clone."""
    vm = lab.site.vms["jump01"]  # nic 1: bridge vmbr1, VLAN 99
    lab.fail(MGMT, "POST", f"/nodes/{MGMT}/qemu/{vm.vmid}/config", status=403,
             message="Permission check failed (/sdn/zones/localnetwork/vmbr1/99, SDN.Use)", times=1)
    [r] = deploy(lab, [vm.name], wait=False).results
    assert r.state == "failed" and "SDN.Use" in (r.error or "") and r.cleanup == "removed"
    assert vm.vmid not in api_vmids(lab, MGMT)


def _run_playbook(lab: LabHandle, *extra: str, callback: str = "record_json") -> subprocess.CompletedProcess[str]:
    """ansible-playbook ansible/playbooks/mgmt-vms.yml (the collection's mgmt_vms) against the lab."""
    venv = REPO_ROOT / ".venv" / "bin"
    return subprocess.run(
        [str(venv / "ansible-playbook"), "-i", str(lab.settings.inventory), "ansible/playbooks/mgmt-vms.yml",
         "-e", "factory_wait=false", *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PATH": f"{venv}:{os.environ['PATH']}", "ANSIBLE_STDOUT_CALLBACK": callback,
             "ANSIBLE_CALLBACK_PLUGINS": str(REPO_ROOT / "tests/unit/ansible_plugins/callback"),
             "ANSIBLE_NOCOLOR": "1", "PYTHONWARNINGS": "ignore"})


def _playbook(lab: LabHandle, *extra: str, ok: bool = True) -> dict[str, Any]:
    """The playbook's {vm: its item result}; ``ok``: whether the run must succeed (else fail)."""
    import json

    proc = _run_playbook(lab, *extra)
    assert (proc.returncode == 0) is ok, proc.stdout[-3000:] + proc.stderr[-2000:]
    [task] = json.loads(proc.stdout)["plays"][0]["tasks"]
    return {r["item"]: r for r in task["hosts"]["localhost"]["results"]}


def test_the_mgmt_playbook_converges_the_mgmt_plane_then_changes_nothing_and_shows_drift(lab: LabHandle) -> None:
    mgmt = {n: vm for n, vm in lab.site.vms.items() if vm.plane == "mgmt"}
    first = _playbook(lab)
    assert {n: (r["changed"], r["state"]) for n, r in first.items()} == {n: (True, "created") for n in mgmt}
    client = PveClient(lab.hv(MGMT))
    for vm in mgmt.values():
        cfg = client.vm_config(vm.vmid)
        assert [pvecodec.NetSpec.parse(cfg[f"net{i}"]).mac for i in range(len(vm.nics))] == list(vm.macs)
    assert api_vmids(lab, TENANT) == set(), "the mgmt playbook touches the mgmt plane only"

    second = _playbook(lab)
    assert {n: (r["changed"], r["action"]) for n, r in second.items()} == {n: (False, "in-sync") for n in mgmt}

    jump = mgmt["jump01"]
    client.set_vm_config(jump.vmid, memory="512")
    checked = _playbook(lab, "--check", "--diff")
    assert {n for n, r in checked.items() if r["changed"]} == {"jump01"}
    diff = checked["jump01"]["diff"]
    assert "memory: 512" in diff["before"] and f"memory: {jump.memory}" in diff["after"]
    effective = dep.gather.effective_config  # the config the next start uses (a running VM's change is pending)
    assert str(effective(client, jump.vmid)[0]["memory"]) == "512", "check mode changes nothing"
    fixed = _playbook(lab)
    assert (fixed["jump01"]["changed"], fixed["jump01"]["state"]) == (True, "corrected")
    assert str(effective(client, jump.vmid)[0]["memory"]) == str(jump.memory)
    assert _playbook(lab)["jump01"]["changed"] is False


def test_the_mgmt_playbook_fails_on_a_moved_vlan_tag_in_check_mode_and_reports_what_a_real_run_left(
        lab: LabHandle) -> None:
    """Unsafe drift (jump01's second NIC on VLAN 98 instead of 99) fails --check as it fails the real run, naming
    the field with both values; with safe drift beside it the real run corrects that, reports changed, and fails
    naming the field it left."""
    jump = lab.site.vms["jump01"]
    assert {r["state"] for r in _playbook(lab).values()} == {"created"}
    client = PveClient(lab.hv(MGMT))
    net1 = pvecodec.NetSpec.parse(client.vm_config(jump.vmid)["net1"])
    assert net1.opts["tag"] == "99"
    client.set_vm_config(jump.vmid, net1=net1.format().replace("tag=99", "tag=98"))
    field = "net1.tag: '98' -> '99'"

    shown = _run_playbook(lab, "--check", "--diff", callback="default")
    assert shown.returncode == 2, shown.stdout[-3000:]
    failed = [line for line in shown.stdout.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "(item=jump01)" in failed[0], shown.stdout[-3000:]
    assert field in shown.stdout and "recreate=true allow_mgmt=true" in shown.stdout, shown.stdout[-3000:]
    checked = _playbook(lab, "--check", "--diff", ok=False)
    jump_check = checked["jump01"]
    assert (jump_check["failed"], jump_check["changed"], jump_check["action"]) == (True, False, "drift")
    assert jump_check["unresolved"] == ["net1.tag"]
    assert jump_check["drift"] == [{"field": "net1.tag", "current": "98", "desired": "99", "safe": False}]
    assert "net1.tag: 98\n" in jump_check["diff"]["before"] and "net1.tag: 99" in jump_check["diff"]["after"]
    assert {n: r.get("failed", False) for n, r in checked.items() if n != "jump01"} == {
        n: False for n, vm in lab.site.vms.items() if vm.plane == "mgmt" and n != "jump01"}

    client.set_vm_config(jump.vmid, memory="512")  # safe drift beside the unsafe one
    mixed = _playbook(lab, "--check", "--diff", ok=False)["jump01"]
    assert (mixed["failed"], mixed["changed"]) == (True, True)
    assert field in mixed["msg"] and f"a real run corrects memory: '512' -> '{jump.memory}'" in mixed["msg"]
    assert "memory: 512" in mixed["diff"]["before"] and "net1.tag: 98" in mixed["diff"]["before"]
    effective = dep.gather.effective_config
    assert str(effective(client, jump.vmid)[0]["memory"]) == "512", "check mode changes nothing"

    real = _playbook(lab, ok=False)["jump01"]
    assert (real["failed"], real["changed"], real["state"]) == (True, True, "drift-unresolved")
    assert real["unresolved"] == ["net1.tag"] and field in real["msg"], real["msg"]
    assert f"corrected memory: '512' -> '{jump.memory}'" in real["msg"]
    config = effective(client, jump.vmid)[0]
    assert str(config["memory"]) == str(jump.memory)
    assert pvecodec.NetSpec.parse(config["net1"]).opts["tag"] == "98", "unsafe drift is never corrected in place"
    again = _playbook(lab, ok=False)["jump01"]
    assert (again["failed"], again["changed"], again["unresolved"]) == (True, False, ["net1.tag"])


def _two_tenant_site(lab: LabHandle, directory: Path) -> Site:
    """The lab's site with its two tenant VMs in two tenants (acme: VLAN 110, globex: VLAN 120)."""
    import yaml

    source = Path(lab.settings.inventory)
    text = (source / "hosts.yml" if source.is_dir() else source).read_text()
    doc = yaml.load(text, Loader=controller.InventoryLoader)  # noqa: S506 - a SafeLoader keeping !vault values
    tenant = doc["all"]["children"]["tenant"]
    tenant.setdefault("vars", {})["tenants"] = {
        "acme": {"id": 1, "vlan": 110, "subnet": "10.110.0.0/24", "gateway": "10.110.0.1",
                 "dhcp_range": {"first": "10.110.0.100", "last": "10.110.0.199"}, "domain": "acme.lab"},
        "globex": {"id": 2, "vlan": 120, "subnet": "10.120.0.0/24", "gateway": "10.120.0.1",
                   "dhcp_range": {"first": "10.120.0.100", "last": "10.120.0.199"}, "domain": "globex.lab"},
    }
    for name, which, mac in (("iot-api01", "acme", "02:de:21:11:01:00"), ("sandbox01", "globex", "02:de:22:12:01:00")):
        vm = tenant["hosts"][name]["vm"]
        vm["tenant"] = which
        vm["nics"][0]["mac"] = mac
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.yml").write_text(yaml.dump(doc, Dumper=controller.InventoryDumper, sort_keys=False))
    return load_site(directory, lab.site.images_path)


def test_a_two_tenant_site_deploys_on_its_vlans_and_preflight_names_a_missing_vlan(lab: LabHandle,
                                                                                    tmp_path: Path) -> None:
    from image_factory import preflight as pf
    from image_factory.site import mac

    site = _two_tenant_site(lab, tmp_path / "inventory")
    assert mac.check(site.inventory_path, site.images_path) == len([n for vm in site.vms.values() for n in vm.nics])
    lab.bridge_vlans(TENANT, "vmbr0", vids="100-115")
    check = pf.run_preflight(lab.settings, site, [TENANT], checks=["bridge"]).result(TENANT, "bridge")
    assert not check.ok and check.detail == "bridge vmbr0 carries VLANs 100-115, not vlan 120 (sandbox01 nic0)"
    lab.clear_faults(TENANT)
    assert pf.run_preflight(lab.settings, site, [TENANT], checks=["bridge"]).result(TENANT, "bridge").ok

    planned = dep.plan_deploy(lab.settings, site, ["iot-api01", "sandbox01"])
    assert [(p.vm, p.action, p.macs) for p in planned.vms] == [
        ("iot-api01", "create", ["02:de:21:11:01:00"]), ("sandbox01", "create", ["02:de:22:12:01:00"])]
    report = dep.deploy_vms(lab.settings, site, ["iot-api01"], timeout=120, progress=False)
    assert report.ok, errors(report)
    net0 = pvecodec.NetSpec.parse(api_config(lab, TENANT, site.vms["iot-api01"].vmid)["net0"])
    assert (net0.mac, net0.opts.get("tag")) == ("02:de:21:11:01:00", "110")
    # the tag moved under it (another tenant's VLAN): unsafe drift, reported, never corrected in place
    PveClient(lab.hv(TENANT)).set_vm_config(site.vms["iot-api01"].vmid,
                                            net0=net0.format().replace("tag=110", "tag=120"))
    [drift] = dep.plan_deploy(lab.settings, site, ["iot-api01"]).vms
    assert drift.action == "drift" and "net0.tag: '120' -> '110' (unsafe)" in drift.reason


def test_a_tenant_handed_to_tofu_keeps_the_hardware_deploy_gave_it(lab: LabHandle, tiny_image: Path,
                                                                   tmp_path: Path) -> None:
    """tenant.export as a user runs it, against a UEFI template made with publish's own parameters: the VM
    deploy made is imported with the hardware the host reports, the one still to make clones that template."""
    import json

    from image_factory.handoffs import tofu
    from image_factory.lab import factories

    site = _two_tenant_site(lab, tmp_path / "inventory")
    hv = lab.hv(TENANT)
    image = site.image(site.vms["iot-api01"].image)
    params = factories.template_config(hv, image, vmid=9001, build_id="b2", firmware="uefi")
    shutil.copyfile(tiny_image, Path(hv.storage.import_dir) / f"{image.name}-b2.qcow2")
    params["description"] = "\n".join([
        templates.DESCRIPTION_HEADER, f"image: {image.name}", "build_id: b2", "digest: d-b2", "tested: yes",
        "published_at: 2026-11-26T12:00:00Z"]) + "\n"
    params["tags"] = ";".join(sorted({"image-factory", image.name, "build-b2", "tested"}))
    c = PveClient(hv)
    c.run_task("POST", f"/nodes/{c.node}/qemu", vmid=9001, **{k: v for k, v in params.items() if k != "template"},
               timeout=120)
    c.run_task("POST", f"/nodes/{c.node}/qemu/9001/template", timeout=60)
    report = dep.deploy_vms(lab.settings, site, ["iot-api01"], timeout=120, progress=False)
    assert report.ok, errors(report)

    exported = {}
    for tenant in ("acme", "globex"):
        run = subprocess.run(
            [str(REPO_ROOT / ".venv/bin/invoke"), "tenant.export", tenant, "--output", str(tmp_path / "tofu"),
             "--inventory", str(site.inventory_path)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
        assert run.returncode == 0, run.stdout + run.stderr
        exported[tenant] = json.loads((tmp_path / "tofu" / tenant / "main.tf.json").read_text())
    vmid = site.vms["iot-api01"].vmid
    have = api_config(lab, TENANT, vmid)
    vm = exported["acme"]["resource"][tofu.RESOURCE]["iot-api01"]
    assert exported["acme"]["import"] == [{"to": f"{tofu.RESOURCE}.iot-api01", "id": f"{hv.node}/{vmid}",
                                           "provider": "proxmox.pve-tenant"}]
    efi = pvecodec.parse_props(have["efidisk0"], "file")
    assert (vm["bios"], vm["machine"], have["bios"], have["machine"]) == ("ovmf", "q35", "ovmf", "q35")
    assert vm["efi_disk"] == {"datastore_id": efi["file"].split(":")[0], "type": efi["efitype"],
                              "pre_enrolled_keys": False} and efi["efitype"] == "4m"
    assert (vm["operating_system"]["type"], vm["scsi_hardware"], vm["serial_device"], vm["vga"]["type"]) == (
        have["ostype"], have["scsihw"], [{"device": have["serial0"]}], have["vga"])
    assert (vm["cpu"], vm["on_boot"], vm["keyboard_layout"]) == (
        {"cores": int(have["cores"]), "sockets": int(have["sockets"]), "type": "qemu64"}, False, "en-us")
    assert "cpu" not in have and "onboot" not in have and "keyboard" not in have
    assert f"={vm['network_device'][0]['mac_address']}," in have["net0"], "the MAC as the host holds it"
    # globex's VM is not made yet: Tofu creates it from the same template, with the same hardware
    new = exported["globex"]["resource"][tofu.RESOURCE]["sandbox01"]
    assert "import" not in exported["globex"] and new["clone"]["vm_id"] == 9001
    assert {k: new[k] for k in ("bios", "machine", "efi_disk", "operating_system", "vga", "serial_device")} == {
        k: vm[k] for k in ("bios", "machine", "efi_disk", "operating_system", "vga", "serial_device")}
    assert [p["alias"] for p in exported["globex"]["provider"]["proxmox"]] == ["pve-tenant"]


@pytest.mark.parametrize(("host", "release"), NODE_RELEASES, ids=NODE_RELEASE_IDS)
def test_deploy_under_a_datacenter_tag_policy(lab: LabHandle, host: str, release: str) -> None:
    """A policy the factory's tags satisfy (others registered) lets deploy land; a restrictive one refuses the
    config update of the clone (PVE: Sys.Modify for modifying tag; an HTTP 403 before qemu-server 9.1.19, the
    config task's failure from it): deploy says how to fix it and removes the half-made clone. On every release."""
    lab.release(host, release)
    lab.control(host).datacenter(set={"registered-tags": "prod;secret"})
    vm = next(v for v in lab.site.vms.values() if lab.site.hypervisor_for(v).name == host and v.name != REAL_BOOT)
    [ok] = deploy(lab, [vm.name], wait=False).results
    assert ok.ok, (ok.state, ok.error)
    c = PveClient(lab.hv(host))
    assert c.version()["version"] == release
    c.wait_task(c.stop_vm(vm.vmid), timeout=60)
    c.wait_task(c.destroy_vm(vm.vmid), timeout=60)
    lab.control(host).datacenter(set={"user-tag-access": "user-allow=list,user-allow-list=image-factory"})
    [r] = deploy(lab, [vm.name], wait=False).results
    assert r.state == "failed" and "Sys.Modify for modifying tag" in (r.error or ""), (r.state, r.error)
    assert "pvesh set /cluster/options --user-tag-access user-allow=free" in (r.error or "")
    assert r.cleanup == "removed" and vm.vmid not in api_vmids(lab, host)
