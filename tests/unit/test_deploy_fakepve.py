"""deploy against two in-process fakepve servers (pve-mgmt, pve-tenant) holding tested templates.

A real HTTP API (TLS verified with the fake's certificate, token from the environment) but no lab:
no sshd, no qemu. The example site's VMs are pointed at the fakes. A tiny "guest agent" thread
answers for running clones with the MACs of their config, as a booted guest would.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakepve.certs import make_cert
from fakepve.model import PveError
from fakepve.pytest_plugin import _Serving
from fakepve.server import FakePve

from image_factory import deploy as dep
from image_factory.errors import RemoteError, ValidationFailed
from image_factory.lab import factories
from image_factory.ownership import INCOMPLETE_TAG, Marker
from image_factory.pve import codec as pvecodec
from image_factory.pve import templates
from image_factory.pve.client import PveClient
from image_factory.pve.hostlock import LockBusy, LockLost
from image_factory.settings import REPO_ROOT
from image_factory.site.inventory import Site, load_site

from .example_site import flat_example

TOKEN_ID = "factory@pve!image-factory"  # noqa: S105 - an id, not a secret
HOSTS = {"pve-mgmt": ("mgmt", "fedora-44"), "pve-tenant": ("tenant", "fedora-45")}
BUILD_ID = "20261125T120000Z"


class ResizingPve(FakePve):
    """fakepve answers a qemu resize without changing anything; PVE grows the volume and the size= option."""

    def _routes_qemu(self) -> list[tuple[str, str, Any]]:
        return [*super()._routes_qemu(), ("PUT", "/nodes/{node}/qemu/{vmid}/resize", self._qm_resize)]

    async def _qm_resize(self, v: dict[str, Any], user: str) -> Any:
        vm = self.find(v["node"], v["vmid"])
        disk, size = v["disk"], str(v["size"])
        volume, _, opts = vm.config[disk].partition(",")
        props = dict(p.split("=", 1) for p in opts.split(",") if p)
        current = pvecodec.parse_size(props.get("size", "0"))
        new = current + pvecodec.parse_size(size[1:]) if size.startswith("+") else pvecodec.parse_size(size)
        if new < current:
            raise PveError(500, "shrinking disks is not supported")
        props["size"] = f"{new // 1024**3}G"

        async def body() -> None:
            vm.config[disk] = ",".join([volume] + [f"{k}={props[k]}" for k in sorted(props)])
        return await self.task(vm.node, "resize", vm.vmid, user, body, vm=vm)


@dataclass
class FakeSite:
    site: Site
    pves: dict[str, FakePve]
    inventory: Path

    def vm(self, host: str, vmid: int) -> Any:
        return self.pves[host].vm(vmid)


def add_template(pve: FakePve, node: str, vmid: int, image: str, build_id: str, *, tested: bool = True) -> None:
    """A template as publish registers it: its tags and its description header (publish.py)."""
    tags = sorted({image, f"build-{build_id.lower()}", "image-factory", "tested" if tested else "untested"})
    description = "\n".join([
        templates.DESCRIPTION_HEADER, f"image: {image}", f"build_id: {build_id}", f"digest: d-{build_id}",
        f"tested: {'yes' if tested else 'no'}", f"published_at: {build_id}",
    ]) + "\n"
    pve.add_vm(vmid, f"tpl-{image}-{build_id}", node=node, template=True, config={
        "scsi0": f"local-lvm:base-{vmid}-disk-0,size=10G", "scsihw": "virtio-scsi-pci",
        "ide2": f"local-lvm:vm-{vmid}-cloudinit,media=cdrom", "boot": "order=scsi0",
        "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0", "agent": "enabled=1", "serial0": "socket",
        "vga": "serial0", "memory": "2048", "cores": 2, "template": 1, "tags": ";".join(tags),
        "description": description,
    })
    store = pve.storages["local-lvm"].setdefault("volumes", {})
    store[f"base-{vmid}-disk-0"] = {"content": "images", "format": "raw", "size": 10 * 1024**3, "vmid": vmid,
                                    "ctime": 0}


def fake_agents(pves: dict[str, FakePve], stop: threading.Event) -> None:
    """A guest agent for every running clone: reports the NIC MACs from the config with an address."""
    while not stop.is_set():
        for pve in pves.values():
            for vm in list(pve.vms):
                if vm.status == "running" and vm.agent is None and not vm.template:
                    ifaces = [{"name": "lo", "hardware-address": "00:00:00:00:00:00",
                               "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4"}]}]
                    for key in sorted(k for k in vm.config if k.startswith("net")):
                        mac = vm.config[key].split(",")[0].split("=")[1].lower()
                        ifaces.append({"name": f"eth{key[3:]}", "hardware-address": mac, "ip-addresses": [
                            {"ip-address": f"10.9.0.{vm.vmid % 250}", "ip-address-type": "ipv4", "prefix": 24}]})
                    vm.agent = {"interfaces": ifaces}
        time.sleep(0.05)


def fake_site(tmp: Path, monkeypatch: Any, *, time_scale: float = 0.0) -> Iterator[FakeSite]:
    cert, key, _ = make_cert(str(tmp), hosts=("127.0.0.1",))
    servings: dict[str, _Serving] = {}
    pves: dict[str, FakePve] = {}
    data = flat_example()
    hvs = data["all"]["children"]["hypervisors"]["hosts"]
    try:
        for i, (host, (_role, image)) in enumerate(HOSTS.items()):
            pve = ResizingPve(host="127.0.0.1", port=0)
            pve.time_scale = time_scale
            pve.add_node(host)
            pve.nodes.pop("pve1", None)
            secret = f"secret-{host}-{i}"
            pve.apitokens[TOKEN_ID] = secret
            add_template(pve, host, 9000, image, BUILD_ID)
            servings[host] = _Serving(pve, cert, key)
            pves[host] = pve
            body = hvs[host]["pve"]
            body["api_url"] = f"https://127.0.0.1:{pve.port}"
            body["tls_ca_file"] = cert
            body.pop("tls_fingerprint", None)
            env = f"TEST_DEPLOY_{host.replace('-', '_').upper()}_SECRET"
            body["token_secret_env"] = env
            monkeypatch.setenv(env, secret)
        inv = tmp / "inventory"
        inv.mkdir()
        (inv / "hosts.yml").write_text(yaml.safe_dump(copy.deepcopy(data), sort_keys=False))
        site = load_site(inv, REPO_ROOT / "packer/images.yml")
        yield FakeSite(site, pves, inv)
    finally:
        for s in servings.values():
            s.stop()


pytestmark = pytest.mark.unit
SSHKEYS_ENCODED = (
    "ssh-ed25519%20AAAAC3NzaC1lZDI1NTE5AAAAIKfXoTQ8mJ2n8jvU4vG0p6Y1sWq3bZr5nH7cLd9eFa2M%20ansible%40deevnet"
)


class LocalHostLock:
    """The host lock's contract (hostlock.HostGuard) on a local file: these fakes have no sshd.
    The lab tests take the real one over SSH."""

    def __init__(self, path: Path, owner: str, wait: int):
        self.path, self.owner, self.wait = path, owner, wait
        self.fd: int | None = None
        self.lost = False

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockBusy(f"in progress by {Path(str(self.path) + '.owner').read_text().strip()}") from None
                time.sleep(0.01)
        Path(str(self.path) + ".owner").write_text(self.owner)
        self.fd = fd

    @property
    def held(self) -> bool:
        return self.fd is not None and not self.lost

    def ensure(self, doing: str) -> None:
        if not self.held:
            raise LockLost(f"lost the host lock before {doing}")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@pytest.fixture
def fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSite]:
    monkeypatch.setattr(dep.act, "LOCK_RETRY_DELAY", 0.05)
    monkeypatch.setattr(dep.ready, "READY_POLL_INTERVAL", 0.05)
    monkeypatch.setattr(dep.act, "ssh_host_lock",
                        lambda hv, owner, wait: LocalHostLock(tmp_path / f"{hv.name}.lock", owner, wait))
    yield from fake_site(tmp_path, monkeypatch)


@pytest.fixture
def agents(fs: FakeSite) -> Iterator[None]:
    stop = threading.Event()
    t = threading.Thread(target=fake_agents, args=(fs.pves, stop), daemon=True)
    t.start()
    yield
    stop.set()
    t.join(5)


def writes(pve: FakePve) -> list[tuple[str, str]]:
    return [(m, p) for m, p, _ in pve.requests if m in ("POST", "PUT", "DELETE")]


def test_deploy_all_lands_with_inventory_macs_and_converges(fs: FakeSite, agents: None) -> None:
    report = dep.deploy_vms(None, fs.site, plane=None, timeout=30, progress=False)
    assert report.ok, report.to_dict()
    assert {r.plan.vm: r.state for r in report.results} == {n: "created" for n in fs.site.vms}
    for vm in fs.site.vms.values():
        host = fs.site.hypervisor_for(vm).name
        assert host == ("pve-mgmt" if vm.plane == "mgmt" else "pve-tenant")
        fvm = fs.vm(host, vm.vmid)
        assert fvm is not None and fvm.node == host and fvm.status == "running"
        other = fs.vm("pve-tenant" if host == "pve-mgmt" else "pve-mgmt", vm.vmid)
        assert other is None
        cfg = fvm.config
        for i, nic in enumerate(vm.nics):
            spec = pvecodec.NetSpec.parse(cfg[f"net{i}"])
            assert spec.mac == nic.mac
            assert cfg[f"net{i}"].startswith(f"virtio={nic.mac.upper()},")
            assert spec.opts["bridge"] == (nic.bridge or "vmbr0")
            assert spec.opts.get("tag") == (str(nic.vlan) if nic.vlan else None)
            assert spec.opts["firewall"] == "1"
        assert cfg["sshkeys"] == SSHKEYS_ENCODED
        assert cfg["ciupgrade"] == "0" and cfg["ciuser"] == "ansible"
        assert str(cfg["cores"]) == str(vm.cores) and str(cfg["memory"]) == str(vm.memory)
        assert cfg["tags"] == ";".join(vm.all_tags)
        marker = Marker.parse(cfg["description"], vm.vmid)
        assert marker.managed and marker.vm_name == vm.name and not marker.incomplete
        assert marker.template_vmid == 9000
    jump = fs.vm("pve-mgmt", 1301).config
    assert jump["ipconfig0"] == "ip=192.168.10.30/24,gw=192.168.10.1"
    assert jump["nameserver"] == "192.168.10.1" and jump["searchdomain"] == "deevnet.lan"
    assert fs.vm("pve-mgmt", 1101).config["ipconfig0"] == "ip=dhcp"
    # full clones for mgmt, linked for tenant: the volume names say so
    for host, full in (("pve-tenant", "full=0"), ("pve-mgmt", "full=1")):
        posts = [str(b) for m, p, b in fs.pves[host].requests if m == "POST" and p.endswith("/clone")]
        assert posts and all(full in b for b in posts), posts
    for vm in fs.site.vms.values():
        scsi0 = fs.vm(fs.site.hypervisor_for(vm).name, vm.vmid).config["scsi0"]
        assert pvecodec.parse_props(scsi0, "file")["size"] == f"{vm.disk_gb}G"
    for r in report.results:
        assert r.macs == fs.site.vms[r.plan.vm].macs
        assert r.address and r.address.startswith("10.9.0.")

    for pve in fs.pves.values():
        pve.requests.clear()
    again = dep.deploy_vms(None, fs.site, timeout=30, progress=False)
    assert again.ok
    assert {r.state for r in again.results} == {"unchanged"}
    assert all(writes(pve) == [] for pve in fs.pves.values())


def test_hand_changed_mac_is_drift_and_corrected(fs: FakeSite, agents: None) -> None:
    assert dep.deploy_vms(None, fs.site, ["iot-api01"], timeout=30, progress=False).ok
    vm = fs.vm("pve-tenant", 2101)
    vm.status = "stopped"  # so the hand edit lands in the config itself
    vm.config["net0"] = "virtio=02:DE:20:11:01:99,bridge=vmbr0,firewall=1"
    plan = dep.plan_deploy(None, fs.site, ["iot-api01"])
    [p] = plan.vms
    assert p.action == "drift"
    assert {d.field for d in p.diffs} == {"net0.mac", "status"}
    mac_diff = next(d for d in p.diffs if d.field == "net0.mac")
    assert (mac_diff.current, mac_diff.desired, mac_diff.safe) == ("02:de:20:11:01:99", "02:de:20:11:01:00", True)
    report = dep.deploy_vms(None, fs.site, ["iot-api01"], timeout=30, progress=False)
    [r] = report.results
    assert r.state == "corrected" and r.macs == ["02:de:20:11:01:00"]
    assert pvecodec.NetSpec.parse(vm.config["net0"]).mac == "02:de:20:11:01:00"
    assert dep.plan_deploy(None, fs.site, ["iot-api01"]).vms[0].action == "in-sync"


def test_mac_drift_on_running_vm_is_pending_until_restart(fs: FakeSite, agents: None) -> None:
    assert dep.deploy_vms(None, fs.site, ["sandbox01"], timeout=30, progress=False).ok
    vm = fs.vm("pve-tenant", 2201)
    client = PveClient(fs.site.hypervisors["pve-tenant"])
    client.put("/nodes/pve-tenant/qemu/2201/config", net0="virtio=02:DE:20:12:01:77,bridge=vmbr0,firewall=1")
    [p] = dep.plan_deploy(None, fs.site, ["sandbox01"]).vms
    assert p.action == "drift" and [d.field for d in p.diffs] == ["net0.mac"]
    [r] = dep.deploy_vms(None, fs.site, ["sandbox01"], timeout=30, progress=False).results
    assert r.state == "corrected" and r.pending_restart == ["net0"]
    assert any("next start" in n for n in r.notes)
    assert pvecodec.NetSpec.parse(vm.pending["net0"]).mac == "02:de:20:12:01:00"
    [again] = dep.plan_deploy(None, fs.site, ["sandbox01"]).vms
    assert again.action == "in-sync" and any("pending" in n for n in again.notes)


def test_mgmt_vm_on_tenant_host_refused_before_any_api_call(fs: FakeSite) -> None:
    bad_vm = fs.site.vms["metrics01"].model_copy(update={"hypervisor": "pve-tenant"})
    site = Site(fs.site.inventory_path, fs.site.images_path, fs.site.hypervisors,
                {**fs.site.vms, "metrics01": bad_vm}, fs.site.images, fs.site.vm_sources)
    made: list[str] = []

    def spy(hv: Any) -> Any:
        made.append(hv.name)
        return PveClient(hv)

    for call in (
        lambda: dep.deploy_vms(None, site, ["metrics01", "iot-api01"], progress=False, client_factory=spy),
        lambda: dep.deploy_vms(None, site, None, dry_run=True, progress=False, client_factory=spy),
        lambda: dep.plan_deploy(None, site, ["metrics01"], client_factory=spy),
    ):
        with pytest.raises(ValidationFailed, match=r"metrics01.*mgmt VMs may only run on the mgmt hypervisor"):
            call()
    assert made == []
    assert all(pve.requests == [] for pve in fs.pves.values())


def test_clone_lock_timeout_is_retried(fs: FakeSite, agents: None) -> None:
    pve = fs.pves["pve-tenant"]
    pve.fail("POST", "/qemu/9000/clone", status=500,
             message="can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout", times=2)
    [r] = dep.deploy_vms(None, fs.site, ["iot-api01"], timeout=30, progress=False).results
    assert r.state == "created", r.to_dict()
    clones = [p for m, p in writes(pve) if p.endswith("/clone")]
    assert len(clones) == 3


def test_other_clone_errors_are_not_retried(fs: FakeSite) -> None:
    pve = fs.pves["pve-tenant"]
    pve.fail("POST", "/qemu/9000/clone", status=500, message="unable to create VM: storage full", times=1)
    [r] = dep.deploy_vms(None, fs.site, ["iot-api01"], timeout=30, progress=False).results
    assert r.state == "failed" and "storage full" in (r.error or "")
    assert len([p for m, p in writes(pve) if p.endswith("/clone")]) == 1
    assert fs.vm("pve-tenant", 2101) is None


@pytest.mark.parametrize("step", ["config", "start"])
def test_failure_part_way_leaves_nothing_half_made(fs: FakeSite, agents: None, step: str) -> None:
    pve = fs.pves["pve-tenant"]
    suffix = "/qemu/2101/config" if step == "config" else "/qemu/2101/status/start"
    pve.fail("POST", suffix, status=500, message=f"injected {step} failure", times=1)
    report = dep.deploy_vms(None, fs.site, ["iot-api01", "sandbox01"], timeout=30, progress=False)
    by = {r.plan.vm: r for r in report.results}
    assert not report.ok
    assert by["iot-api01"].state == "failed" and f"injected {step} failure" in (by["iot-api01"].error or "")
    assert by["iot-api01"].cleanup == "removed"
    assert fs.vm("pve-tenant", 2101) is None
    assert not [v for v in pve.storages["local-lvm"].get("volumes", {}) if "-2101-" in v]
    assert by["sandbox01"].state == "created"
    rerun = dep.deploy_vms(None, fs.site, ["iot-api01", "sandbox01"], timeout=30, progress=False)
    assert {r.plan.vm: r.state for r in rerun.results} == {"iot-api01": "created", "sandbox01": "unchanged"}


def test_failed_removal_leaves_vm_tagged_and_rerun_recreates(fs: FakeSite, agents: None) -> None:
    pve = fs.pves["pve-tenant"]
    pve.fail("POST", "/qemu/2101/config", status=500, message="injected config failure", times=1)
    pve.fail("DELETE", "/qemu/2101", status=500, message="injected destroy failure", times=1)
    [r] = dep.deploy_vms(None, fs.site, ["iot-api01"], timeout=30, progress=False).results
    assert r.state == "failed" and r.cleanup == "left-incomplete"
    vm = fs.vm("pve-tenant", 2101)
    assert vm is not None and INCOMPLETE_TAG in vm.config["tags"]
    assert Marker.parse(vm.config["description"], 2101).incomplete
    [p] = dep.plan_deploy(None, fs.site, ["iot-api01"]).vms
    assert p.action == "recreate"
    [r2] = dep.deploy_vms(None, fs.site, ["iot-api01"], timeout=30, progress=False).results
    assert r2.state == "recreated", r2.to_dict()
    cfg = fs.vm("pve-tenant", 2101).config
    assert INCOMPLETE_TAG not in cfg["tags"] and not Marker.parse(cfg["description"], vm.vmid).incomplete


def test_unmanaged_vm_with_same_vmid_is_never_touched(fs: FakeSite) -> None:
    pve = fs.pves["pve-mgmt"]
    pve.add_vm(1101, "somebody-elses", node="pve-mgmt", status="running",
               config={"net0": "virtio=BC:24:11:12:34:56,bridge=vmbr0"})
    report = dep.deploy_vms(None, fs.site, ["metrics01"], timeout=30, progress=False, recreate=True)
    [r] = report.results
    assert r.state == "blocked" and "not made by this tool" in r.plan.reason
    assert writes(pve) == []
    with pytest.raises(RemoteError, match="not made by this tool"):
        dep.destroy_vm(None, fs.site, "metrics01", allow_mgmt=True)
    assert pve.vm(1101) is not None


def test_template_choice_newest_tested_or_pinned(fs: FakeSite) -> None:
    pve = fs.pves["pve-mgmt"]
    add_template(pve, "pve-mgmt", 9001, "fedora-44", "20261126T000000Z", tested=False)
    add_template(pve, "pve-mgmt", 9002, "fedora-44", "20261124T000000Z", tested=True)
    [p] = dep.plan_deploy(None, fs.site, ["metrics01"]).vms
    assert (p.action, p.template_vmid) == ("create", 9000)
    pinned = fs.site.vms["metrics01"].model_copy(update={"template_vmid": 9002})
    site = Site(fs.site.inventory_path, fs.site.images_path, fs.site.hypervisors,
                {**fs.site.vms, "metrics01": pinned}, fs.site.images, fs.site.vm_sources)
    assert dep.plan_deploy(None, site, ["metrics01"]).vms[0].template_vmid == 9002
    bad = fs.site.vms["metrics01"].model_copy(update={"template_vmid": 9001})
    site = Site(fs.site.inventory_path, fs.site.images_path, fs.site.hypervisors,
                {**fs.site.vms, "metrics01": bad}, fs.site.images, fs.site.vm_sources)
    [b] = dep.plan_deploy(None, site, ["metrics01"]).vms
    assert b.action == "blocked" and "did not pass its image tests" in b.reason


def test_no_tested_template_blocks(fs: FakeSite) -> None:
    pve = fs.pves["pve-tenant"]
    pve.vm(9000).config["tags"] = "build-20261125t120000z;fedora-45;image-factory;untested"
    report = dep.deploy_vms(None, fs.site, plane="tenant", timeout=30, progress=False)
    assert not report.ok
    assert all(r.state == "blocked" and "no tested template" in r.plan.reason for r in report.results)
    assert writes(pve) == []


def test_dry_run_changes_nothing(fs: FakeSite) -> None:
    report = dep.deploy_vms(None, fs.site, dry_run=True, progress=False)
    assert report.dry_run and {r.plan.action for r in report.results} == {"create"}
    assert all(writes(pve) == [] for pve in fs.pves.values())
    assert report.to_dict()["vms"][0]["state"] == "planned"


def test_lineage_drift_on_mgmt_is_reported_not_recreated_without_flag(fs: FakeSite, agents: None) -> None:
    assert dep.deploy_vms(None, fs.site, ["jump01"], timeout=30, progress=False).ok
    add_template(fs.pves["pve-mgmt"], "pve-mgmt", 9003, "fedora-44", "20261201T000000Z")
    [p] = dep.plan_deploy(None, fs.site, ["jump01"]).vms
    assert p.action == "drift" and [d.field for d in p.unsafe] == ["template"] and "--recreate" in p.reason
    [r] = dep.deploy_vms(None, fs.site, ["jump01"], timeout=30, progress=False).results
    assert r.state == "drift-unresolved"
    assert Marker.parse(fs.vm("pve-mgmt", 1301).config["description"], 1301).template_vmid == 9000
    # a running mgmt VM: --recreate alone is not enough
    [r2] = dep.deploy_vms(None, fs.site, ["jump01"], timeout=30, progress=False, recreate=True).results
    assert r2.state == "drift-unresolved" and "--i-know-this-is-mgmt" in r2.plan.reason
    assert Marker.parse(fs.vm("pve-mgmt", 1301).config["description"], 1301).template_vmid == 9000
    [r3] = dep.deploy_vms(None, fs.site, ["jump01"], timeout=30, progress=False, recreate=True,
                          allow_mgmt=True).results
    assert r3.state == "recreated", r3.to_dict()
    assert Marker.parse(fs.vm("pve-mgmt", 1301).config["description"], 1301).template_vmid == 9003


def test_destroy_tenant_and_mgmt_needs_flag(fs: FakeSite, agents: None) -> None:
    assert dep.deploy_vms(None, fs.site, ["sandbox01", "jump01"], timeout=30, progress=False).ok
    assert "destroyed" in dep.destroy_vm(None, fs.site, "sandbox01")
    assert fs.vm("pve-tenant", 2201) is None
    with pytest.raises(ValidationFailed, match="i-know-this-is-mgmt"):
        dep.destroy_vm(None, fs.site, "jump01")
    assert fs.vm("pve-mgmt", 1301) is not None
    assert "destroyed" in dep.destroy_vm(None, fs.site, "jump01", allow_mgmt=True)
    assert fs.vm("pve-mgmt", 1301) is None
    assert "nothing to do" in dep.destroy_vm(None, fs.site, "jump01", allow_mgmt=True)


def test_without_guest_agent_ready_means_ssh_greets_on_the_known_address(
    fs: FakeSite, monkeypatch: pytest.MonkeyPatch, greeter: Any
) -> None:
    monkeypatch.setattr(dep.ready, "SSH_PORT", greeter(b"SSH-2.0-OpenSSH_9.2\r\n"))
    fs.pves["pve-mgmt"].vm(9000).config.pop("agent")
    vm = fs.site.vms["metrics01"]
    nic = vm.nics[0].model_copy(update={"address": "127.0.0.1"})
    site = Site(fs.site.inventory_path, fs.site.images_path, fs.site.hypervisors,
                {**fs.site.vms, "metrics01": vm.model_copy(update={"nics": [nic]})}, fs.site.images,
                fs.site.vm_sources)
    report = dep.deploy_vms(None, site, ["metrics01", "logs01"], timeout=5, progress=False)
    by = {r.plan.vm: r for r in report.results}
    assert by["metrics01"].state == "created" and by["metrics01"].address == "127.0.0.1"
    assert by["logs01"].state == "not-ready" and "no guest agent configured" in (by["logs01"].error or "")
    assert fs.vm("pve-mgmt", 1102) is not None  # configured and started: kept, reported not ready


def test_locked_vm_is_blocked_not_recreated(fs: FakeSite) -> None:
    """A VM another run is still cloning (lock: clone, marker still 'incomplete') is left alone."""
    pve = fs.pves["pve-tenant"]
    vm = fs.site.vms["iot-api01"]
    tpl = factories.template(9000, "tpl-fedora-45-x", build_id="x")
    pve.add_vm(2101, "iot-api01", node="pve-tenant", lock="clone",
               config={"description": dep.describe(vm, tpl, "other-run", incomplete=True), "lock": "clone"})
    [r] = dep.deploy_vms(None, fs.site, ["iot-api01"], timeout=5, progress=False).results
    assert r.state == "blocked" and "locked (clone)" in r.plan.reason
    assert writes(pve) == [] and pve.vm(2101) is not None


# ------------------------------------------------------------------ safety: markers, MACs, host lock


def test_forged_markers_never_cause_a_destroy(fs: FakeSite, agents: None) -> None:
    """Free text saying "incomplete" and a factory-incomplete tag set through the API are not state."""
    assert dep.deploy_vms(None, fs.site, ["jump01", "iot-api01"], timeout=30, progress=False).ok
    for host, vmid in (("pve-mgmt", 1301), ("pve-tenant", 2101)):
        vm = fs.vm(host, vmid)
        vm.config["description"] += "\nfactory-state: incomplete"
        vm.config["tags"] += f";{INCOMPLETE_TAG}"
    for recreate in (False, True):
        report = dep.deploy_vms(None, fs.site, ["jump01", "iot-api01"], timeout=30, progress=False,
                                recreate=recreate)
        assert all(r.state != "recreated" for r in report.results), report.to_dict()
        assert [m for pve in fs.pves.values() for m, p in writes(pve) if m == "DELETE"] == []
    assert fs.vm("pve-mgmt", 1301).status == "running" and fs.vm("pve-tenant", 2101).status == "running"


def test_marker_copied_from_another_vm_is_foreign(fs: FakeSite, agents: None) -> None:
    assert dep.deploy_vms(None, fs.site, ["metrics01"], timeout=30, progress=False).ok
    pve = fs.pves["pve-mgmt"]
    pve.add_vm(1102, "logs01", node="pve-mgmt", config={"description": fs.vm("pve-mgmt", 1101).config["description"]})
    pve.requests.clear()
    [r] = dep.deploy_vms(None, fs.site, ["logs01"], timeout=30, progress=False, recreate=True).results
    assert r.state == "blocked" and "copied onto VMID 1102" in r.plan.reason
    assert writes(pve) == []


def test_running_incomplete_vm_is_reported_not_destroyed(fs: FakeSite) -> None:
    vm = fs.site.vms["iot-api01"]
    tpl = factories.template(9000, "tpl-fedora-45-x", build_id="x")
    pve = fs.pves["pve-tenant"]
    pve.add_vm(2101, "iot-api01", node="pve-tenant", status="running",
               config={"description": dep.describe(vm, tpl, "crashed-run", incomplete=True)})
    [r] = dep.deploy_vms(None, fs.site, ["iot-api01"], timeout=5, progress=False).results
    assert r.state == "blocked" and "incomplete by run crashed-run but running" in r.plan.reason
    assert writes(pve) == [] and pve.vm(2101).status == "running"
    pve.vm(2101).status = "stopped"
    assert dep.plan_deploy(None, fs.site, ["iot-api01"]).vms[0].action == "recreate"


def test_colliding_mac_is_refused_before_any_write(fs: FakeSite) -> None:
    """A foreign VM on the OTHER host already carries metrics01's MAC: nothing is written anywhere."""
    mac = fs.site.vms["metrics01"].macs[0]
    fs.pves["pve-tenant"].add_vm(2999, "someones-vm", node="pve-tenant",
                                 config={"net0": f"virtio={mac.upper()},bridge=vmbr0"})
    report = dep.deploy_vms(None, fs.site, ["metrics01", "logs01"], timeout=5, progress=False)
    by = {r.plan.vm: r for r in report.results}
    assert by["metrics01"].state == "blocked"
    reason = by["metrics01"].plan.reason
    assert f"MAC {mac} (nics[0]) is already used by pve-tenant VMID 2999 (someones-vm) net0" in reason
    assert fs.vm("pve-mgmt", 1101) is None and fs.vm("pve-mgmt", 1102) is not None


def test_mac_check_needs_every_host_readable(fs: FakeSite) -> None:
    fs.pves["pve-tenant"].fail("GET", "/nodes/pve-tenant/qemu", status=500, message="injected read failure", times=99)
    [p] = dep.plan_deploy(None, fs.site, ["metrics01"]).vms
    assert p.action == "blocked" and "MACs are unique" in p.reason and "injected read failure" in p.reason


def test_second_run_waits_for_the_host_lock_then_finds_the_vm_in_sync(fs: FakeSite, agents: None) -> None:
    """The second run starts while the first sits between clone and config update."""
    reached_config = threading.Event()
    results: dict[str, dep.DeployReport] = {}

    def first_progress(vm: str, text: str) -> None:
        if text.startswith("configuring"):
            reached_config.set()
            time.sleep(0.3)

    def run_first() -> None:
        with dep_progress(first_progress):
            results["first"] = dep.deploy_vms(None, fs.site, ["metrics01"], timeout=30, progress=True)

    t = threading.Thread(target=run_first)
    t.start()
    assert reached_config.wait(20)
    results["second"] = dep.deploy_vms(None, fs.site, ["metrics01"], timeout=30, progress=False, lock_wait=30)
    t.join(30)
    assert results["first"].results[0].state == "created"
    assert results["second"].results[0].state == "unchanged"
    vm = fs.vm("pve-mgmt", 1101)
    assert vm.status == "running" and pvecodec.NetSpec.parse(vm.config["net0"]).mac == fs.site.vms["metrics01"].macs[0]


def test_lock_busy_without_waiting_changes_nothing(fs: FakeSite, tmp_path: Path) -> None:
    holder = LocalHostLock(tmp_path / "pve-mgmt.lock", "ci@runner pid 4242 run night-7 since 2026-11-28T01:00:00Z", 0)
    holder.acquire()
    try:
        with pytest.raises(LockBusy, match="in progress by ci@runner pid 4242 run night-7"):
            dep.deploy_vms(None, fs.site, ["metrics01"], timeout=5, progress=False, lock_wait=0)
        with pytest.raises(LockBusy):
            dep.destroy_vm(None, fs.site, "jump01", allow_mgmt=True, lock_wait=0)
    finally:
        holder.release()
    assert all(writes(pve) == [] for pve in fs.pves.values())


def test_lost_lock_stops_writes_and_leaves_the_vm_to_the_next_holder(fs: FakeSite, monkeypatch: pytest.MonkeyPatch,
                                                                     agents: None) -> None:
    locks: list[LocalHostLock] = []

    def factory(hv: Any, owner: str, wait: int) -> LocalHostLock:
        locks.append(LocalHostLock(Path(fs.inventory) / f"{hv.name}.lock", owner, wait))
        return locks[-1]

    def lose(vm: str, text: str) -> None:
        if text.startswith("configuring"):
            for lock in locks:
                lock.lost = True

    with dep_progress(lose):
        [r] = dep.deploy_vms(None, fs.site, ["iot-api01"], timeout=5, progress=True, lock_factory=factory).results
    assert r.state == "failed" and r.cleanup == "not-touched" and "lost the host lock" in (r.error or "")
    assert fs.vm("pve-tenant", 2101) is not None  # the clone is left for whoever holds the lock now
    [r2] = dep.deploy_vms(None, fs.site, ["iot-api01"], timeout=30, progress=False).results
    assert r2.state == "recreated", r2.to_dict()


@contextlib.contextmanager
def dep_progress(hook: Any) -> Iterator[None]:
    """Route deploy's progress lines to ``hook`` (the test's way to act at a given step)."""
    original = dep.act.progress_reporter
    dep.act.progress_reporter = lambda enabled, vms: contextlib.nullcontext(hook)  # type: ignore[assignment]
    try:
        yield
    finally:
        dep.act.progress_reporter = original  # type: ignore[assignment]
