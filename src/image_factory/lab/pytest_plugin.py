"""pytest fixtures: a running two-hypervisor lab, fresh per test if asked, with fault hooks.

Register with ``pytest_plugins = ["image_factory.lab.pytest_plugin"]`` (tests/conftest.py does).

Fixtures
- ``lab`` (session): a ``LabHandle`` for a lab in a temporary directory, on a free address slot
  (127.0.s.11 / 127.0.s.12, s >= 20, so it never collides with ``invoke lab.up``'s slot 0 or
  with another pytest session). Brought down (and its private state removed) at session end.
- ``fresh_lab`` (function): the same lab, reset first: no VMs, no disks, no imports, no tasks,
  no faults (a reset takes milliseconds; the processes keep running).

Options: ``--lab-real-boot=all|none|name,name`` (default all): which started VMs boot a real qemu.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

from image_factory.lab import cluster, controller, sshd
from image_factory.lab.config import LabConfig, LabError, LabPaths, host_address, vm_address
from image_factory.lab.control import Control
from image_factory.settings import Settings
from image_factory.site.inventory import Hypervisor, Site, SshEndpoint, Vm

if TYPE_CHECKING:
    from image_factory.image.imagetest import JunitCounts
    from image_factory.platform import Platform

SLOTS = range(20, 100)
# (host, pve-manager release) of every release the lab models, on the lab's two hosts: pve-mgmt runs 8.4.1,
# pve-tenant 9.2.5 and, switched with LabHandle.release (same major, same grants), 9.1.19. Parametrize with
# pytest.mark.parametrize(("host", "release"), NODE_RELEASES, ids=NODE_RELEASE_IDS) and call lab.release first.
NODE_RELEASES = (("pve-mgmt", "8.4.1"), ("pve-tenant", "9.1.19"), ("pve-tenant", "9.2.5"))
NODE_RELEASE_IDS = [f"pve-{version}" for _host, version in NODE_RELEASES]
SLOT_LOCK_DIR = Path(tempfile.gettempdir()) / "deevnet-lab-slots"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--lab-real-boot", default="all",
                     help="lab fixture: which started VMs boot a real qemu (all, none, or VM names)")


def _free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def claim_slot(hosts: int = 2) -> tuple[int, IO[str]]:
    """A lab address slot no other lab uses, held by an flock until the returned file is closed."""
    SLOT_LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for slot in SLOTS:
        fh = (SLOT_LOCK_DIR / f"{slot}.lock").open("w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            continue
        if all(_free(host_address(slot, i), port) for i in range(hosts) for port in (22, 8006)):
            return slot, fh
        fh.close()
    raise LabError("no free lab address slot (127.0.20-99.x)")


@dataclass
class LabHandle:
    """What a test gets: the lab's Settings and Site, its paths, and the fault hooks."""

    base_settings: Settings
    lab: controller.Lab
    _site: Site | None = field(default=None, repr=False)
    # The lab's vault identity in the environment from start to stop: every command a test runs against the
    # lab inventory (in-process or as a subprocess) decrypts its vaulted token secret, as on a configured site.
    _environment: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    @property
    def settings(self) -> Settings:
        """Settings whose inventory is the lab inventory: pass them to any task logic."""
        return self.lab.settings

    @property
    def paths(self) -> LabPaths:
        return self.lab.paths

    @property
    def config(self) -> LabConfig:
        return self.lab.config

    @property
    def site(self) -> Site:
        if self._site is None:
            self._site = self.lab.site()
        return self._site

    @property
    def hypervisors(self) -> dict[str, Hypervisor]:
        return self.site.hypervisors

    def hv(self, name: str) -> Hypervisor:
        return self.site.hypervisors[name]

    def other(self, name: str) -> str:
        return next(h for h in self.site.hypervisors if h != name)

    # ------------------------------------------------------------- faults

    def control(self, host: str) -> Control:
        """The host's control endpoint: ``lab.control("pve-mgmt").fail(method=..., suffix=..., ...)``."""
        return Control(self.paths.control_socket(host))

    def fail(self, host: str, method: str, suffix: str, *, status: int | None = None, message: str | None = None,
             error: str | None = None, times: int | None = None) -> None:
        """fakepve's fail(): requests whose path ends with suffix (or matches a schema template) fail."""
        self.control(host).call("fail", method=method, suffix=suffix, status=status, message=message,
                                error=error, times=times)

    def flaky(self, host: str, drop_rate: float = 0.0, hang_rate: float = 0.0, hang_secs: float = 120,
              seed: int | None = None) -> None:
        self.control(host).call("flaky_network", drop_rate=drop_rate, hang_rate=hang_rate, hang_secs=hang_secs,
                                seed=seed)

    def slow(self, host: str, latency: float, jitter: float = 0.0) -> None:
        self.control(host).call("slow_network", latency=latency, jitter=jitter)

    def lock_vm(self, host: str, vmid: int, secs: float | None = None) -> None:
        """Another task holds the VM's config lock for secs PVE seconds (None: until clear_faults)."""
        self.control(host).call("hold_config_lock", vmid=vmid, secs=secs)

    def lock_storage(self, host: str, storage: str = "local", secs: float | None = None) -> None:
        """Another worker holds the storage allocation lock (clones/imports wait 10 PVE s, then fail)."""
        self.control(host).call("hold_storage_lock", storage=storage, secs=secs)

    def durations(self, host: str, **secs: float) -> None:
        """Task durations in PVE seconds: clone_full, clone_linked, import, template, start, stop, imgcopy."""
        self.control(host).call("durations", **secs)

    def time_scale(self, host: str, value: float) -> None:
        self.control(host).call("time_scale", value=value)

    def bridge_vlans(self, host: str, bridge: str, *, aware: bool = True, vids: str | None = None) -> None:
        """The bridge's VLAN fields in /nodes/{node}/network: not VLAN-aware, or other bridge_vids (until
        clear_faults; the default is what PVE's GUI writes: VLAN-aware, 2-4094)."""
        self.control(host).call("bridge_vlans", bridge=bridge, aware=aware, vids=vids)

    def release(self, host: str, version: str) -> None:
        """The host runs another pve-manager release of its major (until reset): with NODE_RELEASES, a test runs
        on the 8.4, 9.1 and 9.2 nodes of one two-host lab."""
        self.control(host).call("release", version=version)

    # ------------------------------------------------------------ cluster

    def cluster_nodes(self) -> list[str]:
        """The modelled cluster's node hosts (lab.json's ``cluster``), in order; [] without a cluster."""
        return [h.name for h in cluster.members(self.config)]

    def etc_pve(self) -> Path:
        """The cluster's shared /etc/pve (pmxcfs): a directory every node's sshd sees."""
        return self.paths.etc_pve(self.config.host(self.cluster_nodes()[0]).cluster)

    def node_offline(self, host: str) -> None:
        """The cluster node goes down: its API endpoint and sshd stop answering (open sessions cut), its peers
        report it offline and answer 595 (No route to host) for it. Until node_online or a reset."""
        self.control(host).call("node_offline", offline=True)
        pid = controller._read_pid(self.paths.pidfile(host, "sshd"))
        if pid is not None:
            sessions = sshd.session_pids(pid)
            controller._terminate(pid, controller._sshd_marker(self.paths, host), grace=5)
            for session in sessions:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(session, signal.SIGKILL)

    def node_online(self, host: str) -> None:
        """The node is back: its endpoint and sshd answer again, its peers report it online."""
        self.control(host).call("node_offline", offline=False)
        controller.up(self.base_settings, self.config)

    def clear_faults(self, host: str | None = None) -> None:
        for name in [host] if host else list(self.site.hypervisors):
            self.control(name).call("clear_faults")

    def state(self, host: str) -> dict[str, Any]:
        result: dict[str, Any] = self.control(host).call("state")
        return result

    def reset(self) -> None:
        """Every host back to fresh: no VMs, disks, imports, tasks or faults (a cluster node back online)."""
        for name in self.site.hypervisors:
            self.control(name).call("reset")
        if not all(self._sshd_runs(node) for node in self.cluster_nodes()):
            controller.up(self.base_settings, self.config)  # an offline node's sshd back

    def _sshd_runs(self, host: str) -> bool:
        pid = controller._read_pid(self.paths.pidfile(host, "sshd"))
        return pid is not None and controller._is_ours(pid, controller._sshd_marker(self.paths, host))

    # ---------------------------------------------------------------- ssh

    def sshd_pid(self, host: str) -> int:
        pid = controller._read_pid(self.paths.pidfile(host, "sshd"))
        if pid is None:
            raise LabError(f"{host}: sshd is not running")
        return pid

    def cut_ssh(self, host: str) -> int:
        """Kill every SSH session to the host now (the sshd keeps listening); returns how many."""
        return sshd.cut_sessions(self.sshd_pid(host))

    @contextlib.contextmanager
    def cut_ssh_when(
        self, host: str, path: Path | str, min_bytes: int, timeout: float = 60.0
    ) -> Iterator[dict[str, Any]]:
        """While inside the block: once `path` (on the host's storage) holds min_bytes, cut the host's
        SSH sessions. Yields a dict whose 'cut' becomes the number of sessions cut."""
        info: dict[str, Any] = {"cut": 0, "size_at_cut": None}
        stop = threading.Event()
        target = Path(path)
        sshd_pid = self.sshd_pid(host)

        def watch() -> None:
            deadline = time.monotonic() + timeout
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    size = target.stat().st_size
                except OSError:
                    size = 0
                if size >= min_bytes:
                    info["size_at_cut"] = size
                    info["cut"] = sshd.cut_sessions(sshd_pid)
                    return
                time.sleep(0.002)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        try:
            yield info
        finally:
            stop.set()
            thread.join(timeout=5)

    # ----------------------------------------------------------------- VMs

    def vm_ssh_address(self, vmid: int) -> tuple[str, int]:
        """Where a running lab VM's SSH answers (its qemu forwards this to the guest's port 22)."""
        return vm_address(self.config.slot, vmid), 22

    def qemu(self, host: str, vmid: int) -> dict[str, Any] | None:
        for vm in self.state(host)["vms"]:
            if vm["vmid"] == vmid:
                result: dict[str, Any] | None = vm["qemu"]
                return result
        return None

    def serial_log(self, host: str, vmid: int) -> Path:
        return self.paths.log / f"{self.hv(host).node}-vm{vmid}-serial.log"

    def guest_endpoint(self, host: str, vm: Vm, *, wait: float = 300.0) -> SshEndpoint:
        """A really booted VM's SSH endpoint once its sshd answers: the host key read through the guest agent over
        the API (as the demo reads it), so every connection is strict from the first. A VM that does not answer
        within ``wait`` seconds fails with the tail of its serial console."""
        # Local: every pytest process loads this plugin (the image suites' too); the API and SSH clients only
        # the tests that talk to a guest.
        from image_factory.errors import RemoteError
        from image_factory.pve.client import PveClient
        from image_factory.pve.guest import host_key_via_agent
        from image_factory.pve.sshlink import connect

        address, port = self.vm_ssh_address(vm.vmid)
        host_key = host_key_via_agent(PveClient(self.hv(host)), vm.vmid, timeout=wait)
        endpoint = SshEndpoint(host=address, port=port, user=vm.cloudinit.user, host_key=host_key,
                               key_file=self.paths.client_key)
        deadline = time.monotonic() + wait  # the agent answers before sshd has started
        while True:
            try:
                with connect(vm.name, endpoint, timeout=30):
                    return endpoint
            except RemoteError:
                if time.monotonic() > deadline:
                    tail = self.serial_log(host, vm.vmid).read_text(errors="replace")[-3000:]
                    raise LabError(f"{vm.name} on {host}: no SSH within {wait:.0f} s; its console ends:\n"
                                   f"{tail}") from None
                time.sleep(5)

    def image_suites(self, host: str, vm: Vm, suites: list[str], platform: Platform, workdir: Path, *,
                     family: str = "debian") -> JunitCounts:
        """The image test's suites (tests/image) run over SSH against a deployed VM, as the image test runs them
        against the build's test VM: a clone is held to the checks its artifact passed, with the expectations
        ``platform`` gives (the template's). pytest's output and JUnit report land in ``workdir``."""
        from image_factory.image import imagetest  # local, as in guest_endpoint: the image wing's start-up cost

        endpoint = self.guest_endpoint(host, vm)
        assert endpoint.key_file is not None
        workdir.mkdir(parents=True, exist_ok=True)
        known_hosts = workdir / "known_hosts"
        known_as = endpoint.host if endpoint.port == 22 else f"[{endpoint.host}]:{endpoint.port}"  # OpenSSH's form
        known_hosts.write_text(f"{known_as} {endpoint.host_key}\n", encoding="utf-8")
        junit = workdir / "junit.xml"
        cmd = imagetest.suite_command(
            self.settings, imagetest.suite_files(self.settings.data, suites),
            hostspec=f"paramiko://{endpoint.user}@{endpoint.host}:{endpoint.port}", key_file=endpoint.key_file,
            known_hosts=known_hosts, family=family, junit=junit, platform=platform)
        proc = subprocess.run(cmd, cwd=self.settings.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=600)
        (workdir / "pytest.log").write_text(proc.stdout, encoding="utf-8")
        if proc.returncode not in (0, 1):
            raise LabError(f"pytest could not run the suites against {vm.name} (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}")
        return imagetest.parse_junit(junit)


def start_lab(lab_dir: Path, real_boot: str | list[str] = "all", time_scale: float = 1.0,
              base: Settings | None = None, *, extra_hosts: Sequence[tuple[str, str]] = (),
              placement: dict[str, str] | None = None,
              wire: dict[str, Any] | None = None,
              cluster_knob: dict[str, Any] | None = None) -> tuple[LabHandle, IO[str]]:
    """A lab on a free slot in lab_dir (the fixtures' engine; also usable from scripts); ``extra_hosts``
    (name, role) beside the example site's two, ``placement`` per plane, ``wire`` (lab/wire.py), ``cluster_knob``
    a modelled cluster beside them (lab/cluster.py, e.g. ``{"name": "labc", "nodes": 3}``) (lab.json's knobs)."""
    base = base or Settings.from_mapping({})
    settings = dataclasses.replace(base, lab_dir=lab_dir)
    nodes = int({**cluster.DEFAULT_CLUSTER, **cluster_knob}["nodes"]) if cluster_knob else 0
    slot, slot_lock = claim_slot(2 + len(extra_hosts) + nodes)
    cfg = controller.default_config(settings, slot=slot)
    for name, role in extra_hosts:
        controller.add_host(cfg, name, role)
    cfg.cluster = dict(cluster_knob) if cluster_knob else None
    cfg.placement = dict(placement or {})
    cfg.real_boot = real_boot
    cfg.time_scale = time_scale
    cfg.wire = wire
    try:
        lab = controller.up(settings, cfg)
    except BaseException:
        controller.down(settings)
        slot_lock.close()
        raise
    handle = LabHandle(settings, lab)
    handle._environment.enter_context(controller.vault_environment(lab.paths))
    return handle, slot_lock


def stop_lab(handle: LabHandle, slot_lock: IO[str]) -> None:
    try:
        handle._environment.close()
        controller.down(handle.base_settings)
    finally:
        shutil.rmtree(handle.paths.state_dir, ignore_errors=True)
        slot_lock.close()


@contextlib.contextmanager
def running_lab(lab_dir: Path, *args: Any, **kwargs: Any) -> Iterator[LabHandle]:
    """start_lab's lab for the block, stopped (and its slot freed) however the block ends."""
    handle, slot_lock = start_lab(lab_dir, *args, **kwargs)
    try:
        yield handle
    finally:
        stop_lab(handle, slot_lock)


def _real_boot(value: str) -> str | list[str]:
    return value if value in ("all", "none") else [v for v in value.split(",") if v]


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    """A running two-hypervisor lab for the whole session."""
    lab_dir = tmp_path_factory.mktemp("lab")
    with running_lab(lab_dir, _real_boot(str(request.config.getoption("--lab-real-boot")))) as handle:
        yield handle


# The cluster lab: two tenant hosts (pve-tenant, pve-tenant2) and the mgmt host beside a three-node cluster
# (pve-c1..pve-c3, tenant plane), the tenant plane spread over all five (docs/lab.md, "A cluster").
CLUSTER_LAB = {"extra_hosts": [("pve-tenant2", "tenant")], "placement": {"tenant": "spread"},
               "cluster_knob": {"name": "labc", "nodes": 3}}


@pytest.fixture(scope="session")
def cluster_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    """A running lab with the modelled three-node cluster beside the independent hosts, for the session."""
    lab_dir = tmp_path_factory.mktemp("cluster-lab")
    with running_lab(lab_dir, _real_boot(str(request.config.getoption("--lab-real-boot"))),
                     **CLUSTER_LAB) as handle:
        yield handle


def _reset_for_the_test(handle: LabHandle) -> Iterator[LabHandle]:
    handle.reset()
    yield handle
    with contextlib.suppress(LabError):
        handle.clear_faults()


@pytest.fixture
def fresh_cluster_lab(cluster_lab: LabHandle) -> Iterator[LabHandle]:
    """The session's cluster lab, reset: every node online, no VMs, disks, imports, locks or faults."""
    yield from _reset_for_the_test(cluster_lab)


@pytest.fixture
def fresh_lab(lab: LabHandle) -> Iterator[LabHandle]:
    """The session lab, reset to fresh hosts before the test (no VMs, disks, imports, tasks, faults)."""
    yield from _reset_for_the_test(lab)


__all__ = ["CLUSTER_LAB", "NODE_RELEASES", "NODE_RELEASE_IDS", "LabHandle", "claim_slot", "cluster_lab",
           "fresh_cluster_lab", "fresh_lab", "lab", "running_lab", "start_lab", "stop_lab"]
