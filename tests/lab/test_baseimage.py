"""Unit tests for image_factory.lab.baseimage and its disk (lab.basedisk): mirror discovery, checksum file, cache
decisions, the disk layout and root filesystems."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from image_factory.image.manifest import sha256_file
from image_factory.lab import basedisk as bd
from image_factory.lab import baseimage as bi
from image_factory.settings import Settings

pytestmark = pytest.mark.unit


def test_find_mirror_deb822_skips_security_and_other_suites(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: https://nodesource.example/node\nSuites: nodistro\nComponents: main\n"
    )
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert bi.find_mirror(tmp_path) == "http://mirror.example/debian"


def test_find_mirror_one_line_format(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://other.example/debian bookworm contrib\n"
        "deb [signed-by=/k.gpg] http://ftp.example/debian bookworm main non-free\n"
    )
    assert bi.find_mirror(tmp_path) == "http://ftp.example/debian"


def test_find_mirror_none_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(bi.BaseImageError, match="FACTORY_DEBIAN_MIRROR"):
        bi.find_mirror(tmp_path)


def test_read_sha256_file(tmp_path: Path) -> None:
    f = tmp_path / "x.sha256"
    f.write_text(f"{'a' * 64}  {bi.IMAGE_NAME}\n")
    assert bi.read_sha256_file(f) == "a" * 64
    f.write_text(f"{'a' * 64}  other.qcow2\n")
    assert bi.read_sha256_file(f) is None
    assert bi.read_sha256_file(tmp_path / "missing") is None


def _fake_cached(settings: Settings, content: bytes = b"qcow2 bytes") -> bi.BasePaths:
    p = bi.base_paths(settings)
    p.dir.mkdir(parents=True)
    p.image.write_bytes(content)
    p.sha256.write_text(f"{sha256_file(p.image)}  {bi.IMAGE_NAME}\n")
    p.release_image.write_bytes(b"release " + content)
    p.release_sha256.write_text(f"{sha256_file(p.release_image)}  {bi.RELEASE_IMAGE_NAME}\n")
    p.xfs_image.write_bytes(b"xfs " + content)
    p.xfs_sha256.write_text(f"{sha256_file(p.xfs_image)}  {bi.XFS_IMAGE_NAME}\n")
    p.recipe.write_text(json.dumps({"recipe_hash": bi.recipe_hash()}))
    return p


def test_cache_states(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_mapping({"builds_dir": str(tmp_path)})
    assert bi.cache_state(settings) == "missing"
    p = _fake_cached(settings)
    assert bi.cache_state(settings) == "ok"
    p.image.write_bytes(b"qcow2 bytez")  # same size, different content
    assert bi.cache_state(settings) == "sha256 mismatch (corrupted)"
    p.image.write_bytes(b"qcow2 bytes")
    p.release_image.write_bytes(b"release qcow2 bytez")  # the variant is checked as well
    assert bi.cache_state(settings) == "sha256 mismatch (corrupted)"
    p.release_image.write_bytes(b"release qcow2 bytes")
    p.release_sha256.unlink()
    assert bi.cache_state(settings) == "checksum file missing or malformed"
    p.release_sha256.write_text(f"{sha256_file(p.release_image)}  {bi.RELEASE_IMAGE_NAME}\n")
    p.xfs_image.write_bytes(b"xfs qcow2 bytez")  # and the XFS variant
    assert bi.cache_state(settings) == "sha256 mismatch (corrupted)"
    p.xfs_image.unlink()
    assert bi.cache_state(settings) == "missing"
    p.xfs_image.write_bytes(b"xfs qcow2 bytes")
    assert bi.cache_state(settings) == "ok"
    monkeypatch.setitem(bi.FILES, "etc/hostname", "changed\n")
    assert bi.cache_state(settings) == "recipe changed"
    monkeypatch.undo()
    p.recipe.unlink()
    assert bi.cache_state(settings) == "recipe stamp missing"


def test_ensure_base_image_cache_hit_builds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_mapping({"builds_dir": str(tmp_path)})
    p = _fake_cached(settings)

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("debootstrap must not run on a cache hit")

    monkeypatch.setattr(bi, "_debootstrap", boom)
    monkeypatch.setattr(bi, "_check_tools", boom)
    assert bi.ensure_base_image(settings) == p.image
    with pytest.raises(AssertionError, match="must not run"):
        bi.ensure_base_image(settings, force=True)


def test_recipe_hash_covers_packages_and_grub(monkeypatch: pytest.MonkeyPatch) -> None:
    h = bi.recipe_hash()
    monkeypatch.setattr(bi, "PACKAGES", (*bi.PACKAGES, "vim"))
    assert bi.recipe_hash() != h
    monkeypatch.undo()
    monkeypatch.setattr(bi, "GRUB_CFG", bi.GRUB_CFG + "# x\n")
    assert bi.recipe_hash() != h
    monkeypatch.undo()
    monkeypatch.setitem(bi.FILESYSTEMS, "xfs", dataclasses.replace(bi.FILESYSTEMS["xfs"], fstab_entry="xfs ro 0 0"))
    assert bi.recipe_hash() != h
    monkeypatch.undo()
    monkeypatch.setitem(bi.VARIANTS, bi.XFS_IMAGE_NAME, ("release", "xfs"))
    assert bi.recipe_hash() != h


def test_fstab_and_grub_follow_the_root_filesystem() -> None:
    root = f"UUID={bi.ROOT_FS_UUID} / "
    assert bi.fstab(bi.FILESYSTEMS["ext4"]).startswith(f"{root}ext4 defaults,errors=remount-ro 0 1\n")
    assert bi.fstab(bi.FILESYSTEMS["xfs"]).startswith(f"{root}xfs defaults 0 0\n")
    assert {bi.FILESYSTEMS[fs].grub_module for _, fs in bi.VARIANTS.values()} == {"ext2", "xfs"}
    assert bi.VARIANTS[bi.XFS_IMAGE_NAME] == ("current", "xfs")  # the updated tree again: no second debootstrap
    assert "xfs" in bi.INITRAMFS_MODULES  # a module in Debian's kernel, unlike ext4


def _tree(root: Path) -> None:
    for d in ("etc", "usr/bin", "var/tmp", "var/lib/ucf/cache"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var/tmp").chmod(0o1777)
    (root / "etc/hostname").write_text("debian\n")
    (root / "usr/bin/Text::CharWidth.3pm").write_text("a colon inside a name is a plain character\n")
    (root / "var/lib/ucf/cache/:etc:ssh:sshd_config").write_text("PasswordAuthentication no\n")
    (root / "usr/bin/sudo").write_bytes(b"\x7fELF" + bytes(5000))
    (root / "usr/bin/sudo").chmod(0o4755)
    (root / "etc/os").symlink_to("../usr/lib/os-release")
    os.mkfifo(root / "etc/initctl")


def test_xfs_prototype_lists_the_tree_with_modes(tmp_path: Path) -> None:
    _tree(tmp_path / "t")
    prototype = bd.xfs_prototype(tmp_path / "t")
    lines = prototype.text.splitlines()
    assert lines[:3] == ["/dev/null", "0 0", "d--755 0 0"] and lines[-1] == "$"
    uid, gid = os.getuid(), os.getgid()
    assert f"hostname ---644 {uid} {gid} {tmp_path}/t/etc/hostname" in lines
    assert f"sudo -u-755 {uid} {gid} {tmp_path}/t/usr/bin/sudo" in lines
    assert f"os l--777 {uid} {gid} ../usr/lib/os-release" in lines
    assert f"initctl p--644 {uid} {gid}" in lines
    assert f"tmp d--777 {uid} {gid}" in lines  # the format has no sticky bit: set afterwards
    assert prototype.sticky == [("/var/tmp", stat.S_IFDIR | 0o1777)]
    assert f"_etc:ssh:sshd_config ---644 {uid} {gid} {tmp_path}/t/var/lib/ucf/cache/:etc:ssh:sshd_config" in lines
    assert prototype.renames == [("/var/lib/ucf/cache", "_etc:ssh:sshd_config", ":etc:ssh:sshd_config")]
    assert prototype.text.count("$") == prototype.text.count(" d--") + 1  # every directory closed, then the root


@pytest.mark.parametrize("name", ["has space", "$", "tab\tname"])
def test_xfs_prototype_refuses_names_it_cannot_hold(tmp_path: Path, name: str) -> None:
    _tree(tmp_path / "t")
    (tmp_path / "t/etc" / name).write_text("x")
    with pytest.raises(bi.BaseImageError, match="prototype file cannot name it"):
        bd.xfs_prototype(tmp_path / "t")


def test_xfs_prototype_refuses_a_colon_name_whose_stand_in_is_taken(tmp_path: Path) -> None:
    _tree(tmp_path / "t")
    (tmp_path / "t/var/lib/ucf/cache/_etc:ssh:sshd_config").write_text("x")
    with pytest.raises(bi.BaseImageError, match="needs that name free"):
        bd.xfs_prototype(tmp_path / "t")


def test_xfs_root_made_from_the_tree_and_checked(tmp_path: Path) -> None:
    """The real tools: mkfs.xfs -p makes the root from the tree, xfs_db sets the sticky bit, and the disk check
    (xfs_repair -n) passes on it and fails on a damaged copy."""
    for tool in ("mkfs.xfs", "xfs_db", "xfs_repair", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (xfsprogs, qemu-utils: ./dev setup installs them)")
    _tree(tmp_path / "t")
    part = tmp_path / "part.img"
    bd._make_xfs(tmp_path / "t", tmp_path, part, 320)
    def db(*commands: str) -> str:
        args = [a for c in commands for a in ("-c", c)]
        return subprocess.run(["xfs_db", "-r", *args, str(part)], capture_output=True, text=True, check=True).stdout
    assert "core.mode = 041777" in db("path /var/tmp", "print core.mode")
    assert "core.mode = 0104755" in db("path /usr/bin/sudo", "print core.mode")
    assert "core.size = 43" in db("path /usr/bin/Text::CharWidth.3pm", "print core.size")
    assert "core.size = 26" in db("path /var/lib/ucf/cache/:etc:ssh:sshd_config", "print core.size")
    assert "_etc" not in db("ls /var/lib/ucf/cache")
    assert f"UUID = {bi.ROOT_FS_UUID}" in db("uuid")
    assert 'label = "root"' in db("label")
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as fh:
        fh.truncate((bi.PART_START_MIB + 321) * 2**20)
    bd._copy_sparse(part, raw, bi.PART_START_MIB * 2**20)
    bi.FILESYSTEMS["xfs"].check(raw, tmp_path)
    with raw.open("r+b") as fh:  # the root directory's inode block, zeroed
        root_ino = int(re.search(r"rootino = (\d+)", db("sb 0", "print rootino"))[1])  # type: ignore[index]
        fh.seek(bi.PART_START_MIB * 2**20 + root_ino * 512)
        fh.write(bytes(512))
    with pytest.raises(bi.BaseImageError, match="xfs_repair -n"):
        bi.FILESYSTEMS["xfs"].check(raw, tmp_path)


def test_newest_kernel_in_debian_version_order(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    for version in ("6.12.99+deb13-cloud-amd64", "6.12.118+deb13-cloud-amd64", "6.12.100+deb13-cloud-amd64"):
        (boot / f"vmlinuz-{version}").write_text("k")
        (boot / f"initrd.img-{version}").write_text("i")
    kernel, initrd = bi.kernel_and_initrd(tmp_path)
    assert kernel.name == "vmlinuz-6.12.118+deb13-cloud-amd64"
    assert initrd.name == "initrd.img-6.12.118+deb13-cloud-amd64"


def test_configure_removes_identity_and_locks_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for d in ("etc/ssh", "var/lib/dbus", "var/log/apt", "var/lib/cloud/instances/old", "root"):
        (root / d).mkdir(parents=True)
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("secret")
    (root / "etc/ssh/sshd_config").write_text("x")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/dbus/machine-id").write_text("x")
    (root / "var/log/apt/history.log").write_text("build noise")
    (root / "root/.bash_history").write_text("ls")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    bi._configure(root, "http://mirror.example/debian", bi.FILESYSTEMS["xfs"])
    assert (root / "etc/fstab").read_text() == bi.fstab(bi.FILESYSTEMS["xfs"])
    assert sorted(x.name for x in (root / "etc/ssh").iterdir()) == ["sshd_config", "sshd_config.d"]
    assert (root / "etc/machine-id").read_text() == ""
    assert not (root / "var/lib/dbus/machine-id").exists()
    assert (root / "var/log/apt/history.log").read_bytes() == b""
    assert not (root / "root/.bash_history").exists()
    assert list((root / "var/lib/cloud").iterdir()) == []
    assert (root / "etc/shadow").read_text().startswith("root:!*:")
    sources = (root / "etc/apt/sources.list").read_text()
    assert sources == ("deb http://mirror.example/debian trixie main\ndeb http://mirror.example/debian trixie-updates "
                       "main\ndeb http://mirror.example/debian-security trixie-security main\n")
    assert "datasource_list: [ NoCloud, None ]" in (root / "etc/cloud/cloud.cfg.d/90-factory.cfg").read_text()


MBR_START = 2048  # a classic MBR disk's first partition: core.img goes into the gap before it


def _mbr_disk(path: Path, mib: int = 4) -> bytes:
    with path.open("wb") as fh:
        fh.truncate(mib * 1024 * 1024)
    layout = f"label: dos\nlabel-id: 0x1234abcd\nunit: sectors\nstart={MBR_START}, type=83, bootable\n"
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(path)], input=layout.encode(), check=True)
    return path.read_bytes()[:512]


def _fake_core(sectors: int, blocklist: tuple[int, int, int] = (2, 0, 0x820)) -> bytes:
    core = bytearray(b"\xc0" * (sectors * 512 - 100))  # not sector aligned, like grub-mkimage's output
    core = core.ljust(512, b"\0") if len(core) < 512 else core
    struct.pack_into("<QHH", core, 500, *blocklist)
    return bytes(core)


def test_embed_grub_writes_boot_and_core_and_keeps_the_partition_table(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    mbr = _mbr_disk(raw)
    boot_img = bytes(range(256)) * 2
    core = _fake_core(5)
    bi.embed_grub(raw, boot_img, core, MBR_START)
    data = raw.read_bytes()
    sector0 = data[:512]
    assert sector0[0x1B8:] == mbr[0x1B8:], "disk signature and partition table must survive"
    assert sector0[0x5A:0x5C] == boot_img[0x5A:0x5C] and sector0[0x68:0x1B8] == boot_img[0x68:0x1B8]
    assert sector0[0x03:0x5A] == mbr[0x03:0x5A]
    assert struct.unpack_from("<Q", sector0, 0x5C) == (1,) and sector0[0x64] == 0xFF
    assert sector0[0x66:0x68] == b"\x90\x90"
    written = data[512 : 512 + 5 * 512]
    assert struct.unpack_from("<QHH", written, 500) == (2, 4, 0x820)
    assert written[:500] == core[:500] and written[512 : len(core)] == core[512:]
    dump = subprocess.run(["sfdisk", "--dump", str(raw)], capture_output=True, text=True, check=True).stdout
    assert "label-id: 0x1234abcd" in dump and f"start=        {MBR_START}" in dump


def test_embed_grub_on_the_hybrid_gpt_disk_uses_its_bios_boot_partition(tmp_path: Path) -> None:
    """The base image's layout: boot.img into the protective MBR, pointing at core.img in partition 14,
    whose block list loads the sectors after it; the GPT (both copies) and the other partitions untouched."""
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as fh:
        fh.truncate(bi.DISK_SIZE_MIB * 1024 * 1024)
    layout = bd.gpt_layout(raw, bi.DISK_SIZE_MIB - bi.PART_START_MIB - bi.GPT_BACKUP_MIB)
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(raw)], input=layout.encode(), check=True)
    before = subprocess.run(["sfdisk", "--dump", str(raw)], capture_output=True, text=True, check=True).stdout
    protective = raw.read_bytes()[:512]
    _, start_mib, size_mib = bi.BIOS_BOOT_PART
    core = _fake_core(60)
    bi.embed_grub(raw, bytes(range(256)) * 2, core, (start_mib + size_mib) * 2048, core_sector=start_mib * 2048)
    with raw.open("rb") as fh:
        sector0 = fh.read(512)
        fh.seek(start_mib * 2048 * 512)
        written = fh.read(60 * 512)
    assert sector0[0x1B8:] == protective[0x1B8:]
    assert struct.unpack_from("<Q", sector0, 0x5C) == (start_mib * 2048,)
    assert struct.unpack_from("<QHH", written, 500) == (start_mib * 2048 + 1, 59, 0x820)
    assert written[512 : len(core)] == core[512:]
    after = subprocess.run(["sfdisk", "--verify", str(raw)], capture_output=True, text=True)
    assert after.returncode == 0, after.stdout + after.stderr
    assert subprocess.run(["sfdisk", "--dump", str(raw)], capture_output=True, text=True).stdout == before
    table = json.loads(subprocess.check_output(["sfdisk", "--json", str(raw)]))["partitiontable"]
    types = {p["node"].removeprefix(str(raw)): p["type"] for p in table["partitions"]}
    assert types == {"1": bd.GPT_TYPES["root"], "14": bd.GPT_TYPES["bios"], "15": bd.GPT_TYPES["esp"]}
    with pytest.raises(bi.BaseImageError, match="does not fit in the BIOS boot partition"):
        bi.embed_grub(raw, bytes(512), _fake_core(size_mib * 2048 + 1), (start_mib + size_mib) * 2048,
                      core_sector=start_mib * 2048)


@pytest.mark.parametrize(
    ("core", "first_sector", "match"),
    [
        (_fake_core(5), 5, "does not fit before the first partition"),
        (_fake_core(3, (7, 0, 0x820)), 2048, "unexpected block list"),
        (_fake_core(3, (2, 9, 0x820)), 2048, "unexpected block list"),
    ],
)
def test_embed_grub_refuses_what_it_cannot_place(tmp_path: Path, core: bytes, first_sector: int, match: str) -> None:
    raw = tmp_path / "disk.raw"
    before = _mbr_disk(raw)
    with pytest.raises(bi.BaseImageError, match=match):
        bi.embed_grub(raw, bytes(512), core, first_sector)
    assert raw.read_bytes()[:512] == before, "nothing written on refusal"


def test_embed_grub_needs_a_partitioned_disk(tmp_path: Path) -> None:
    raw = tmp_path / "blank.raw"
    raw.write_bytes(bytes(1024 * 1024))
    with pytest.raises(bi.BaseImageError, match="no MBR partition table"):
        bi.embed_grub(raw, bytes(512), _fake_core(3), 2048)


def test_check_fs_passes_a_clean_filesystem_and_names_a_damaged_one(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("debian\n")
    part = tmp_path / "part.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(part), "8M"], check=True)
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as fh:
        fh.truncate(10 * 1024 * 1024)
    bd._copy_sparse(part, raw, bi.PART_START_MIB * 1024 * 1024)
    bd._check_ext4(raw, tmp_path)
    with raw.open("r+b") as fh:  # wreck the root directory's inode table block group descriptors
        fh.seek(bi.PART_START_MIB * 1024 * 1024 + 4096)
        fh.write(b"\xff" * 4096)
    with pytest.raises(bi.BaseImageError, match="e2fsck found problems"):
        bd._check_ext4(raw, tmp_path)


def test_debootstrap_sees_the_preseed_files_and_unsafe_io_is_gone_afterwards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    seen = tmp_path / "seen"
    fake = bindir / "debootstrap"
    # The target is the second-to-last argument: record what dpkg would find there.
    fake.write_text(f'#!/bin/sh\nfor a; do t=$p; p=$a; done\nls -R "$t/etc" "$t/usr" > {seen}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    root = tmp_path / "root"
    bi._debootstrap(root, "http://mirror.example/debian", tmp_path / "debs", tmp_path / "log")
    listing = seen.read_text()
    assert "00-factory-build-unsafe-io" in listing and "factory-vm" in listing
    assert not (root / bi.DPKG_UNSAFE_IO).exists()
    assert (root / "etc/initramfs-tools/conf.d/factory").read_text() == "MODULES=list\n"
    modules = (root / "usr/share/initramfs-tools/modules.d/factory-vm").read_text().split()
    assert {"virtio_scsi", "virtio_blk", "sd_mod"} <= set(modules)


def test_fetch_packages_downloads_once_per_package_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    (bindir / "debootstrap").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bindir / "debootstrap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds"), "cache_dir": str(tmp_path / "cache")})
    mirror = "http://mirror.example/debian"
    assert bi.fetch_packages(settings, mirror=mirror) is True
    (args,) = calls.read_text().splitlines()
    assert "--download-only" in args and f"--cache-dir={tmp_path / 'cache/debs'}" in args and args.endswith(mirror)
    assert bi.fetch_packages(settings, mirror=mirror) is False, "a second set-up downloads nothing"
    assert len(calls.read_text().splitlines()) == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("fetch-")], "temporary target removed"
    monkeypatch.setattr(bi, "PACKAGES", (*bi.PACKAGES, "vim"))
    assert bi.fetch_packages(settings, mirror=mirror) is True, "a changed package list fetches again"


def test_mounts_left_in_the_chroot_are_unmounted_before_the_tree_is_copied_or_removed(tmp_path: Path) -> None:
    """debootstrap leaves the chroot's /proc mounted when its own umount fails (busy): found and unmounted,
    deepest first, and nothing outside the tree is touched."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    root = tmp_path / "work dir" / "root"
    (root / "proc").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    mounted = []
    try:
        for where in (root / "proc", outside):
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(where)], check=True)
            mounted.append(where)
        (root / "proc" / "sub").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(root / "proc" / "sub")], check=True)
        mounted.append(root / "proc" / "sub")
        assert bi._mounts_below(tmp_path / "work dir") == [root / "proc" / "sub", root / "proc"]
        bi._unmount_below(tmp_path / "work dir")
        assert bi._mounts_below(tmp_path / "work dir") == []
        assert bi._mounts_below(outside) == [outside]
    finally:
        for where in reversed(mounted):
            subprocess.run(["umount", "-l", str(where)], check=False)
