"""Image test suites (testinfra). Run by `invoke image.test NAME`, or standalone against any host:

    pytest tests/image --hosts=ssh://user@host [--image-family=debian] [--expected-mac=..] [...]

Host keys: with `paramiko://` hosts every connection is strict (RejectPolicy) against
--known-hosts (default ~/.ssh/known_hosts): pytest-testinfra's own paramiko backend would accept
unknown keys with a mere warning, so this conftest swaps in a strict subclass. With `ssh://`
OpenSSH applies its own (strict) configuration.

Options (all optional; tests needing one that is absent are skipped, never passed):
  --image-family        fedora | debian: picks the family-specific expectations
  --expected-mac        MAC the first NIC must carry (the one the seed / inventory gave)
  --known-hosts         known_hosts file for paramiko:// hosts
  --announced-host-keys known_hosts-format file with the keys the guest announced on its console
  --artifact            the image file: offline checks read it without mounting (debugfs on ext4)
  --build-user          the build user that must be gone (default: packer)
  --automation-user     the user Ansible uses on clones (default: ansible)
  --qga-socket          host side of the guest agent channel (virtio-serial), for a guest-ping
  --max-log-mib         bound for /var/log (default: 64)
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from testinfra.backend.paramiko import ParamikoBackend

# ------------------------------------------------------------------------------------------ options


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("image", "image factory image tests")
    g.addoption("--image-family", default=None, choices=["fedora", "debian"], help="image family")
    g.addoption("--expected-mac", default=None, help="MAC address the first NIC must carry")
    g.addoption("--known-hosts", default=None, help="known_hosts for paramiko:// hosts (strict checking)")
    g.addoption("--announced-host-keys", default=None, help="keys the guest announced on its serial console")
    g.addoption("--artifact", default=None, help="image file for offline checks (qcow2 or raw)")
    g.addoption("--build-user", default="packer", help="build user that must not exist in the image")
    g.addoption("--automation-user", default="ansible", help="automation user with passwordless sudo")
    g.addoption("--qga-socket", default=None, help="unix socket of the guest agent channel")
    g.addoption("--max-log-mib", default=64, type=int, help="upper bound for /var/log in MiB")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("hosts") is None:
        skip = pytest.mark.skip(reason="image suites need a target: --hosts=ssh://... or paramiko://...")
        for item in items:
            if "tests/image/" in str(item.fspath).replace(os.sep, "/"):
                item.add_marker(skip)


# -------------------------------------------------------------------- strict paramiko host checking


class StrictParamikoBackend(ParamikoBackend):
    """testinfra's paramiko backend, but unknown or changed host keys are refused."""

    known_hosts: str | None = None

    @functools.cached_property
    def client(self) -> paramiko.SSHClient:  # type: ignore[override]
        client = paramiko.SSHClient()
        cfg: dict[str, Any] = {
            "hostname": self.host.name,
            "port": int(self.host.port) if self.host.port else 22,
            "username": self.host.user,
            "timeout": self.timeout,
            "password": self.host.password,
            "allow_agent": False,
        }
        if self.ssh_config:
            with open(self.ssh_config) as f:
                ssh_config = paramiko.SSHConfig()
                ssh_config.parse(f)
            self._load_ssh_config(client, cfg, ssh_config, os.path.dirname(self.ssh_config))
        if self.ssh_identity_file:
            cfg["key_filename"] = self.ssh_identity_file
            cfg["look_for_keys"] = False
        # Whatever the ssh_config said (StrictHostKeyChecking=no included): strict.
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        path = self.known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        if os.path.exists(path):
            client.load_host_keys(path)
        client.connect(**cfg)
        return client


def _harden(host: Any, config: pytest.Config) -> Any:
    backend = getattr(host, "backend", None)
    if isinstance(backend, ParamikoBackend) and not isinstance(backend, StrictParamikoBackend):
        backend.__dict__.pop("client", None)
        backend.__class__ = StrictParamikoBackend
        backend.known_hosts = config.getoption("known_hosts")
    return host


@pytest.fixture(scope="module")
def _testinfra_host(request: pytest.FixtureRequest) -> Any:
    """Overrides testinfra's fixture of the same name: every paramiko host becomes strict."""
    return _harden(request.param, request.config)


# ------------------------------------------------------------------------------------ shared facts


@pytest.fixture(scope="session")
def family(request: pytest.FixtureRequest) -> str | None:
    return request.config.getoption("image_family")


@pytest.fixture(scope="session")
def opt(request: pytest.FixtureRequest) -> Any:
    return lambda name: request.config.getoption(name)


@pytest.fixture(scope="session")
def announced_keys(request: pytest.FixtureRequest) -> set[tuple[str, str]]:
    """(type, base64) host keys the guest announced on its serial console (--announced-host-keys)."""
    path = request.config.getoption("announced_host_keys")
    if not path:
        pytest.skip("needs --announced-host-keys (keys the guest printed on its serial console)")
    keys = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#"):
            keys.add((parts[1], parts[2]))
    assert keys, f"{path} holds no host keys"
    return keys


class OfflineImage:
    """Read-only view of an ext2/3/4 root filesystem inside an image file, via debugfs (no mount)."""

    def __init__(self, fs_image: str):
        self.fs_image = fs_image

    def _debugfs(self, request: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["debugfs", "-R", request, self.fs_image], capture_output=True, text=True)

    def exists(self, path: str) -> bool:
        out = self._debugfs(f"stat {path}")
        return out.returncode == 0 and "Inode:" in out.stdout

    def listdir(self, path: str) -> list[str]:
        out = self._debugfs(f"ls -p {path}")
        if out.returncode != 0 or "Inode:" not in self._debugfs(f"stat {path}").stdout:
            return []
        names = []
        for line in out.stdout.splitlines():
            f = line.split("/")
            if len(f) >= 6 and f[5] not in (".", "..", ""):
                names.append(f[5])
        return names

    def read(self, path: str) -> bytes:
        out = subprocess.run(["debugfs", "-R", f"cat {path}", self.fs_image], capture_output=True)
        return out.stdout

    def size(self, path: str) -> int:
        out = self._debugfs(f"stat {path}")
        for line in out.stdout.splitlines():
            if "Size:" in line:
                return int(line.split("Size:")[1].split()[0])
        raise FileNotFoundError(path)


def _root_partition(raw: Path) -> int | None:
    """Byte offset of the ext* partition holding /etc, or None."""
    proc = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True)
    offsets = [0]
    if proc.returncode == 0:
        table = json.loads(proc.stdout)["partitiontable"]
        sector = int(table.get("sectorsize", 512))
        offsets = [int(p["start"]) * sector for p in table.get("partitions", [])] + [0]
    for off in offsets:
        spec = f"{raw}?offset={off}" if off else str(raw)
        out = subprocess.run(["debugfs", "-R", "stat /etc", spec], capture_output=True, text=True)
        if out.returncode == 0 and "Inode:" in out.stdout:
            return off
    return None


@pytest.fixture(scope="session")
def artifact_fs(request: pytest.FixtureRequest) -> Iterator[OfflineImage]:
    """The artifact's root filesystem, read offline; skips when no --artifact or not ext*."""
    artifact = request.config.getoption("artifact")
    if not artifact:
        pytest.skip("offline artifact checks need --artifact")
    for tool in ("qemu-img", "sfdisk", "debugfs"):
        if shutil.which(tool) is None:
            pytest.fail(f"offline artifact checks need {tool} (qemu-utils, fdisk, e2fsprogs)")
    tmp = Path(tempfile.mkdtemp(prefix="artifact-fs-"))
    try:
        raw = tmp / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", artifact, str(raw)], check=True)
        off = _root_partition(raw)
        if off is None:
            pytest.skip("artifact root filesystem is not ext2/3/4 (e.g. btrfs): offline checks unavailable; "
                        "the first-boot evidence tests cover it")  # fmt: skip
        yield OfflineImage(f"{raw}?offset={off}" if off else str(raw))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

