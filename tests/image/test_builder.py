"""builder: the factory's own nightly runner (catalogue: debian-lab-builder). A build can start on it: the
tools a build, its image test and a publish run are there and answer, and the factory installed from its
hashed lock runs."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

VENV = "/opt/image-factory/venv"


@pytest.mark.parametrize(("command", "expected"), [
    ("packer version", r"^Packer v1\.\d+\.\d+"),
    ("qemu-system-x86_64 --version", r"^QEMU emulator version \d+\.\d+"),
    ("qemu-img --version", r"^qemu-img version \d+\.\d+"),
    ("swtpm --version", r"TPM emulator version \d+\.\d+"),
    ("xorriso -version", r"^xorriso \d+\.\d+"),
    ("ssh -V", r"^OpenSSH_\d+"),
    ("git --version", r"^git version \d+"),
    # the offline checks of an artifact's root: ext4, XFS, btrfs
    ("/usr/sbin/debugfs -V", r"debugfs \d+\.\d+"),
    ("/usr/sbin/xfs_db -V", r"xfs_db version \d+\.\d+"),
    ("btrfs --version", r"btrfs-progs v\d+"),
])
def test_runner_tool_answers(host: Any, command: str, expected: str) -> None:
    run = host.run(command)
    assert run.rc == 0, f"{command}: exit {run.rc}: {run.stderr[-500:]}"
    assert re.search(expected, run.stdout + run.stderr, re.MULTILINE), f"{command}: {run.stdout}{run.stderr}"


def test_ovmf_firmware_present(host: Any) -> None:
    """UEFI builds and image tests need OVMF's code and variable store (Debian's ovmf package)."""
    assert host.file("/usr/share/OVMF/OVMF_CODE_4M.fd").is_file
    assert host.file("/usr/share/OVMF/OVMF_VARS_4M.fd").is_file


def test_factory_venv_is_consistent(host: Any) -> None:
    """Every locked dependency is installed and agrees with every other (pip's own check)."""
    run = host.run(f"{VENV}/bin/pip check")
    assert run.rc == 0, run.stdout + run.stderr


def test_factory_command_runs(host: Any) -> None:
    """`image-factory` (the same task collection as `invoke` in a checkout) is on PATH and lists its tasks."""
    run = host.run("image-factory --list")
    assert run.rc == 0, run.stdout + run.stderr
    for task in ("build.image", "image.test", "publish.template", "pipeline"):
        assert re.search(rf"^\s+{re.escape(task)}\b", run.stdout, re.MULTILINE), f"{task} missing:\n{run.stdout}"


def test_factory_ansible_in_venv(host: Any) -> None:
    """The build's Ansible provisioner runs the venv's ansible-playbook (ansible-core from the lock)."""
    run = host.run(f"{VENV}/bin/ansible-playbook --version")
    assert run.rc == 0 and run.stdout.startswith("ansible-playbook [core "), run.stdout + run.stderr


def test_doctor_passes_for_a_nightly(host: Any) -> None:
    """`invoke doctor` (here `image-factory doctor`: the same task) finds every tool a nightly's build and
    publish need, and installs nothing: what an operator without root runs on a runner. Its tables and verdict go
    to stderr (the console's rule); --json gives the same verdict on stdout."""
    run = host.run("image-factory doctor")
    assert run.rc == 0, f"image-factory doctor: exit {run.rc}\n{run.stdout[-3000:]}{run.stderr[-1000:]}"
    assert "every required tool of build, publish is here" in run.stderr, run.stderr[-3000:]
    answer = host.run("image-factory doctor --json")
    assert answer.rc == 0, answer.stdout[-3000:] + answer.stderr[-1000:]
    verdict = json.loads(answer.stdout)
    assert verdict["ok"] is True and {t["target"] for t in verdict["targets"]} >= {"build", "publish"}, verdict


@pytest.mark.parametrize("package", ["gcc", "cpp", "libc6-dev", "libcrypt-dev", "python3-dev"])
def test_the_compiler_the_lock_needed_is_gone(host: Any, package: str) -> None:
    """The lock's C sources (crypt-r) were compiled during the build; the compiler went with the seal."""
    assert not host.package(package).is_installed
