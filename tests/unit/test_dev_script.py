"""./dev setup on machines this one is not: a stub package manager (apt-get, apt-cache, dpkg-query, rpm, dnf
that log what they are asked) on a PATH of real tools without packer, an os-release to read
(FACTORY_OS_RELEASE), and HashiCorp's key served from a file (FACTORY_HASHICORP_KEY_URL): nothing here
reaches a network or changes this machine's package state.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit

REAL_TOOLS = ("bash", "sh", "env", "sed", "head", "tr", "grep", "awk", "mktemp", "rm", "mv", "cat", "id", "python3",
              "gpg", "sha256sum", "cut", "dirname", "tee", "install", "mkdir", "printf")
HASHICORP_FINGERPRINT = "798AEC654E5C15428C8E42EEAA16FCBCA621E701"

DEBIAN_13 = 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nID=debian\nVERSION_ID="13"\nVERSION_CODENAME=trixie\n'
DEBIAN_12 = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n'
FEDORA_44 = 'NAME="Fedora Linux"\nID=fedora\nVERSION_ID=44\nPRETTY_NAME="Fedora Linux 44 (Server Edition)"\n'


class Machine:
    """A copy of ./dev with the project files it reads, stub tools logging to calls.log, and a stub venv."""

    def __init__(self, root: Path, os_release: str, *, packer_candidate: str = "") -> None:
        self.root = root
        self.repo = root / "repo"
        (self.repo / "requirements").mkdir(parents=True)
        for rel in ("dev", "pyproject.toml", "requirements/build.txt", "requirements/dev.txt"):
            shutil.copy2(REPO_ROOT / rel, self.repo / rel)
        self.log = root / "calls.log"
        self.log.touch()
        self.stubs = root / "stubs"
        self.stubs.mkdir()
        real = root / "real"
        real.mkdir()
        for tool in REAL_TOOLS:
            found = os.path.realpath(sys.executable) if tool == "python3" else shutil.which(tool)  # not a shim
            if found is None:
                pytest.skip(f"{tool} is not installed")
            (real / tool).symlink_to(found)
        policy = f"packer:\n  Installed: (none)\n  Candidate: {packer_candidate}\n" if packer_candidate else ""
        self.stub("apt-get", 'echo "apt-get $*" >> "$LOG"')
        self.stub("apt-cache", f"printf '%s' '{policy}'")
        self.stub("dpkg-query", "printf 'install ok installed'")  # every package but packer is there
        self.stub("rpm", 'echo "rpm $*" >> "$LOG"')
        self.stub("dnf", 'echo "dnf $*" >> "$LOG"')
        self.stub("sudo", 'exec "$@"')
        self.os_release = root / "os-release"
        self.os_release.write_text(os_release)
        self.venv = root / "venv"
        (self.venv / "bin").mkdir(parents=True)
        self.stub("python", "exit 0", where=self.venv / "bin")
        self.stub("pip", 'echo "pip $*" >> "$LOG"', where=self.venv / "bin")
        self.env = {"PATH": f"{self.stubs}:{real}", "LOG": str(self.log), "HOME": str(root),
                    "GNUPGHOME": str(root / "gnupg"), "FACTORY_OS_RELEASE": str(self.os_release),
                    "FACTORY_VENV": str(self.venv), "FACTORY_HASHICORP_KEY_URL": f"file://{root}/no-such-key"}
        (root / "gnupg").mkdir(mode=0o700)

    def stub(self, name: str, body: str, *, where: Path | None = None) -> None:
        exe = (where or self.stubs) / name
        exe.write_text(f"#!/bin/sh\n{body}\n")
        exe.chmod(0o755)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(self.repo / "dev"), *args], env=self.env, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()

    def stamp_current(self, profile: str = "dev") -> None:
        """The venv as ./dev setup left it for today's pyproject.toml and lock."""
        digest = hashlib.sha256((self.repo / "pyproject.toml").read_bytes()
                                + (self.repo / f"requirements/{profile}.txt").read_bytes()).hexdigest()
        (self.venv / ".installed").write_text(f"{profile} {digest}\n")


def test_debian_13_without_hashicorp_names_the_repository_step(tmp_path: Path) -> None:
    m = Machine(tmp_path, DEBIAN_13)
    proc = m.run("setup")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Debian GNU/Linux 13 (trixie) has no packer package" in proc.stdout
    assert "!! cannot reach file://" in proc.stderr
    steps = proc.stderr
    assert f"must print {HASHICORP_FINGERPRINT}" in steps
    assert "gpg --dearmor -o /usr/share/keyrings/hashicorp-archive-keyring.gpg /tmp/hashicorp.asc" in steps
    assert ("echo 'deb [signed-by=/usr/share/keyrings/hashicorp-archive-keyring.gpg] "
            "https://apt.releases.hashicorp.com trixie main' | tee /etc/apt/sources.list.d/hashicorp.list") in steps
    assert "apt-get update && apt-get install packer" in steps
    assert m.calls() == ["apt-get update -qq"], "nothing is installed when packer cannot be"
    assert not (m.venv / ".installed").exists()


def test_a_key_that_is_not_hashicorps_is_refused(tmp_path: Path) -> None:
    m = Machine(tmp_path, DEBIAN_13)
    gpg = ["gpg", "--batch", "--homedir", str(tmp_path / "gnupg")]
    subprocess.run([*gpg, "--passphrase", "", "--quick-gen-key", "Impostor <i@example.org>", "ed25519", "sign"],
                   check=True, capture_output=True, timeout=60)
    key = tmp_path / "impostor.asc"
    key.write_bytes(subprocess.run([*gpg, "--armor", "--export"], check=True, capture_output=True).stdout)
    # key generation started a gpg-agent for that home: it would outlive the test
    subprocess.run(["gpgconf", "--homedir", str(tmp_path / "gnupg"), "--kill", "all"], capture_output=True, timeout=60)
    m.env["FACTORY_HASHICORP_KEY_URL"] = f"file://{key}"
    proc = m.run("setup")
    assert proc.returncode == 1
    assert f"not HashiCorp's pinned {HASHICORP_FINGERPRINT}: refused, nothing changed" in proc.stderr
    assert "add HashiCorp's package repository by hand" in proc.stderr
    assert m.calls() == ["apt-get update -qq"]


def test_debian_12_installs_its_own_packer(tmp_path: Path) -> None:
    m = Machine(tmp_path, DEBIAN_12, packer_candidate="1.6.6+ds1-5+b4")
    m.stamp_current()
    proc = m.run("setup")
    assert proc.returncode == 0, proc.stderr
    assert "HashiCorp" not in proc.stdout + proc.stderr
    assert m.calls() == ["apt-get update -qq", "apt-get install -y -qq --no-install-recommends packer"]


def test_fedora_names_the_dnf_repository_step(tmp_path: Path) -> None:
    m = Machine(tmp_path, FEDORA_44)
    m.stub("rpm", "exit 0")  # every package but packer is there
    proc = m.run("setup")
    assert proc.returncode == 1
    assert "Fedora Linux 44 (Server Edition) ships no packer" in proc.stdout
    assert "install -m 0644 /tmp/hashicorp.asc /etc/pki/rpm-gpg/RPM-GPG-KEY-hashicorp" in proc.stderr
    assert "baseurl=https://rpm.releases.hashicorp.com/fedora/$releasever/$basearch/stable" in proc.stderr
    assert "gpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-hashicorp" in proc.stderr
    assert "dnf install -y packer" in proc.stderr
    assert m.calls() == []


def test_the_venv_is_installed_from_the_lock_and_again_when_the_lock_changes(tmp_path: Path) -> None:
    m = Machine(tmp_path, DEBIAN_12)
    m.stub("packer", "exit 0")  # packer present, every package present: only the venv is looked at
    assert m.run("setup").returncode == 0
    install = ["pip install -q --require-hashes -r requirements/dev.txt",
               "pip install -q --no-deps --no-build-isolation -e ."]
    assert m.calls() == install
    assert m.run("setup").returncode == 0
    assert m.calls() == install, "an unchanged lock installs nothing"
    lock = m.repo / "requirements/dev.txt"
    lock.write_text(lock.read_text().replace("pyyaml==", "pyyaml===", 1))
    assert m.run("setup").returncode == 0
    assert m.calls() == install * 2, "a changed lock re-installs"
    assert m.run("setup", "build").returncode == 0
    assert m.calls()[-2] == "pip install -q --require-hashes -r requirements/build.txt"


def test_an_unknown_distribution_says_what_to_install(tmp_path: Path) -> None:
    m = Machine(tmp_path, 'ID=arch\nPRETTY_NAME="Arch Linux"\n')
    proc = m.run("setup")
    assert proc.returncode == 1 and "Arch Linux: neither Debian- nor Fedora-like" in proc.stderr
    assert "packer (>= 1.7)" in proc.stderr
    assert os.listdir(m.venv) == ["bin"]


def test_setup_ends_with_doctor_for_the_profile_and_only_shows_its_verdict(tmp_path: Path) -> None:
    m = Machine(tmp_path, DEBIAN_12)
    m.stub("packer", "exit 0")
    m.stub("invoke", 'echo "invoke $*" >> "$LOG"; echo "packer missing" >&2; exit 1', where=m.venv / "bin")
    proc = m.run("setup", "build")
    assert proc.returncode == 0, proc.stderr
    assert m.calls()[-1] == "invoke doctor --target build,publish"
    assert "!! invoke doctor: a required tool is still missing" in proc.stderr
    m.run("setup")
    assert m.calls()[-1] == "invoke doctor --target build,publish,test"
    before = len(m.calls())
    m.run("test", "-k", "nothing")  # test (and demo) set up too, and leave the verdict to what they run
    assert m.calls()[before:] and not [c for c in m.calls()[before:] if c.startswith("invoke doctor")]


def test_the_dev_profile_unpacks_cloud_init_and_asks_apt_for_fresh_lists_once_when_it_cannot(tmp_path: Path) -> None:
    m = Machine(tmp_path, DEBIAN_12)
    m.stub("packer", "exit 0")
    m.stamp_current()
    m.stub("python", 'echo "python $*" >> "$LOG"; exit "${UNPACK_RC:-0}"', where=m.venv / "bin")
    unpack = "python -m image_factory.tools unpack-cloud-init apt"
    assert m.run("setup").returncode == 0
    assert m.calls() == [unpack]
    assert m.run("setup", "build").returncode == 0 and m.calls()[1:] == ["pip install -q --require-hashes -r "
                                                                         "requirements/build.txt",
                                                                         "pip install -q --no-deps "
                                                                         "--no-build-isolation -e ."], \
        "a nightly runner gets no cloud-init"
    m.stamp_current()
    m.log.write_text("")
    m.env["UNPACK_RC"] = "1"  # e.g. apt's package lists were never fetched
    proc = m.run("setup")
    assert proc.returncode == 0, "set-up goes on; the doctor table and the test name what is missing"
    assert m.calls() == [unpack, "apt-get update -qq", unpack]
    assert "!! cloud-init's package is not unpacked" in proc.stderr
