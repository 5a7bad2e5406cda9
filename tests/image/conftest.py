"""Image test suites (testinfra). Run by `invoke image.test NAME`, or standalone against any host:

    pytest tests/image --hosts=ssh://user@host [--image-family=debian] [--expected-mac=..] [...]

Host keys: with `paramiko://` hosts every connection is strict (RejectPolicy) against
--known-hosts (default ~/.ssh/known_hosts): pytest-testinfra's own paramiko backend would accept
unknown keys with a mere warning, so this conftest swaps in a strict subclass. With `ssh://`
OpenSSH applies its own (strict) configuration.

Options (all optional; tests needing one that is absent are skipped, never passed):
  --image-family        fedora | debian: picks the family-specific expectations
  --secure-boot         enabled | disabled: the Secure Boot state a UEFI image boots in (firmware suite)
  --tpm                 yes | no: whether the VM has a TPM 2.0 (firmware suite)
  --expected-mac        MAC the first NIC must carry (the one the seed / inventory gave)
  --known-hosts         known_hosts file for paramiko:// hosts
  --announced-host-keys known_hosts-format file with the keys the guest announced on its console
  --artifact            the image file: offline checks read it without mounting (debugfs on ext*,
                        xfs_db on XFS, btrfs restore on btrfs)
  --build-user          the build user that must be gone (default: packer)
  --automation-user     the user Ansible uses on clones (default: ansible)
  --qga-socket          host side of the guest agent channel (virtio-serial), for a guest-ping
  --qmp-socket          the test VM's QMP socket: the pristine --artifact is hot-added to the guest
                        read-only and its root read there (any filesystem: ext4, XFS, btrfs)
  --max-log-mib         bound for /var/log (default: 64)
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
import testinfra
from testinfra.backend.paramiko import ParamikoBackend

# ------------------------------------------------------------------------------------------ options


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("image", "image factory image tests")
    g.addoption("--image-family", default=None, choices=["fedora", "debian"], help="image family")
    g.addoption("--firmware", default=None, choices=["bios", "uefi"],
                help="the firmware the template boots with (the manifest's)")
    g.addoption("--secure-boot", default=None, choices=["enabled", "disabled"],
                help="the Secure Boot state a UEFI template must boot in (the manifest's keys)")
    g.addoption("--tpm", default=None, choices=["yes", "no"], help="whether the template has a TPM 2.0")
    g.addoption("--expected-mac", default=None, help="MAC address the first NIC must carry")
    g.addoption("--known-hosts", default=None, help="known_hosts for paramiko:// hosts (strict checking)")
    g.addoption("--announced-host-keys", default=None, help="keys the guest announced on its serial console")
    g.addoption("--artifact", default=None, help="image file for offline checks (qcow2 or raw)")
    g.addoption("--build-user", default="packer", help="build user that must not exist in the image")
    g.addoption("--automation-user", default="ansible", help="automation user with passwordless sudo")
    g.addoption("--qga-socket", default=None, help="unix socket of the guest agent channel")
    g.addoption("--qmp-socket", default=None, help="QMP socket of the test VM (artifact read in the guest)")
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
    """Read-only view of an ext2/3/4 root filesystem inside an image file, via debugfs (no mount): the
    reader for standalone runs without a test VM."""

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


class XfsImage:
    """Read-only view of an XFS filesystem image without mounting it: xfs_db (xfsprogs) walks the metadata
    (paths, directory entries, sizes, extent maps) and the file data is read at the extents it names."""

    def __init__(self, fs_image: str):
        self.fs_image = fs_image
        geometry = self._db("sb 0", "print blocksize", "print agblocks").stdout
        self.block_size = int(re.search(r"blocksize = (\d+)", geometry)[1])  # type: ignore[index]
        self.ag_blocks = int(re.search(r"agblocks = (\d+)", geometry)[1])  # type: ignore[index]

    def _db(self, *commands: str) -> subprocess.CompletedProcess[str]:
        args = [arg for command in commands for arg in ("-c", command)]
        return subprocess.run(["xfs_db", "-r", *args, self.fs_image], capture_output=True, text=True)

    def _at(self, path: str, *commands: str) -> str | None:
        out = self._db(f"path {path}", *commands)
        return None if "No such file or directory" in out.stdout + out.stderr else out.stdout

    def exists(self, path: str) -> bool:
        return self._at(path) is not None

    def listdir(self, path: str) -> list[str]:
        out = self._db(f"ls {path}")
        # inode, cookie, type, hash, name length, name (exactly that many characters), (good|bad)
        entry = re.compile(r"\s*\d+\s+\d+\s+\S+\s+0x[0-9a-f]+\s+(\d+) (.*)$")
        names = [m[2][: int(m[1])] for m in map(entry.match, out.stdout.splitlines()) if m]
        return [n for n in names if n not in (".", "..")]

    def size(self, path: str) -> int:
        out = self._at(path, "print core.size")
        if out is None:
            raise FileNotFoundError(path)
        return int(re.search(r"core\.size = (\d+)", out)[1])  # type: ignore[index]

    def read(self, path: str) -> bytes:
        out = self._at(path, "print core.size", "bmap")
        if out is None:
            return b""
        size = int(re.search(r"core\.size = (\d+)", out)[1])  # type: ignore[index]
        data = bytearray(size)
        bs = self.block_size
        with open(self.fs_image, "rb") as f:
            # "data offset 0 startblock 32778 (1/10) count 1 flag 0": file block, (AG/block in AG), blocks
            for m in re.finditer(r"data offset (\d+) startblock \d+ \((\d+)/(\d+)\) count (\d+) flag (\d)", out):
                offset, ag, ag_block, count, unwritten = (int(g) for g in m.groups())
                if unwritten or offset * bs >= size:
                    continue  # preallocated, reads as zeros
                f.seek((ag * self.ag_blocks + ag_block) * bs)
                chunk = f.read(min(count * bs, size - offset * bs))
                data[offset * bs:offset * bs + len(chunk)] = chunk
        return bytes(data)


class BtrfsImage:
    """Read-only view of a btrfs filesystem image without mounting it: `btrfs restore` (btrfs-progs) copies
    the trees the checks read out of it, through subvolumes (Fedora's root is the subvolume "root")."""

    TREES = ("etc", "var/lib/cloud")

    def __init__(self, fs_image: str, scratch: Path):
        out = scratch / "restored"
        out.mkdir(parents=True, exist_ok=True)
        wanted = {""}
        for subvolume in ("", "root/"):
            for tree in self.TREES:
                parts = (subvolume + tree).split("/")
                wanted.update("/".join(parts[:i]) for i in range(1, len(parts)))
                wanted.add(re.escape(subvolume + tree) + "(/.*)?")
        regex = "^/(" + "|".join(sorted(wanted)) + ")$"
        done = subprocess.run(["btrfs", "restore", "-S", "--path-regex", regex, fs_image, str(out)],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            pytest.fail(f"btrfs restore of {fs_image} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        # Fedora's root subvolume first, then the top level: a flat filesystem, or a separate subvolume "var"
        # (mounted at /var, so its lib/cloud is restored as var/lib/cloud there).
        self.roots = [r for r in (out / "root",) if (r / "etc").is_dir()] + [out]

    def _local(self, path: str) -> Path | None:
        for root in self.roots:
            candidate = root / path.lstrip("/")
            if candidate.exists() or candidate.is_symlink():
                return candidate
        return None

    def exists(self, path: str) -> bool:
        return self._local(path) is not None

    def listdir(self, path: str) -> list[str]:
        local = self._local(path)
        return sorted(p.name for p in local.iterdir()) if local is not None and local.is_dir() else []

    def read(self, path: str) -> bytes:
        local = self._local(path)
        return local.read_bytes() if local is not None and local.is_file() else b""

    def size(self, path: str) -> int:
        local = self._local(path)
        if local is None:
            raise FileNotFoundError(path)
        return local.lstat().st_size


OfflineRoot = OfflineImage | XfsImage | BtrfsImage
OFFLINE_TOOLS = {"ext2": "debugfs", "ext3": "debugfs", "ext4": "debugfs", "xfs": "xfs_db", "btrfs": "btrfs"}
OFFLINE_PACKAGES = {"debugfs": "e2fsprogs", "xfs_db": "xfsprogs", "btrfs": "btrfs-progs"}


def _partitions(raw: Path) -> list[tuple[int, int]]:
    """(byte offset, byte size) of each partition, or the whole file when it has no partition table."""
    proc = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True)
    whole = [(0, raw.stat().st_size)]
    if proc.returncode != 0:
        return whole
    table = json.loads(proc.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    return [(int(p["start"]) * sector, int(p["size"]) * sector) for p in table.get("partitions", [])] + whole


def offline_root(artifact: str, scratch: Path) -> OfflineRoot | None:
    """The artifact's root filesystem (the one holding /etc), read without mounting: ext* through debugfs,
    XFS through xfs_db, btrfs through btrfs restore; None when no partition holds one of these."""
    scratch.mkdir(parents=True, exist_ok=True)
    raw = scratch / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", artifact, str(raw)], check=True)
    for n, (offset, size) in enumerate(_partitions(raw)):
        fstype = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", "-O", str(offset), str(raw)],
                                capture_output=True, text=True).stdout.strip()
        tool = OFFLINE_TOOLS.get(fstype)
        if tool is None:
            continue
        if shutil.which(tool) is None:
            pytest.fail(f"reading the artifact's {fstype} root offline needs {tool} ({OFFLINE_PACKAGES[tool]})")
        reader: OfflineRoot
        if tool == "debugfs":
            reader = OfflineImage(f"{raw}?offset={offset}" if offset else str(raw))
        else:
            part = scratch / f"part{n}.raw"  # the filesystem at offset 0, as xfs_db and btrfs restore read it
            subprocess.run(["qemu-img", "convert", "-O", "raw", "--image-opts",
                            f"driver=raw,offset={offset},size={size},file.driver=file,file.filename={raw}",
                            str(part)], check=True)
            reader = XfsImage(str(part)) if fstype == "xfs" else BtrfsImage(str(part), scratch / f"part{n}")
        if reader.exists("/etc"):
            return reader
    return None


# How each filesystem mounts read-only beside the running copy of itself (same UUID): XFS refuses a
# duplicate UUID without nouuid and must not replay its log; ext4 must not replay its journal; btrfs
# mounts a second device of the same fsid with a temporary one (Linux 6.7+).
GUEST_MOUNT_OPTIONS = {"ext4": "ro,noload", "ext3": "ro,noload", "ext2": "ro", "xfs": "ro,norecovery,nouuid",
                       "btrfs": "ro,subvolid=5"}
ARTIFACT_SERIAL = "factory-artifact"
GUEST_MOUNT_ROOT = "/run/factory-artifact"


def _qmp(socket_path: str, *commands: tuple[str, dict[str, Any]]) -> None:
    """Run QMP commands on the test VM, failing the test with QEMU's own error."""
    import socket as socketlib

    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(socket_path)
        reader = s.makefile("rb")

        def call(name: str, args: dict[str, Any]) -> None:
            s.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
            while True:
                reply = json.loads(reader.readline())
                if "return" in reply:
                    return
                if "error" in reply:
                    pytest.fail(f"QMP {name}: {reply['error'].get('desc')}")

        json.loads(reader.readline())  # greeting
        call("qmp_capabilities", {})
        for name, args in commands:
            call(name, args)


class GuestArtifact:
    """The pristine artifact hot-added to the test VM as a read-only disk and its root mounted read-only
    there: the same checks as OfflineImage for every filesystem the guest's kernel reads."""

    def __init__(self, host: Any, root: str):
        self.host, self.root = host, root

    def _run(self, command: str) -> Any:
        with self.host.sudo():
            return self.host.run(command)

    def _path(self, path: str) -> str:
        return shlex.quote(self.root + path)

    def exists(self, path: str) -> bool:
        return bool(self._run(f"test -e {self._path(path)} || test -L {self._path(path)}").rc == 0)

    def listdir(self, path: str) -> list[str]:
        out = self._run(f"ls -A1 {self._path(path)}")
        return out.stdout.split() if out.rc == 0 else []

    def read(self, path: str) -> bytes:
        out = self._run(f"base64 -w0 {self._path(path)}")
        return base64.b64decode(out.stdout) if out.rc == 0 else b""

    def size(self, path: str) -> int:
        out = self._run(f"stat -c %s {self._path(path)}")
        if out.rc != 0:
            raise FileNotFoundError(path)
        return int(out.stdout)


def _attach_in_guest(host: Any, qmp_socket: str, artifact: str) -> GuestArtifact:
    fmt = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", artifact], check=True,
                                    capture_output=True).stdout)["format"]
    # Hot-added on the running VM's SCSI bus, never present at boot: with the same filesystem UUIDs
    # as the boot disk it could otherwise be taken for the root.
    _qmp(qmp_socket,
         ("blockdev-add", {"node-name": "pristine", "driver": fmt, "read-only": True,
                           "file": {"driver": "file", "filename": artifact, "read-only": True}}),
         ("device_add", {"driver": "scsi-hd", "bus": "scsihw0.0", "drive": "pristine", "id": "pristine0",
                         "serial": ARTIFACT_SERIAL}))
    with host.sudo():
        wait_for_disk = (
            f"for i in $(seq 100); do d=$(lsblk -ndo NAME,SERIAL | awk '$2==\"{ARTIFACT_SERIAL}\"{{print $1}}'); "
            '[ -n "$d" ] && break; sleep 0.2; done; udevadm settle; lsblk -nlpo NAME,FSTYPE "/dev/$d"'
        )
        found = host.run(wait_for_disk)
        candidates = [line.split() for line in found.stdout.splitlines() if len(line.split()) == 2]
        assert candidates, f"the hot-added artifact disk did not appear in the guest: {found.stdout}{found.stderr}"
        for n, (device, fstype) in enumerate(candidates):
            options = GUEST_MOUNT_OPTIONS.get(fstype)
            if options is None:
                continue
            target = f"{GUEST_MOUNT_ROOT}/{n}"
            host.check_output(f"mkdir -p {target} && mount -t {fstype} -o {options} {device} {target}")
            for root in (target, f"{target}/root"):  # btrfs: Fedora's root subvolume is "root"
                if host.run(f"test -d {root}/etc && test -d {root}/usr").rc == 0:
                    return GuestArtifact(host, root)
    pytest.fail(f"no root filesystem (with /etc and /usr) on the artifact's partitions {candidates}")


@pytest.fixture(scope="session")
def artifact_fs(request: pytest.FixtureRequest) -> Iterator[OfflineRoot | GuestArtifact]:
    """The artifact's root filesystem as built (before any boot): read in the test VM when --qmp-socket
    is given (any filesystem), else offline: ext* through debugfs, XFS through xfs_db, btrfs through
    btrfs restore."""
    artifact = request.config.getoption("artifact")
    if not artifact:
        pytest.skip("offline artifact checks need --artifact")
    qmp_socket = request.config.getoption("qmp_socket")
    if qmp_socket:
        hosts = testinfra.get_hosts(str(request.config.getoption("hosts")).split(","),
                                    ssh_identity_file=request.config.getoption("ssh_identity_file"))
        yield _attach_in_guest(_harden(hosts[0], request.config), qmp_socket, str(Path(artifact).resolve()))
        return
    for tool in ("qemu-img", "sfdisk", "blkid"):
        if shutil.which(tool) is None:
            pytest.fail(f"offline artifact checks need {tool} (qemu-utils, fdisk, util-linux)")
    tmp = Path(tempfile.mkdtemp(prefix="artifact-fs-"))
    try:
        root = offline_root(artifact, tmp)
        if root is None:
            pytest.skip("no ext2/3/4, XFS or btrfs root filesystem on the artifact: offline checks unavailable; "
                        "the first-boot evidence tests cover it")  # fmt: skip
        yield root
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
