"""One OpenSSH sshd per lab hypervisor, on its own loopback address, root login by the lab key only."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from image_factory.lab.config import LabError, LabHost, LabPaths, write_public
from image_factory.lab.pki import ensure_ssh_key
from image_factory.lab.wire import exec_prefix

SSHD = "/usr/sbin/sshd"


def host_key_path(paths: LabPaths, name: str) -> Path:
    return paths.host_dir(name) / "ssh" / "ssh_host_ed25519_key"


def prepare(paths: LabPaths, host: LabHost, client_public: str) -> tuple[Path, str]:
    """Write the host key, authorized_keys and sshd_config; returns (config path, pinned host key)."""
    ssh_dir = paths.host_dir(host.name) / "ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    host_key = " ".join(ensure_ssh_key(host_key_path(paths, host.name), f"root@{host.node}").split()[:2])
    authorized = ssh_dir / "authorized_keys"
    write_public(authorized, client_public + "\n")
    authorized.chmod(0o600)
    home = paths.host_dir(host.name) / "home"
    home.mkdir(exist_ok=True)
    # A PVE host's root has Debian's stock shell start-up; this machine's root may not (pyenv's init in
    # ~/.bashrc, which bash reads for every SSH command: 135 ms each, docs/lab-notes.md).
    write_public(home / ".bashrc", "# the lab host's root: Debian's defaults\n")
    config = ssh_dir / "sshd_config"
    lines = [
        f"ListenAddress {host.address}:{host.ssh_port}",
        f"HostKey {host_key_path(paths, host.name)}",
        f"PidFile {paths.run / (host.name + '-sshd.daemon.pid')}",
        f"AuthorizedKeysFile {authorized}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "PrintMotd no",
        "UseDNS no",
        "MaxStartups 50:30:100",
        "MaxSessions 50",
        "Subsystem sftp internal-sftp",
        "LogLevel INFO",
        f"SetEnv HOME={home}",
    ]
    write_public(config, "\n".join(lines) + "\n")
    return config, host_key


def start(paths: LabPaths, host: LabHost, config: Path, netns: str | None = None) -> subprocess.Popen[bytes]:
    """Start sshd in the foreground of its own session (inside the network namespace, if given); returns its
    process (its pid is sshd's: ``ip netns exec`` replaces itself)."""
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise LabError(f"{host.name}: sshd refuses its config {config}: {check.stderr.strip()}")
    log = paths.log / f"{host.name}-sshd.log"
    proc = subprocess.Popen(
        [*exec_prefix(netns), SSHD, "-D", "-f", str(config), "-E", str(log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc


def session_pids(sshd_pid: int) -> list[int]:
    """Pids of the sshd processes serving sessions (children of the listener)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == sshd_pid:
            out.append(int(entry.name))
    return out


def cut_sessions(sshd_pid: int) -> int:
    """Kill every session of this sshd (the listener stays up); returns how many were cut."""
    pids = session_pids(sshd_pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)
