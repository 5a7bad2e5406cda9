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
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from image_factory.lab import cluster, controller, sshd
from image_factory.lab.config import LabConfig, LabError, LabPaths, host_address, vm_address
from image_factory.lab.control import Control
from image_factory.settings import Settings
from image_factory.site.inventory import Hypervisor, Site

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


def _real_boot(value: str) -> str | list[str]:
    return value if value in ("all", "none") else [v for v in value.split(",") if v]


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    """A running two-hypervisor lab for the whole session."""
    lab_dir = tmp_path_factory.mktemp("lab")
    handle, slot_lock = start_lab(lab_dir, _real_boot(str(request.config.getoption("--lab-real-boot"))))
    try:
        yield handle
    finally:
        stop_lab(handle, slot_lock)


# The cluster lab: two tenant hosts (pve-tenant, pve-tenant2) and the mgmt host beside a three-node cluster
# (pve-c1..pve-c3, tenant plane), the tenant plane spread over all five (docs/lab.md, "A cluster").
CLUSTER_LAB = {"extra_hosts": [("pve-tenant2", "tenant")], "placement": {"tenant": "spread"},
               "cluster_knob": {"name": "labc", "nodes": 3}}


@pytest.fixture(scope="session")
def cluster_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    """A running lab with the modelled three-node cluster beside the independent hosts, for the session."""
    lab_dir = tmp_path_factory.mktemp("cluster-lab")
    handle, slot_lock = start_lab(lab_dir, _real_boot(str(request.config.getoption("--lab-real-boot"))),
                                  **CLUSTER_LAB)  # type: ignore[arg-type]
    try:
        yield handle
    finally:
        stop_lab(handle, slot_lock)


@pytest.fixture
def fresh_cluster_lab(cluster_lab: LabHandle) -> Iterator[LabHandle]:
    """The session's cluster lab, reset: every node online, no VMs, disks, imports, locks or faults."""
    cluster_lab.reset()
    yield cluster_lab
    with contextlib.suppress(LabError):
        cluster_lab.clear_faults()


@pytest.fixture
def fresh_lab(lab: LabHandle) -> Iterator[LabHandle]:
    """The session lab, reset to fresh hosts before the test (no VMs, disks, imports, tasks, faults)."""
    lab.reset()
    yield lab
    with contextlib.suppress(LabError):
        lab.clear_faults()


__all__ = ["CLUSTER_LAB", "NODE_RELEASES", "NODE_RELEASE_IDS", "LabHandle", "claim_slot", "cluster_lab",
           "fresh_cluster_lab", "fresh_lab", "lab", "start_lab", "stop_lab"]
