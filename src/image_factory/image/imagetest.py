"""Image tests: boot a built artifact the way Proxmox boots a clone and run tests/image against it.

The artifact is never written: the guest runs on a throwaway qcow2 overlay backed by it (its sha256
is checked before and after). A NoCloud seed (an ISO on ide2, like the PVE cloud-init drive)
carries an ephemeral SSH key for a test user, a hostname and a network config matching a fixed,
locally administered MAC. The NIC is virtio-net with user networking forwarded from 127.0.0.1 only,
the disk sits on virtio-scsi (PVE's scsihw), and a virtio-serial port carries the QEMU guest
agent channel (PVE's agent=1). The serial console goes to a log file.

Host keys are never trusted blindly: cloud-init prints the host keys it generated at this first
boot to the serial console (a channel the guest cannot be impersonated on); they are parsed from
the serial log into a known_hosts file, and every SSH connection (the readiness probe and
testinfra's paramiko backend, made strict by tests/image/conftest.py) verifies against it.

The suites run in a pytest subprocess; JUnit XML, the pytest output, the serial log and a summary
land in builds/<image>/ and the result goes into the manifest (``manifest.record_test_result``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from image_factory.console import console, styled
from image_factory.errors import FactoryError
from image_factory.image import contents as contents_mod
from image_factory.image import firmware, manifest, render
from image_factory.image.builddir import (
    TEST_JUNIT_NAME,
    TEST_OUTPUT_NAME,
    TEST_SERIAL_NAME,
    TEST_SUMMARY_NAME,
    BuildDir,
)
from image_factory.image.manifest import ImageTestResult, sha256_file
from image_factory.image.qemuvm import (
    accel_args,
    console_panicked,
    free_port,
    make_seed_iso,
    require_qemu,
    resolve_accelerator,
)
from image_factory.platform import Platform
from image_factory.settings import Settings
from image_factory.site.inventory import Image

SUITE_DIR = Path("tests/image")
TEST_USER = "factorytest"
# Locally administered (bit 1 of the first octet set), unicast; fixed like an inventory MAC.
TEST_MAC = "02:de:e7:00:00:5e"
DEFAULT_BUILD_USER = "packer"
DEFAULT_AUTOMATION_USER = "ansible"
JUNIT_NAME = TEST_JUNIT_NAME
SUMMARY_NAME = TEST_SUMMARY_NAME
OUTPUT_NAME = TEST_OUTPUT_NAME
SERIAL_NAME = TEST_SERIAL_NAME
KEYS_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
KEYS_END = "-----END SSH HOST KEY KEYS-----"
HOST_KEY_RE = re.compile(r"((?:ssh|ecdsa|sk)-[A-Za-z0-9@.\-]+) ([A-Za-z0-9+/]+=*)")


class ImageTestError(FactoryError):
    pass


# ------------------------------------------------------------------------------------ pure helpers


def suite_files(root: Path, suites: list[str]) -> list[Path]:
    """conftest.py plus test_<suite>.py for every suite; a missing suite is an error."""
    base = root / SUITE_DIR
    files = [base / "conftest.py"] + [base / f"test_{s}.py" for s in suites]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ImageTestError(f"image test suite file(s) missing: {', '.join(missing)}")
    return files


def suites_for(listed: list[str], m: manifest.Manifest) -> list[str]:
    """The catalogue's suites, plus ``firmware`` for a UEFI build (its Secure Boot state, chain and TPM)."""
    return listed + ["firmware"] if m.firmware == "uefi" and "firmware" not in listed else listed


def suite_hash(files: list[Path]) -> str:
    """sha256 over the names and contents of the suite files (order-independent)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        data = f.read_bytes()
        h.update(f"{f.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


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


@dataclass
class JunitCounts:
    tests: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> int:
        return self.tests - self.failed - self.errors - self.skipped


def parse_junit(path: Path) -> JunitCounts:
    """Counts and per-test outcomes ('passed'/'failed'/'error'/'skipped') from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()  # noqa: S314 - our own pytest's output
    except (FileNotFoundError, ET.ParseError) as exc:
        raise ImageTestError(f"{path}: no usable JUnit report ({exc})") from None
    c = JunitCounts()
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        cls = case.get("classname", "")
        test_id = f"{cls.rsplit('.', 1)[-1]}::{name}" if cls else name
        c.tests += 1
        if case.find("failure") is not None:
            c.failed += 1
            c.failures.append(test_id)
            c.outcomes[test_id] = "failed"
        elif case.find("error") is not None:
            c.errors += 1
            c.failures.append(test_id)
            c.outcomes[test_id] = "error"
        elif case.find("skipped") is not None:
            c.skipped += 1
            c.outcomes[test_id] = "skipped"
        else:
            c.outcomes[test_id] = "passed"
    return c


def build_user_name() -> str:
    """The build user the render stage puts in the seed."""
    return render.BUILD_USER


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


# ------------------------------------------------------------------------------------ the test run


def pytest_command(
    settings: Settings,
    files: list[Path],
    guest: Guest,
    *,
    family: str,
    junit: Path,
    artifact: Path | None,
    build_user: str,
    automation_user: str,
    mac: str,
    firmware_kind: str = "bios",
    platform: Platform | None = None,
) -> list[str]:
    cmd = [
        sys.executable, "-m", "pytest", *[str(f) for f in files if f.name != "conftest.py"],
        "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rfE",
        f"--rootdir={settings.root}",
        f"--hosts={guest.hostspec}",
        f"--ssh-identity-file={guest.key_file}",
        f"--known-hosts={guest.known_hosts}",
        f"--announced-host-keys={guest.known_hosts}",
        f"--image-family={family}",
        f"--firmware={firmware_kind}",
        f"--expected-mac={mac}",
        f"--build-user={build_user}",
        f"--automation-user={automation_user}",
        f"--qga-socket={guest.qga_socket}",
        f"--junitxml={junit}",
    ]  # fmt: skip
    if platform is not None and platform.firmware == "uefi":
        enforced = platform.secure_boot and firmware.KEY_SETS[platform.keys or "none"].enrolled
        cmd += [f"--secure-boot={'enabled' if enforced else 'disabled'}", f"--tpm={'yes' if platform.tpm else 'no'}"]
    if artifact is not None:
        cmd.append(f"--artifact={artifact}")
        if guest.qmp_socket is not None:
            cmd.append(f"--qmp-socket={guest.qmp_socket}")
    return cmd


def test_image(
    settings: Settings,
    image: Image,
    build_dir: BuildDir | Path,
    *,
    timeout: float = 600,
    keep_running: bool = False,
    automation_user: str = DEFAULT_AUTOMATION_USER,
    build_user: str | None = None,
) -> ImageTestResult:
    """Boot the artifact of builds/<image>/manifest.json, run its suites, record the result."""
    bdir = BuildDir.at(build_dir)
    m = bdir.require()
    artifact = bdir.artifact(m)
    if not artifact.is_file():
        raise ImageTestError(f"{artifact} (from {bdir.manifest}) does not exist")
    suites = suites_for(list(image.test_suites), m)
    files = suite_files(settings.data, suites)
    before = sha256_file(artifact)
    if before != m.artifact.sha256:
        raise ImageTestError(
            f"{artifact}: sha256 {before[:12]}… differs from the manifest's {m.artifact.sha256[:12]}…; "
            "rebuild the image"
        )
    bdir.test_junit.unlink(missing_ok=True)
    run = _SuiteRun(settings, image, bdir, m, files, suite_hash(files))
    console.print(f"image test {image.name}: booting {artifact.name} (suites: {', '.join(suites)})")
    guest = _boot_until_ssh(run, timeout)
    try:
        run.suites_in(guest, timeout, build_user=build_user or build_user_name(), automation_user=automation_user)
        if keep_running:
            _keep_running(guest)
    finally:
        if guest.serial_log.exists():
            shutil.copyfile(guest.serial_log, bdir.test_serial)
        guest.stop()
        run.figures["total_s"] = round(time.monotonic() - run.started, 1)
    after = sha256_file(artifact)
    if after != before:
        raise ImageTestError(f"{artifact} changed during the image test (sha256 {before} -> {after})")
    result = run.result(suites, before)
    _report(image.name, result, run.figures)
    return result


@dataclass
class _SuiteRun:
    """One image test under way: what it tests, and what it has found so far."""

    settings: Settings
    image: Image
    bdir: BuildDir
    manifest: manifest.Manifest
    files: list[Path]
    suite_hash: str
    started: float = field(default_factory=time.monotonic)
    figures: dict[str, float] = field(default_factory=dict)
    rc: int = -1
    output: str = ""
    inside: contents_mod.Contents | None = None

    def suites_in(self, guest: Guest, timeout: float, *, build_user: str, automation_user: str) -> None:
        """The suites (pytest + testinfra) against the running guest, then its contents read over SSH."""
        console.print(f"guest up after {self.figures['boot_to_ssh_s']}s; running the suites ...")
        m, image = self.manifest, self.image
        cmd = pytest_command(self.settings, self.files, guest, family=image.family, junit=self.bdir.test_junit,
                             artifact=self.bdir.artifact(m), build_user=build_user, automation_user=automation_user,
                             mac=TEST_MAC, firmware_kind=m.firmware, platform=m.platform)  # fmt: skip
        t_suite = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=self.settings.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=max(timeout, 300))  # fmt: skip
        except subprocess.TimeoutExpired:
            raise ImageTestError(f"image test suites did not finish within {max(timeout, 300):.0f}s") from None
        self.figures["suite_s"] = round(time.monotonic() - t_suite, 1)
        self.rc = proc.returncode
        self.output = proc.stdout.decode(errors="replace")
        self.bdir.test_output.write_text(self.output, encoding="utf-8")
        t_contents = time.monotonic()
        self.inside = read_guest_contents(guest, image.family)
        contents_mod.save(self.bdir.path, self.inside, image=image.name, build_id=m.build_id)
        self.figures["contents_s"] = round(time.monotonic() - t_contents, 1)

    def result(self, suites: list[str], artifact_sha256: str) -> ImageTestResult:
        """The outcome from pytest's exit and its JUnit report, written to the summary and the manifest."""
        if self.rc not in (0, 1):
            tail = "\n".join(self.output.strip().splitlines()[-20:])
            raise ImageTestError(f"pytest could not run the image suites (exit {self.rc}):\n{tail}")
        junit = self.bdir.test_junit
        counts = parse_junit(junit)
        ok = self.rc == 0 and counts.failed == 0 and counts.errors == 0 and counts.passed > 0
        root = self.settings.root
        result = ImageTestResult(
            status="passed" if ok else "failed", passed=counts.passed, failed=counts.failed, errors=counts.errors,
            skipped=counts.skipped, suites=suites, suite_hash=self.suite_hash, artifact_sha256=artifact_sha256,
            junit=str(junit.relative_to(root) if junit.is_relative_to(root) else junit),
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), failures=counts.failures,
        )
        summary = {**asdict(result), "image": self.image.name, "figures": self.figures, "outcomes": counts.outcomes}
        self.bdir.test_summary.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        manifest.record_test_result(self.bdir.path, result, self.inside.summary() if self.inside else None)
        return result


def _boot_until_ssh(run: _SuiteRun, timeout: float) -> Guest:
    """The guest booted and reachable over SSH. Under TCG a guest kernel can die in its own code patching (an
    int3 another vCPU met mid-patch: a race in QEMU's multi-threaded TCG, not the image); that boot is repeated
    once. A panic under KVM, or twice, fails the test."""
    image, m, bdir = run.image, run.manifest, run.bdir
    attempts = 2 if resolve_accelerator(run.settings.accelerator) == "tcg" else 1
    for attempt in range(1, attempts + 1):
        guest = boot_guest(run.settings, bdir.artifact(m), m.artifact.format, workdir_parent=bdir.path,
                           hostname=f"test-{image.name}"[:63], memory=min(image.memory, 1024),
                           cpus=min(image.cpus, 2), platform=m.platform)  # fmt: skip
        try:
            run.figures["boot_to_ssh_s"] = round(wait_for_ssh(guest, timeout), 1)
            return guest
        except GuestPanicked:
            shutil.copyfile(guest.serial_log, bdir.test_serial)
            guest.stop()
            if attempt == attempts:
                raise
            run.figures["panicked_boots"] = attempt
            console.print(f"image test {image.name}: the guest's kernel panicked under TCG (serial console in "
                          f"{bdir.test_serial}); booting it once more")
        except BaseException:
            guest.stop()
            raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def _keep_running(guest: Guest) -> None:
    console.print(
        f"guest kept running: ssh -i {guest.key_file} -p {guest.port} "
        f"-o UserKnownHostsFile={guest.known_hosts} {guest.user}@127.0.0.1  (Ctrl-C to stop)"
    )
    try:
        while guest.alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass


def _report(name: str, result: ImageTestResult, figures: dict[str, float]) -> None:
    colour = "green" if result.status == "passed" else "red"
    console.print(styled(
        f"[{colour}]image test {{}}: {{}}[/] ({{}} passed, {{}} failed, {{}} errors, {{}} skipped) {{}}", name,
        result.status, result.passed, result.failed, result.errors, result.skipped, figures,
    ))
    for f in result.failures:
        console.print(styled("  [red]✗[/] {}", f))


# pytest must not collect this function as a test when the module is imported from a test file.
test_image.__test__ = False  # type: ignore[attr-defined]
