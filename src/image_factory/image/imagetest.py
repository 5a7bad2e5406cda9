"""Image tests: boot a built artifact the way Proxmox boots a clone (testguest) and run tests/image against it.

The artifact's sha256 is checked before and after: the guest runs on an overlay and never writes it. The
suites run in a pytest subprocess (testinfra over SSH, verified against the host keys the guest announced
on its console); JUnit XML, the pytest output, the serial log and a summary land in builds/<image>/ and the
result goes into the manifest (``manifest.record_test_result``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

from image_factory.console import console, styled
from image_factory.image import contents as contents_mod
from image_factory.image import firmware, manifest, render
from image_factory.image.buildcache import image_lock
from image_factory.image.builddir import (
    TEST_JUNIT_NAME,
    TEST_OUTPUT_NAME,
    TEST_SERIAL_NAME,
    TEST_SUMMARY_NAME,
    BuildDir,
)
from image_factory.image.buildevents import EventSink
from image_factory.image.manifest import ImageTestResult, sha256_file
from image_factory.image.qemuvm import resolve_accelerator
from image_factory.image.testguest import (
    TEST_MAC,
    Guest,
    GuestPanicked,
    ImageTestError,
    boot_guest,
    read_guest_contents,
    wait_for_ssh,
)
from image_factory.platform import Platform
from image_factory.settings import Settings
from image_factory.site.inventory import Image

SUITE_DIR = Path("tests/image")
DEFAULT_AUTOMATION_USER = "ansible"
JUNIT_NAME = TEST_JUNIT_NAME
SUMMARY_NAME = TEST_SUMMARY_NAME
OUTPUT_NAME = TEST_OUTPUT_NAME
SERIAL_NAME = TEST_SERIAL_NAME


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
        with image_lock(self.bdir, EventSink(on_event=lambda event: console.print(event.message))):
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
