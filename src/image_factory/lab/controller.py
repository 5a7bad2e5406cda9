"""lab.up / lab.status / lab.down: the two-hypervisor lab's processes, tracked by pid.

Every process the lab starts is recorded in a pid file (run/<host>-sshd.pid, run/<host>-pve.pid)
or, for a running VM's qemu, in hosts/<host>/vms/<vmid>.json. Stopping verifies that a recorded
pid still runs the lab's own command line (which names a file inside the lab directory) before
signalling it, so a recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from image_factory.errors import ValidationFailed
from image_factory.lab import cluster, sshd, wire
from image_factory.lab.config import (
    IMAGES_STORAGE_BY_ROLE,
    LAB_STORAGE,
    PVE_VERSION,
    PVE_VERSIONS_BY_ROLE,
    TOKEN_ID,
    LabConfig,
    LabError,
    LabHost,
    LabPaths,
    host_address,
    playbook_grants,
    private_dir,
    write_private,
    write_public,
)
from image_factory.lab.control import Control
from image_factory.lab.inventory import (
    InventoryDumper,
    InventoryLoader,
    example_inventory,
    example_vm_names,
    vault_environment,
    vault_variables,
    write_inventory,
)
from image_factory.lab.pki import ensure_ca, ensure_node_cert, ensure_ssh_key
from image_factory.lab.spec import NodeSpec
from image_factory.settings import REPO_ROOT, Settings
from image_factory.site.inventory import Site, load_site

START_TIMEOUT = 30.0


@dataclass
class Lab:
    """A lab that is up: where everything is, and the Settings/Site that target it."""

    paths: LabPaths
    config: LabConfig
    settings: Settings

    @property
    def inventory(self) -> Path:
        return self.paths.inventory

    def site(self) -> Site:
        with vault_environment(self.paths):
            return load_site(self.settings.inventory, self.settings.images)




def lab_settings(settings: Settings, paths: LabPaths) -> Settings:
    """The same settings, with the lab inventory as the inventory."""
    return dataclasses.replace(settings, inventory=paths.inventory_dir, lab_dir=paths.lab_dir)


# ------------------------------------------------------------------------------- config




def default_config(settings: Settings, slot: int = 0) -> LabConfig:
    groups = example_inventory(settings)
    hosts = []
    for i, (name, hvars) in enumerate((groups.get("hypervisors") or {}).get("hosts", {}).items()):
        pve = (hvars or {}).get("pve") or {}
        role = pve.get("role", "mgmt")
        hosts.append(LabHost(
            name=name, node=pve.get("node", name), role=role, address=host_address(slot, i),
            tls="ca" if pve.get("tls_ca_file") else "fingerprint",
            pve_version=PVE_VERSIONS_BY_ROLE.get(role, PVE_VERSION),
            images_storage=IMAGES_STORAGE_BY_ROLE.get(role, LAB_STORAGE),
        ))
    if not hosts:
        raise LabError("the example inventory has no hypervisors to mirror")
    return LabConfig(slot=slot, hosts=hosts)


def add_host(cfg: LabConfig, name: str, role: str) -> LabHost:
    """One more lab hypervisor of ``role`` beside the example site's (next address of the slot), set up as the
    example's host of that role is; its inventory entry copies that host's VMID ranges and bridge."""
    like = next(h for h in cfg.hosts if h.role == role)
    host = dataclasses.replace(like, name=name, node=name, address=host_address(cfg.slot, len(cfg.hosts)))
    cfg.hosts.append(host)
    return host


def load_config(paths: LabPaths) -> LabConfig | None:
    if not paths.config.exists():
        return None
    try:
        return LabConfig.from_mapping(json.loads(paths.config.read_text()))
    except (ValueError, TypeError) as exc:
        raise LabError(f"{paths.config}: not a valid lab configuration: {exc}") from None


# ------------------------------------------------------------------------------ processes


# A process in the middle of execve reads as an empty /proc/<pid>/cmdline: its new memory is in place before its
# arguments are (load_elf_binary), and Popen returns as soon as the exec is past its point of no return. Right after
# Popen about one read in four is empty here, and `ip netns exec` (a wired lab's sshd) execs twice.
EXEC_SETTLE_S = 1.0
PF_EXITING, PF_KTHREAD = 0x4, 0x200000  # <linux/sched.h>: a command line that stays empty


def _may_be_in_exec(pid: int) -> bool:
    """Alive and neither a kernel thread nor exiting (both read an empty command line for good)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in ("Z", "X") and not int(fields[6]) & (PF_EXITING | PF_KTHREAD)


def _cmdline(pid: int) -> str:
    """The process's command line; one read as empty while it may be in an exec is read again until it settles."""
    deadline = time.monotonic() + EXEC_SETTLE_S
    while True:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return ""
        if raw or time.monotonic() >= deadline or not _may_be_in_exec(pid):
            return raw.replace(b"\0", b" ").decode(errors="replace")
        time.sleep(0.005)


def _is_ours(pid: int, marker: str) -> bool:
    """The pid runs and its command line names the lab file `marker`."""
    if pid <= 1:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return False
    return marker in _cmdline(pid)


def _gone_at_start(child: subprocess.Popen[bytes] | None, pidfile: Path, marker: str) -> bool:
    """Whether a host's sshd or API server is gone while the lab waits for it: one this start made is judged by
    its own exit status, one that ran before by its pid file and command line."""
    if child is not None:
        return child.poll() is not None
    pid = _read_pid(pidfile)
    return pid is None or not _is_ours(pid, marker)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _terminate(pid: int, marker: str, grace: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after grace seconds; True if it was running."""
    if not _is_ours(pid, marker):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _is_ours(pid, marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _is_ours(pid, marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _is_ours(pid, marker) and time.monotonic() < deadline:
            time.sleep(0.05)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return True


@contextlib.contextmanager
def _locked(paths: LabPaths) -> Iterator[None]:
    paths.run.mkdir(parents=True, exist_ok=True)
    with (paths.run / "lab.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sshd_marker(paths: LabPaths, name: str) -> str:
    return str(paths.host_dir(name) / "ssh" / "sshd_config")


def _pve_marker(paths: LabPaths, name: str) -> str:
    return str(paths.host_dir(name) / "pve.json")


def _api_up(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


def _ssh_up(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1) as s:
            s.settimeout(2)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------- up


def _bridges(groups: dict[str, Any], host: LabHost) -> list[str]:
    """The bridges the example site needs on this host: its default bridge and its VMs' NIC bridges."""
    hv = ((groups.get("hypervisors") or {}).get("hosts") or {}).get(host.name) or {}
    default = str((hv.get("pve") or {}).get("bridge", "vmbr0"))
    out = [default]
    for group, body in groups.items():
        for hvars in (body.get("hosts") or {}).values():
            vm = (hvars or {}).get("vm")
            if not isinstance(vm, dict):
                continue
            if vm.get("hypervisor", None) not in (None, host.name) or (not vm.get("hypervisor") and group != host.role):
                continue
            for nic in vm.get("nics") or []:
                bridge = str((nic or {}).get("bridge") or default)
                if bridge not in out:
                    out.append(bridge)
    return out


def _prepare_host(paths: LabPaths, cfg: LabConfig, host: LabHost, client_public: str,
                  bridges: list[str], netns: str | None) -> dict[str, Any]:
    hdir = paths.host_dir(host.name)
    hdir.mkdir(parents=True, exist_ok=True)
    cert, key = hdir / "pve-ssl.pem", hdir / "pve-ssl.key"
    ensure_node_cert(paths.ca_cert, paths.ca_key, cert, key, host.node, host.address)
    secret_file = paths.token_secret(cluster.secret_owner(host))
    if not secret_file.exists():
        write_private(secret_file, secrets.token_hex(4) + "-" + "-".join(
            secrets.token_hex(n) for n in (2, 2, 2, 6)) + "\n")
    root_pw = paths.state_dir / f"{cluster.secret_owner(host)}.root-password"
    if not root_pw.exists():
        write_private(root_pw, secrets.token_urlsafe(18) + "\n")
    sshd_config, host_key = sshd.prepare(paths, host, client_public)
    storage = paths.storage_dir(host.name)
    storages = [LAB_STORAGE, host.images_storage] + ([cluster.SHARED_STORAGE] if host.cluster else [])
    spec = NodeSpec(
        name=host.name, node=host.node, address=host.address, port=host.api_port, cert=cert, key=key,
        version=host.pve_version, token_id=TOKEN_ID, token_secret_file=secret_file, root_password_file=root_pw,
        privileges=playbook_grants(REPO_ROOT, host.pve_version, host.node, storages),
        storage_dir=storage, staging_dir=hdir / "root" / "var" / "tmp", vms_dir=paths.vms_dir(host.name),
        thin_dir=hdir / "root" / "dev" / "pve",
        log_dir=paths.log, control_socket=paths.control_socket(host.name), slot=cfg.slot,
        time_scale=cfg.time_scale, durations=cfg.durations, real_boot=cfg.real_boot,
        vm_memory_cap=cfg.vm_memory_cap,
        extra={"bridges": bridges, "netns": netns, **cluster.node_extra(paths, cfg, host)},
    )
    write_public(hdir / "pve.json", json.dumps(spec.to_mapping(), indent=2, sort_keys=True) + "\n")
    return {"sshd_config": sshd_config, "host_key": host_key, "cert": cert, "spec": spec}


def up(settings: Settings, config: LabConfig | None = None) -> Lab:
    """Bring the lab up (idempotent: running parts are left alone); returns the Lab."""
    paths = LabPaths(settings.lab_dir)
    paths.lab_dir.mkdir(parents=True, exist_ok=True)
    with _locked(paths):
        cfg = config or load_config(paths) or default_config(settings)
        cluster.ensure_nodes(cfg, str(paths.config))
        cfg.validate(example_vm_names(settings), str(paths.config))
        write_public(paths.config, cfg.to_json())
        for d in (paths.log, paths.run):
            d.mkdir(parents=True, exist_ok=True)
        private_dir(paths.pki)
        private_dir(paths.client_key.parent)
        private_dir(paths.state_dir)
        ensure_ca(paths.ca_cert, paths.ca_key)
        client_public = ensure_ssh_key(paths.client_key, "lab-client@deevnet-image-factory")
        groups = example_inventory(settings)
        netns = _wire_up(paths, cfg)
        write_public(paths.config, cfg.to_json())
        prepared = {h.name: _prepare_host(paths, cfg, h, client_public, _bridges(groups, h), netns[h.name])
                    for h in cfg.hosts}
        started: list[tuple[int, str]] = []
        children: dict[tuple[str, str], subprocess.Popen[bytes]] = {}
        try:
            for host in cfg.hosts:
                _start_host(paths, cfg, host, prepared[host.name], netns[host.name], started, children)
            _wait_ready(paths, cfg, children)
        except BaseException:
            for pid, marker in started:
                _terminate(pid, marker, grace=3)
            if cfg.wire and not _any_running(paths, cfg):
                wire.teardown(cfg.slot)
            raise
        write_inventory(settings, paths, cfg, {h: (p["host_key"], p["cert"]) for h, p in prepared.items()},
                        client_public)
    lab = Lab(paths, cfg, lab_settings(settings, paths))
    try:
        lab.site()
    except ValidationFailed as exc:
        raise LabError(f"the generated lab inventory {paths.inventory} does not validate: {exc}") from None
    return lab


def _start_host(paths: LabPaths, cfg: LabConfig, host: LabHost, p: dict[str, Any], netns: str | None,
                started: list[tuple[int, str]], children: dict[tuple[str, str], subprocess.Popen[bytes]]) -> None:
    """The host's sshd and API server, each unless it runs (a cluster's nodes share one API process)."""
    sshd_pidfile, pve_pidfile = paths.pidfile(host.name, "sshd"), paths.pidfile(host.name, "pve")
    pid = _read_pid(sshd_pidfile)
    if pid is None or not _is_ours(pid, _sshd_marker(paths, host.name)):
        children[(host.name, "sshd")] = sshd_proc = sshd.start(paths, host, p["sshd_config"], netns)
        write_public(sshd_pidfile, f"{sshd_proc.pid}\n")
        started.append((sshd_proc.pid, _sshd_marker(paths, host.name)))
    pid = _read_pid(pve_pidfile)
    if host.cluster:
        if host is cluster.members(cfg)[0]:
            _start_cluster_api(paths, cfg, started, children)
    elif pid is None or not _is_ours(pid, _pve_marker(paths, host.name)):
        log = (paths.log / f"{host.name}-pve.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "image_factory.lab.pve_server", "--config", _pve_marker(paths, host.name)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        write_public(pve_pidfile, f"{proc.pid}\n")
        started.append((proc.pid, _pve_marker(paths, host.name)))
        children[(host.name, "pve")] = proc


def _start_cluster_api(paths: LabPaths, cfg: LabConfig, started: list[tuple[int, str]],
                       children: dict[tuple[str, str], subprocess.Popen[bytes]]) -> None:
    """The cluster's one API process for all its nodes, unless it runs (then every node's pid file names it)."""
    nodes = cluster.members(cfg)
    pids = {_read_pid(paths.pidfile(h.name, "pve")) for h in nodes}
    if len(pids) == 1 and all(p is not None and _is_ours(p, _pve_marker(paths, h.name)) for p in pids for h in nodes):
        return
    for pid in pids:  # a process serving only some of the nodes (a changed lab.json) is replaced
        marker = next((m for h in nodes if pid is not None and _is_ours(pid, m := _pve_marker(paths, h.name))), None)
        if pid is not None and marker is not None:
            _terminate(pid, marker, grace=15)
    proc = cluster.start_api(paths, nodes)
    for host in nodes:
        write_public(paths.pidfile(host.name, "pve"), f"{proc.pid}\n")
        children[(host.name, "pve")] = proc
    started.append((proc.pid, _pve_marker(paths, nodes[0].name)))


def _any_running(paths: LabPaths, cfg: LabConfig) -> bool:
    for host in cfg.hosts:
        for kind, marker in (("sshd", _sshd_marker(paths, host.name)), ("pve", _pve_marker(paths, host.name))):
            pid = _read_pid(paths.pidfile(host.name, kind))
            if pid is not None and _is_ours(pid, marker):
                return True
    return False


def _wire_up(paths: LabPaths, cfg: LabConfig) -> dict[str, str | None]:
    """Each host's network namespace (None: loopback) with the host's address set to match; the wire is made
    (after removing what a crashed lab of this slot left) unless the lab already runs on it."""
    shaped = wire.parse(cfg.wire, str(paths.config))
    if shaped is None:
        for i, host in enumerate(cfg.hosts):
            if host.address.startswith("198.18."):  # the lab ran on a wire before
                host.address = host_address(cfg.slot, i)
        return {h.name: None for h in cfg.hosts}
    if not _any_running(paths, cfg):
        wire.setup(cfg.slot, len(cfg.hosts), shaped)
    elif not wire.leftovers(cfg.slot):
        raise LabError(f"{paths.config}: the wire was added while the lab runs on loopback: `invoke lab.down` first "
                       "(or give lab.up --wire, which restarts the hosts)")
    for i, host in enumerate(cfg.hosts):
        host.address = wire.host_address(cfg.slot, i)
    return {h.name: wire.host_netns(cfg.slot, i) for i, h in enumerate(cfg.hosts)}


def _exit_status(proc: subprocess.Popen[bytes] | None) -> str:
    """How a child that is gone ended (a signal leaves no line in its log), or '' for a process not ours."""
    if proc is None or proc.poll() is None:
        return ""
    if proc.returncode < 0:
        return f" (killed by {signal.Signals(-proc.returncode).name})"
    return f" (status {proc.returncode})"


def _wait_ready(paths: LabPaths, cfg: LabConfig,
                children: dict[tuple[str, str], subprocess.Popen[bytes]] | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    pending = {(h.name, kind) for h in cfg.hosts for kind in ("sshd", "pve")}
    while pending:
        for host in cfg.hosts:
            if (host.name, "sshd") in pending and _ssh_up(host.address, host.ssh_port):
                pending.discard((host.name, "sshd"))
            if (host.name, "pve") in pending and _api_up(host.address, host.api_port) \
                    and paths.control_socket(host.name).exists():
                pending.discard((host.name, "pve"))
        for name, kind in list(pending):
            child = (children or {}).get((name, kind))
            marker = _sshd_marker(paths, name) if kind == "sshd" else _pve_marker(paths, name)
            if _gone_at_start(child, paths.pidfile(name, kind), marker):
                status = _exit_status(child)
                log = cluster.log_file(paths, cfg.host(name)) if kind == "pve" else paths.log / f"{name}-{kind}.log"
                raise LabError(f"{name}: {kind} exited at start{status}: {_tail(log) or '(its log is empty)'}")
        if not pending:
            break
        if time.monotonic() > deadline:
            raise LabError(f"lab did not come up within {START_TIMEOUT:.0f}s: waiting for "
                           f"{', '.join(f'{n} {k}' for n, k in sorted(pending))}")
        time.sleep(0.05)




# --------------------------------------------------------------------------------- status


def _vm_records(paths: LabPaths, name: str) -> list[dict[str, Any]]:
    out = []
    vdir = paths.vms_dir(name)
    if vdir.is_dir():
        for f in sorted(vdir.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(f.read_text()))
    return out


def status(settings: Settings) -> dict[str, Any]:
    paths = LabPaths(settings.lab_dir)
    cfg = load_config(paths)
    if cfg is None:
        return {"lab_dir": str(paths.lab_dir), "up": False, "hosts": {}}
    hosts: dict[str, Any] = {}
    for host in cfg.hosts:
        sshd_pid = _read_pid(paths.pidfile(host.name, "sshd"))
        pve_pid = _read_pid(paths.pidfile(host.name, "pve"))
        sshd_ok = sshd_pid is not None and _is_ours(sshd_pid, _sshd_marker(paths, host.name))
        pve_ok = pve_pid is not None and _is_ours(pve_pid, _pve_marker(paths, host.name))
        vms: list[dict[str, Any]] = []
        if pve_ok:
            with contextlib.suppress(LabError):
                for vm in Control(paths.control_socket(host.name), timeout=10).call("state")["vms"]:
                    vms.append({k: vm[k] for k in ("vmid", "name", "status", "template")} | {"qemu": vm["qemu"]})
        hosts[host.name] = {
            "node": host.node, "role": host.role, "address": host.address,
            "api": f"https://{host.address}:{host.api_port}", "ssh": f"{host.address}:{host.ssh_port}",
            "sshd_pid": sshd_pid if sshd_ok else None, "pve_pid": pve_pid if pve_ok else None,
            "vms": vms, "qemu": _vm_records(paths, host.name),
        }
    up_ = bool(hosts) and all(h["sshd_pid"] and h["pve_pid"] for h in hosts.values())
    return {"lab_dir": str(paths.lab_dir), "up": up_, "slot": cfg.slot, "inventory": str(paths.inventory),
            "real_boot": cfg.real_boot, "hosts": hosts}


# ----------------------------------------------------------------------------------- down


def down(settings: Settings) -> list[int]:
    """Stop every tracked process of the lab (VM qemus, API servers, sshds); returns the pids stopped."""
    paths = LabPaths(settings.lab_dir)
    cfg = load_config(paths)
    if cfg is None:
        return []
    stopped: list[int] = []
    with _locked(paths):
        for host in cfg.hosts:
            pve_pid = _read_pid(paths.pidfile(host.name, "pve"))
            if pve_pid is not None and _terminate(pve_pid, _pve_marker(paths, host.name), grace=15):
                stopped.append(pve_pid)
            # qemus a crashed API server left behind
            for rec in _vm_records(paths, host.name):
                pid = int(rec.get("pid", 0))
                if _terminate(pid, str(paths.vms_dir(host.name)), grace=3):
                    stopped.append(pid)
            for f in paths.vms_dir(host.name).glob("*") if paths.vms_dir(host.name).is_dir() else []:
                f.unlink(missing_ok=True)
            sshd_pid = _read_pid(paths.pidfile(host.name, "sshd"))
            if sshd_pid is not None and _is_ours(sshd_pid, _sshd_marker(paths, host.name)):
                sessions = sshd.session_pids(sshd_pid)
                if _terminate(sshd_pid, _sshd_marker(paths, host.name), grace=5):
                    stopped.append(sshd_pid)
                for pid in sessions:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            for kind in ("sshd", "pve"):
                paths.pidfile(host.name, kind).unlink(missing_ok=True)
            paths.control_socket(host.name).unlink(missing_ok=True)
        if cfg.wire is not None:
            wire.teardown(cfg.slot)
    return stopped


def reset(settings: Settings) -> None:
    """Every running host back to fresh: no VMs, disks, imports, tasks or faults."""
    paths = LabPaths(settings.lab_dir)
    info = status(settings)
    if not info["up"]:
        raise LabError(f"the lab in {paths.lab_dir} is not up (invoke lab.up)")
    for name in info["hosts"]:
        Control(paths.control_socket(name)).call("reset")


def leftovers(settings: Settings) -> list[int]:
    """Pids of any process whose command line names the lab directory (should be none after down)."""
    marker = str(LabPaths(settings.lab_dir).lab_dir)
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and _is_ours(int(entry.name), marker):
            out.append(int(entry.name))
    return out


def destroy(settings: Settings) -> None:
    """down, then remove the lab directory's runtime state and the private state directory."""
    down(settings)
    paths = LabPaths(settings.lab_dir)
    shutil.rmtree(paths.state_dir, ignore_errors=True)
    shutil.rmtree(paths.lab_dir, ignore_errors=True)


# InventoryDumper .. write_inventory: the lab inventory's (lab.inventory), where callers of the controller find them
__all__ = ["InventoryDumper", "InventoryLoader", "Lab", "default_config", "destroy", "down", "example_vm_names",
           "lab_settings", "leftovers", "reset", "status", "up", "vault_environment", "vault_variables",
           "write_inventory"]
