"""End to end: boot the offline Debian base image for real (TCG) and run the image suites.

1. The base image as built passes every common and hygiene test (the automation user is the
   image's cloud-init default user, "debian", since no playbook has run on it).
2. A deliberately broken copy (SSH host keys baked in, guest agent removed), made offline with
   debugfs, fails exactly the tests that should fail, and the manifest records the failure.

One guest at a time; each boot takes 1-2 minutes under TCG.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from image_factory.image import imagetest as it
from image_factory.image import manifest as mf
from image_factory.lab import factories
from image_factory.lab.baseimage import ensure_base_image
from image_factory.settings import Settings
from image_factory.site.inventory import Image, Source

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

BROKEN_MUST_FAIL = {
    "test_hygiene::test_artifact_has_no_ssh_host_keys",
    "test_common::test_qemu_guest_agent_installed",
    "test_common::test_qemu_guest_agent_enabled_and_running",
    "test_common::test_qemu_guest_agent_answers",
}


def _image(name: str) -> Image:
    return Image(name=name, family="debian", release=12, mode="cloud", memory=1024,
                 source=Source(url="builds/base/debian-13-base.qcow2", checksum="none"),
                 test_suites=["common", "hygiene"])  # fmt: skip


def _manifest_for(build_dir: Path, name: str, artifact: Path) -> None:
    mf.save(build_dir, factories.manifest_of(artifact, name, build_id="e2e", fingerprint="e2e"))


def _strip(outcomes: dict[str, str]) -> dict[str, str]:
    """'test_common::test_x[paramiko://...]' -> 'test_common::test_x'."""
    return {k.split("[", 1)[0]: v for k, v in outcomes.items()}


@pytest.fixture(scope="module")
def base_image() -> Path:
    return ensure_base_image(Settings.from_mapping(root=REPO))


def test_base_image_passes_common_and_hygiene(base_image: Path, tmp_path: Path) -> None:
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds")}, root=REPO)
    build_dir = settings.builds_dir / "debian-base"
    _manifest_for(build_dir, "debian-base", base_image)
    sha = mf.sha256_file(base_image)

    result = it.test_image(settings, _image("debian-base"), build_dir, automation_user="debian")

    summary = json.loads((build_dir / it.SUMMARY_NAME).read_text())
    outcomes = _strip(summary["outcomes"])
    assert {k for k, v in outcomes.items() if v != "passed"} == set(), summary["outcomes"]
    assert result.status == "passed" and result.failed == 0 and result.errors == 0 and result.skipped == 0
    assert result.passed == len(outcomes) >= 20
    assert result.artifact_sha256 == sha == mf.sha256_file(base_image)  # artifact untouched
    assert result.suite_hash == it.suite_hash(it.suite_files(REPO, ["common", "hygiene"]))
    assert mf.require(build_dir).tested_ok()
    assert (build_dir / it.JUNIT_NAME).is_file() and (build_dir / it.SERIAL_NAME).is_file()
    assert not list(build_dir.glob(".imagetest-*")), "overlay/seed left behind"
    # what is inside, read from the booted image: packages, kernel, os-release, an SBOM, the digest in the manifest
    from image_factory.image import contents as ct

    inside = json.loads((build_dir / ct.PACKAGES_NAME).read_text())
    names = {p["name"] for p in inside["packages"]}
    assert {"openssh-server", "cloud-init", "qemu-guest-agent", "python3"} <= names, sorted(names)[:20]
    assert inside["os_release"]["ID"] == "debian" and inside["kernel"]
    sbom = json.loads((build_dir / ct.SBOM_NAME).read_text())
    assert sbom["bomFormat"] == "CycloneDX" and len(sbom["components"]) == len(names) + 1
    assert mf.require(build_dir).contents == {"packages_digest": inside["packages_digest"], "packages": len(names),
                                              "kernel": inside["kernel"], "os": inside["os_release"]["PRETTY_NAME"],
                                              "os_version_id": inside["os_release"]["VERSION_ID"]}


def _debugfs(spec: str, commands: str, tmp: Path) -> None:
    cmdfile = tmp / "debugfs.cmds"
    cmdfile.write_text(commands)
    out = subprocess.run(["debugfs", "-w", "-f", str(cmdfile), spec], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def make_broken_copy(src: Path, dst: Path, tmp: Path) -> None:
    """Copy of the base image with SSH host keys baked in and the guest agent removed (offline)."""
    raw = tmp / "broken.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(src), str(raw)], check=True)
    table = json.loads(subprocess.check_output(["sfdisk", "--json", str(raw)]))["partitiontable"]
    spec = f"{raw}?offset={int(table['partitions'][0]['start']) * 512}"
    clean = subprocess.run(["e2fsck", "-fn", spec], capture_output=True, text=True)
    assert clean.returncode == 0, f"base image filesystem not clean: {clean.stdout[-800:]}"
    keydir = tmp / "keys"
    keydir.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "baked", "-f",
                    str(keydir / "ssh_host_ed25519_key")], check=True)  # fmt: skip
    status = subprocess.run(["debugfs", "-R", "cat /var/lib/dpkg/status", spec], capture_output=True, text=True)
    stanzas = status.stdout.split("\n\n")
    kept = [s for s in stanzas if not s.startswith("Package: qemu-guest-agent\n")]
    assert len(kept) == len(stanzas) - 1
    (tmp / "status").write_text("\n\n".join(kept))
    _debugfs(spec, "\n".join([
        "cd /etc/ssh",
        f"write {keydir}/ssh_host_ed25519_key ssh_host_ed25519_key",
        f"write {keydir}/ssh_host_ed25519_key.pub ssh_host_ed25519_key.pub",
        "rm /usr/sbin/qemu-ga",
        "rm /usr/lib/systemd/system/qemu-guest-agent.service",
        "rm /var/lib/dpkg/status",
        "cd /var/lib/dpkg",
        f"write {tmp}/status status",
    ]) + "\n", tmp)  # fmt: skip
    clean = subprocess.run(["e2fsck", "-fn", spec], capture_output=True, text=True)
    assert clean.returncode == 0, f"offline edit damaged the filesystem: {clean.stdout[-800:]}"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(dst)], check=True)
    raw.unlink()


def test_broken_image_fails_exactly_the_expected_tests(base_image: Path, tmp_path: Path) -> None:
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds")}, root=REPO)
    build_dir = settings.builds_dir / "debian-broken"
    build_dir.mkdir(parents=True)
    broken = build_dir / "debian-broken.qcow2"
    make_broken_copy(base_image, broken, tmp_path)
    _manifest_for(build_dir, "debian-broken", broken)

    result = it.test_image(settings, _image("debian-broken"), build_dir, automation_user="debian")

    outcomes = _strip(json.loads((build_dir / it.SUMMARY_NAME).read_text())["outcomes"])
    failed = {k for k, v in outcomes.items() if v in ("failed", "error")}
    assert failed == BROKEN_MUST_FAIL
    assert {v for k, v in outcomes.items() if k not in BROKEN_MUST_FAIL} == {"passed"}
    assert result.status == "failed" and result.failed + result.errors == len(BROKEN_MUST_FAIL)
    m = mf.require(build_dir)
    assert m.image_test is not None and not m.tested_ok()
    assert sorted(f.split("[", 1)[0] for f in m.image_test.failures) == sorted(BROKEN_MUST_FAIL)
