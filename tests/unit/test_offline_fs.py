"""Offline artifact reading (tests/image/conftest.py: offline_root) on small XFS and btrfs disks made here:
mkfs on a raw file with a few planted files (mkfs.xfs's prototype file, mkfs.btrfs --rootdir), behind a
GPT partition as a real image has it, converted to qcow2. The hygiene suite's own artifact checks then run
against what the readers return: clean trees pass, each planted defect fails its check."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit

FS_SIZE_MIB = {"xfs": 300, "btrfs": 128, "ext4": 64}  # about the smallest each mkfs accepts
PART_START_MIB = 1


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFTEST = _load("image_suite_conftest", REPO_ROOT / "tests/image/conftest.py")
HYGIENE = _load("image_suite_hygiene", REPO_ROOT / "tests/image/test_hygiene.py")


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (xfsprogs, btrfs-progs: ./dev setup installs them)")


def plant(tree: Path, defect: str | None) -> None:
    """A root tree as the seal leaves it, plus one defect."""
    for d in ("etc/ssh", "usr/bin", "var/lib/cloud/instances", "var/lib/cloud/data"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "etc/machine-id").write_text("")
    (tree / "etc/ssh/sshd_config").write_text("PasswordAuthentication no\n")
    shadow = "root:!*:20000:0:99999:7:::\nansible:!:20000:0:99999:7:::\n"
    if defect == "host key":
        (tree / "etc/ssh/ssh_host_ed25519_key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    elif defect == "machine-id":
        (tree / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    elif defect == "cloud-init state":
        (tree / "var/lib/cloud/instances/i-build").mkdir()
        (tree / "var/lib/cloud/data/instance-id").write_text("i-build\n")
    elif defect == "password":
        shadow += "packer:$6$salt$" + "h" * 86 + ":20000:0:99999:7:::\n"
    # a shadow file over several blocks: the XFS reader follows the extents
    (tree / "etc/shadow").write_text(shadow + "".join(f"user{i}:!:20000::::::\n" for i in range(400)))


def _xfs_proto(tree: Path) -> str:
    """mkfs.xfs's prototype file for ``tree`` (directories, regular files)."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def walk(d: Path, depth: int) -> None:
        for p in sorted(d.iterdir()):
            if p.is_dir():
                lines.append(f"{' ' * depth}{p.name} d--755 0 0")
                walk(p, depth + 1)
                lines.append(f"{' ' * depth}$")
            else:
                lines.append(f"{' ' * depth}{p.name} ---600 0 0 {p}")

    walk(tree, 1)
    lines.append("$")
    return "\n".join(lines) + "\n"


def make_disk(tmp: Path, fstype: str, tree: Path) -> Path:
    """A qcow2 with a GPT whose second partition holds ``fstype`` made from ``tree``."""
    fs = tmp / f"{fstype}.fs"
    size = FS_SIZE_MIB[fstype]
    with fs.open("wb") as f:
        f.truncate(size * 2**20)
    if fstype == "xfs":
        proto = tmp / "proto"
        proto.write_text(_xfs_proto(tree))
        subprocess.run(["mkfs.xfs", "-q", "-p", str(proto), str(fs)], check=True, capture_output=True)
    elif fstype == "btrfs":
        subprocess.run(["mkfs.btrfs", "-q", "--rootdir", str(tree), str(fs)], check=True, capture_output=True)
    else:
        subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(fs)], check=True, capture_output=True)
    raw = tmp / "disk.raw"
    with raw.open("wb") as f:
        f.truncate((PART_START_MIB + 1 + size + 1) * 2**20)
    table = (f"label: gpt\nstart={PART_START_MIB * 2048}, size=2048, type=21686148-6449-6E6F-744E-656564454649\n"
             f"start={(PART_START_MIB + 1) * 2048}, size={size * 2048}, type=L\n")
    subprocess.run(["sfdisk", "-q", str(raw)], input=table, text=True, check=True, capture_output=True)
    subprocess.run(["dd", f"if={fs}", f"of={raw}", "bs=1M", f"seek={PART_START_MIB + 1}", "conv=notrunc,sparse",
                    "status=none"], check=True)
    qcow2 = tmp / "artifact.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    raw.unlink()
    fs.unlink()
    return qcow2


ARTIFACT_CHECKS: dict[str, Callable[[Any], None]] = {
    "host key": HYGIENE.test_artifact_has_no_ssh_host_keys,
    "machine-id": HYGIENE.test_artifact_machine_id_empty,
    "cloud-init state": HYGIENE.test_artifact_has_no_cloud_init_state,
    "password": HYGIENE.test_artifact_has_no_usable_passwords,
}


TOOLS = {"xfs": ("mkfs.xfs", "xfs_db"), "btrfs": ("mkfs.btrfs", "btrfs"), "ext4": ("mkfs.ext4", "debugfs")}
READERS = {"xfs": "XfsImage", "btrfs": "BtrfsImage", "ext4": "OfflineImage"}


@pytest.mark.parametrize("fstype", ["xfs", "btrfs", "ext4"])
@pytest.mark.parametrize("defect", [None, *ARTIFACT_CHECKS])
def test_offline_hygiene_reads_xfs_btrfs_and_ext4(tmp_path: Path, fstype: str, defect: str | None) -> None:
    _need("qemu-img", "sfdisk", "blkid", *TOOLS[fstype])
    tree = tmp_path / "tree"
    plant(tree, defect)
    artifact = make_disk(tmp_path, fstype, tree)
    reader = CONFTEST.offline_root(str(artifact), tmp_path / "scratch")
    assert type(reader).__name__ == READERS[fstype]
    assert reader.read("/etc/shadow") == (tree / "etc/shadow").read_bytes()
    assert reader.size("/etc/shadow") == (tree / "etc/shadow").stat().st_size
    assert sorted(reader.listdir("/etc")) == sorted(p.name for p in (tree / "etc").iterdir())
    assert not reader.exists("/etc/nothing-here") and reader.listdir("/etc/nothing-here") == []
    for name, check in ARTIFACT_CHECKS.items():
        if name == defect:
            with pytest.raises(AssertionError):
                check(reader)
        else:
            check(reader)
