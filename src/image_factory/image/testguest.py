"""The image test's guest: the artifact booted the way Proxmox boots a clone, reachable over SSH.

The artifact is never written: the guest runs on a throwaway qcow2 overlay backed by it. A NoCloud seed (an
ISO on ide2, like the PVE cloud-init drive) carries an ephemeral SSH key for a test user, a hostname and a
network config matching a fixed, locally administered MAC. The NIC is virtio-net with user networking
forwarded from 127.0.0.1 only, the disk sits on virtio-scsi (PVE's scsihw), and a virtio-serial port carries
the QEMU guest agent channel (PVE's agent=1). The serial console goes to a log file.

Host keys are never trusted blindly: cloud-init prints the host keys it generated at this first boot to the
serial console (a channel the guest cannot be impersonated on); they are parsed from the serial log into a
known_hosts file, and every SSH connection verifies against it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from image_factory.errors import FactoryError
from image_factory.image import contents as contents_mod
from image_factory.image import firmware
from image_factory.image.qemuvm import accel_args, console_panicked, free_port, make_seed_iso, require_qemu
from image_factory.platform import Platform
from image_factory.settings import Settings

TEST_USER = "factorytest"
# Locally administered (bit 1 of the first octet set), unicast; fixed like an inventory MAC.
TEST_MAC = "02:de:e7:00:00:5e"
KEYS_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
KEYS_END = "-----END SSH HOST KEY KEYS-----"
HOST_KEY_RE = re.compile(r"((?:ssh|ecdsa|sk)-[A-Za-z0-9@.\-]+) ([A-Za-z0-9+/]+=*)")


class ImageTestError(FactoryError):
    pass



def parse_host_keys(serial_text: str) -> list[tuple[str, str]]:
    """(type, base64) pairs from the last complete cloud-init host-key block on the console."""
    text = serial_text.replace("\r", "")
    end = text.rfind(KEYS_END)
    if end < 0:
        return []
    begin = text.rfind(KEYS_BEGIN, 0, end)
    if begin < 0:
        return []
    keys = []
    for line in text[begin + len(KEYS_BEGIN) : end].splitlines():
        m = HOST_KEY_RE.search(line)
        if m:
            keys.append((m.group(1), m.group(2)))
    return keys


def known_hosts_lines(keys: list[tuple[str, str]], host: str, port: int) -> str:
    name = host if port == 22 else f"[{host}]:{port}"
    return "".join(f"{name} {t} {b}\n" for t, b in keys)


def make_ssh_key(directory: Path) -> tuple[Path, str]:
    """A fresh Ed25519 key pair (private key file 0600, public key line)."""
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path = directory / "id_ed25519"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv)
    return path, pub.decode() + " image-factory-test"


def seed_files(hostname: str, instance_id: str, public_key: str, mac: str) -> dict[str, str]:
    """NoCloud meta-data, user-data and network-config (v2, matched by MAC like PVE's drive)."""
    meta = f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"
    user = (
        "#cloud-config\n"
        "users:\n"
        "  - default\n"
        f"  - name: {TEST_USER}\n"
        "    gecos: image test user (ephemeral)\n"
        "    shell: /bin/bash\n"
        "    lock_passwd: true\n"
        '    sudo: "ALL=(ALL) NOPASSWD:ALL"\n'
        "    ssh_authorized_keys:\n"
        f"      - {public_key}\n"
    )
    net = (
        "version: 2\n"
        "ethernets:\n"
        "  nic0:\n"
        "    match:\n"
        f"      macaddress: '{mac.lower()}'\n"
        "    dhcp4: true\n"
    )
    return {"meta-data": meta, "user-data": user, "network-config": net}



# --------------------------------------------------------------------------------------- the guest


@dataclass
class Guest:
    """A running test VM (see ``boot_guest``); ``stop`` kills it and removes its work directory."""

    proc: subprocess.Popen[bytes]
    workdir: Path
    port: int
    serial_log: Path
    qga_socket: Path
    key_file: Path
    known_hosts: Path
    sockdir: Path
    qmp_socket: Path | None = None
    user: str = TEST_USER
    host_keys: list[tuple[str, str]] = field(default_factory=list)
    services: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the VM's swtpm

    @property
    def hostspec(self) -> str:
        return f"paramiko://{self.user}@127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.services.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(self.sockdir, ignore_errors=True)


def boot_guest(
    settings: Settings,
    artifact: Path,
    artifact_format: str,
    *,
    workdir_parent: Path,
    hostname: str,
    mac: str = TEST_MAC,
    memory: int = 1024,
    cpus: int = 2,
    firmware_kind: str = "bios",
    platform: Platform | None = None,
) -> Guest:
    """Start the artifact on an overlay with a NoCloud seed; returns at once (see ``wait_for_ssh``).
    ``platform`` (the manifest's) gives the firmware, machine, Secure Boot keys and TPM; else ``firmware_kind``."""
    platform = platform or Platform(firmware_kind, machine="q35" if firmware_kind == "uefi" else "pc")
    services = contextlib.ExitStack()
    qemu = require_qemu()
    workdir_parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".imagetest-", dir=workdir_parent))
    sockdir: Path | None = None
    try:
        overlay = workdir / "overlay.qcow2"
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", artifact_format,
               "-b", str(artifact.resolve()), str(overlay)]  # fmt: skip
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise ImageTestError(f"overlay: qemu-img create failed: {proc.stdout.decode(errors='replace')}")
        key_file, pub = make_ssh_key(workdir)
        instance_id = f"imagetest-{os.urandom(6).hex()}"
        iso = make_seed_iso(workdir, seed_files(hostname, instance_id, pub, mac))
        # A unix socket path must stay under 108 bytes: keep it in a short temporary directory.
        sockdir = Path(tempfile.mkdtemp(prefix="qga-"))
        machine = ["-machine", platform.machine]
        if platform.firmware == "uefi":
            machine = firmware.prepare(workdir, machine=platform.machine, secure_boot=platform.secure_boot,
                                       keys=platform.keys, family=platform.family).qemu_args()
        if platform.tpm:
            machine += services.enter_context(firmware.swtpm(sockdir / "tpm")).qemu_args()
        vm = _GuestVm(overlay, iso, workdir / "serial.log", sockdir, mac, memory, cpus)
        qproc, port = _start_qemu([qemu, *accel_args(settings.accelerator), *machine], vm)
        return Guest(qproc, workdir, port, vm.serial, vm.qga, key_file, workdir / "known_hosts", sockdir, vm.qmp,
                     services=services)
    except BaseException:
        services.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if sockdir is not None:
            shutil.rmtree(sockdir, ignore_errors=True)
        raise


@dataclass(frozen=True)
class _GuestVm:
    """The test VM's disks, console, sockets and NIC, as PVE gives a clone of the template."""

    overlay: Path
    seed_iso: Path
    serial: Path
    sockdir: Path
    mac: str
    memory: int
    cpus: int

    @property
    def qga(self) -> Path:
        return self.sockdir / "qga.sock"

    @property
    def qmp(self) -> Path:
        return self.sockdir / "qmp.sock"

    def qemu_args(self, port: int) -> list[str]:
        return [
            "-m", str(self.memory), "-smp", str(self.cpus),
            "-nodefaults", "-display", "none", "-no-user-config",
            "-device", "virtio-scsi-pci,id=scsihw0",
            "-drive", f"file={self.overlay},if=none,id=drive-scsi0,format=qcow2,cache=unsafe",
            "-device", "scsi-hd,bus=scsihw0.0,drive=drive-scsi0,bootindex=100",
            "-drive", f"file={self.seed_iso},if=ide,index=2,media=cdrom,format=raw,readonly=on",
            "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", f"virtio-net-pci,netdev=net0,mac={self.mac}",
            "-chardev", f"socket,id=qga0,path={self.qga},server=on,wait=off",
            "-device", "virtio-serial",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-serial", f"file:{self.serial}",
            # the image suites hot-add the pristine artifact through it (conftest: artifact_fs)
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
        ]  # fmt: skip


def _start_qemu(qemu_and_platform: list[str], vm: _GuestVm) -> tuple[subprocess.Popen[bytes], int]:
    """QEMU (the program, its accelerator and machine: ``qemu_and_platform``) running the VM with SSH forwarded
    from a free loopback port; another port when that one was taken between choosing and binding it (up to
    three tries)."""
    last_err = ""
    for _attempt in range(3):
        port = free_port()
        qproc = subprocess.Popen([*qemu_and_platform, *vm.qemu_args(port)], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        time.sleep(1.0)
        assert qproc.stderr is not None
        if qproc.poll() is None:
            qproc.stderr.close()
            return qproc, port
        last_err = qproc.stderr.read().decode(errors="replace")
        if "host forwarding" not in last_err:
            break
    raise ImageTestError(f"qemu failed to start: {last_err.strip()[-1500:]}")


def read_guest_contents(guest: Guest, family: str, timeout: float = 60.0) -> contents_mod.Contents:
    """Packages, kernel and os-release of the booted image, over an SSH session whose host key is the one
    the guest announced on its serial console."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(guest.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())

    def run(command: str) -> str:
        _, out, err = client.exec_command(command, timeout=timeout)
        text = out.read().decode(errors="replace")
        if out.channel.recv_exit_status() != 0:
            raise ImageTestError(f"reading the image's contents: `{command}` failed: "
                                 f"{err.read().decode(errors='replace').strip()[-300:]}")
        return text

    try:
        client.connect("127.0.0.1", port=guest.port, username=guest.user, key_filename=str(guest.key_file),
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                       allow_agent=False, look_for_keys=False)  # fmt: skip
        return contents_mod.read_contents(run, family)
    except (paramiko.SSHException, OSError) as exc:
        raise ImageTestError(f"reading the image's contents over SSH failed: {exc}") from None
    finally:
        client.close()


def _ssh_ready(guest: Guest, timeout: float) -> bool:
    client = paramiko.SSHClient()
    client.load_host_keys(str(guest.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect("127.0.0.1", port=guest.port, username=guest.user, key_filename=str(guest.key_file),
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                       allow_agent=False, look_for_keys=False)  # fmt: skip
        _, out, _ = client.exec_command("true", timeout=timeout)
        return out.channel.recv_exit_status() == 0
    except paramiko.BadHostKeyException as exc:
        raise ImageTestError(
            f"guest host key does not match the key it announced on the serial console: {exc}"
        ) from None
    except (paramiko.SSHException, OSError, EOFError):
        return False
    finally:
        client.close()


class GuestPanicked(ImageTestError):
    """The guest's kernel panicked (its console says so): it will never answer."""


def wait_for_ssh(guest: Guest, timeout: float) -> float:
    """Wait until the guest announced its host keys on the console and SSH works; seconds taken."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if not guest.alive():
            raise ImageTestError(f"the guest stopped during boot; serial console tail:\n{_tail(guest.serial_log)}")
        text = guest.serial_log.read_text(encoding="utf-8", errors="replace") if guest.serial_log.exists() else ""
        if console_panicked(guest.serial_log):
            raise GuestPanicked(f"the guest's kernel panicked during boot; serial console tail:\n"
                                f"{_tail(guest.serial_log, 40)}")
        if not guest.host_keys:
            keys = parse_host_keys(text)
            if keys:
                guest.host_keys = keys
                guest.known_hosts.write_text(known_hosts_lines(keys, "127.0.0.1", guest.port), encoding="utf-8")
        if guest.host_keys and _ssh_ready(guest, timeout=10):
            return time.monotonic() - start
        time.sleep(1.0)
    what = "SSH" if guest.host_keys else "the host keys on the serial console (cloud-init keys_to_console)"
    raise ImageTestError(f"timed out after {timeout:.0f}s waiting for {what}; serial tail:\n{_tail(guest.serial_log)}")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no serial output)"
    return "\n".join(text.replace("\r", "").strip().splitlines()[-lines:])
