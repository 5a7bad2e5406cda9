"""The offline base image's disk (step 3 and 4 of lab.baseimage): a hybrid GPT layout like Debian's genericcloud
image, the root filesystem made from the tree (ext4 by ``mkfs.ext4 -d``, XFS from a prototype file), the EFI
system partition, and GRUB embedded for a BIOS boot; no loop devices, no mounts."""

from __future__ import annotations

import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from debian.debian_support import Version

from image_factory.errors import FactoryError

DISK_SIZE_MIB = 2048
# A hybrid GPT disk laid out like Debian's genericcloud image: the root is partition 1 (last on the disk, so
# cloud-init's growpart can grow it), GRUB's core.img in a BIOS boot partition (14) for a BIOS boot, and an
# EFI system partition (15) with the removable-path loader for a UEFI boot.
BIOS_BOOT_PART = (14, 1, 3)  # (number, start MiB, size MiB)
ESP_PART = (15, 4, 60)
PART_START_MIB = 64  # the root partition's start
GPT_BACKUP_MIB = 1  # room for the backup GPT at the end of the disk
# Fixed so the recipe (and thus the cache key) is deterministic; GRUB and fstab find the root by it.
ROOT_FS_UUID = "3b2c6a1e-5d0f-4f6e-9a51-0f1ac70e2d12"
ROOT_LABEL = "root"
# The ESP's FAT volume id, as fstab names it (UUID=5EED-0EF1).
ESP_VOLUME_ID = "5EED0EF1"
ESP_FS_UUID = f"{ESP_VOLUME_ID[:4]}-{ESP_VOLUME_ID[4:]}"
ESP_LABEL = "ESP"
GPT_TYPES = {"root": "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "bios": "21686148-6449-6E6F-744E-656564454649",
             "esp": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"}


# Filesystem features every GRUB since 2.06 reads; pinned so the host's mke2fs.conf does not matter.
MKE2FS_CONF = """\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
"""


# GRUB's first stage finds its prefix by the root filesystem's UUID (disk order does not matter).
GRUB_EARLY_CFG = f"search.fs_uuid {ROOT_FS_UUID} root\nset prefix=($root)/boot/grub\n"
GRUB_CORE_MODULES = ("biosdisk", "part_gpt", "search_fs_uuid")  # + the root filesystem's module
# What grub-install writes beside a signed GRUB: its built-in prefix is /EFI/debian on the ESP, and this
# hands over to the menu in the root filesystem, found by its UUID (the seal keeps it so in a clone).
GRUB_EFI_STUB_CFG = f"search.fs_uuid {ROOT_FS_UUID} root\nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n"
# Signed binaries in the root -> their place on the ESP. shim at the removable path loads grubx64.efi
# from its own directory; no fbx64.efi, so the firmware never gets boot entries written and a reset.
ESP_FILES = {
    "usr/lib/shim/shimx64.efi.signed": "EFI/BOOT/BOOTX64.EFI",
    "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed": "EFI/BOOT/grubx64.efi",
    "usr/lib/shim/mmx64.efi.signed": "EFI/BOOT/mmx64.efi",
}
# The menu update-grub would write for this one kernel; update-grub in a clone rewrites it from
# /etc/default/grub, which says the same.
GRUB_CFG = """\
set default=0
set timeout=1
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
insmod part_gpt
insmod {fs_module}
search --no-floppy --fs-uuid --set=root {uuid}
menuentry 'Debian GNU/Linux' {{
\tlinux /boot/{kernel} root=UUID={uuid} ro console=tty0 console=ttyS0,115200n8
\tinitrd /boot/{initrd}
}}
"""

class BaseImageError(FactoryError):
    pass


def run_step(cmd: list[str], what: str, log: Path | None = None, timeout: float = 1800) -> None:
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BaseImageError(f"base image: {what} timed out after {timeout:.0f}s") from None
    out = proc.stdout.decode(errors="replace")
    if log is not None:
        log.write_text(out, encoding="utf-8")
    if proc.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise BaseImageError(f"base image: {what} failed (exit {proc.returncode}):\n{tail}")


def _make_ext4(root: Path, work: Path, part: Path, part_mib: int) -> None:
    conf = work / "mke2fs.conf"
    conf.write_text(MKE2FS_CONF, encoding="utf-8")
    env = {**os.environ, "MKE2FS_CONFIG": str(conf)}
    cmd = ["mkfs.ext4", "-q", "-F", "-T", "ext4", "-L", ROOT_LABEL, "-U", ROOT_FS_UUID,
           "-d", str(root), str(part), f"{part_mib}M"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    except subprocess.TimeoutExpired:
        raise BaseImageError("base image: mkfs.ext4 timed out") from None
    if proc.returncode != 0:
        raise BaseImageError(f"base image: mkfs.ext4 -d failed: {proc.stdout.decode(errors='replace')[-2000:]}")


# A prototype entry's mode: type, set-uid, set-gid, three octal digits (xfsprogs mkfs/proto.c: no sticky bit).
PROTO_TYPES = {stat.S_IFREG: "-", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c", stat.S_IFBLK: "b",
               stat.S_IFIFO: "p"}
# What the prototype grammar cannot hold in a name or link target: its tokens end at white space, a token
# starting with ':' is a comment (inside one it is a plain character: Perl's Text::CharWidth.3pm.gz), and a
# lone '$' closes a directory (xfsprogs mkfs/proto.c: getstr).
PROTO_UNSAFE = re.compile(r"\s|^:|^\$$")
# A name starting with ':' (ucf's cache, /var/lib/ucf/cache/:etc:ssh:sshd_config) goes in under this first
# character and is renamed in place afterwards (xfs_db, in its directory's inode).
PROTO_COLON_STANDIN = "_"


@dataclass
class XfsPrototype:
    """mkfs.xfs's prototype file for a tree, and what the format cannot say, done by xfs_db afterwards: the
    sticky bits (path, full mode) and the names starting with ':' (directory, stand-in name, real name)."""

    text: str
    sticky: list[tuple[str, int]]
    renames: list[tuple[str, str, str]]


def xfs_prototype(root: Path) -> XfsPrototype:
    """The prototype file for the tree at ``root``: every entry with its owner and mode (hard links become
    copies); anything the format cannot hold at all stops with its path."""
    sticky: list[tuple[str, int]] = []
    renames: list[tuple[str, str, str]] = []

    def mode(st: os.stat_result, where: str) -> str:
        if stat.S_IFMT(st.st_mode) not in PROTO_TYPES:
            raise BaseImageError(f"base image: {where} is a {stat.filemode(st.st_mode)[0]!r} file, which mkfs.xfs's "
                                 "prototype file cannot hold (sockets belong to a running system)")
        if st.st_mode & stat.S_ISVTX:
            sticky.append((where, st.st_mode))
        return (PROTO_TYPES[stat.S_IFMT(st.st_mode)] + ("u" if st.st_mode & stat.S_ISUID else "-")
                + ("g" if st.st_mode & stat.S_ISGID else "-") + f"{st.st_mode & 0o777:03o}")

    def name_in(directory: str, name: str, siblings: set[str]) -> str:
        if not name.startswith(":"):
            return name
        standin = PROTO_COLON_STANDIN + name[1:]
        if standin in siblings or '"' in name or "\\" in name:
            raise BaseImageError(f"base image: {directory or ''}/{name}: a name starting with ':' goes in as {standin} "
                                 "and is renamed afterwards, which needs that name free and no quote or backslash")
        renames.append((directory or "/", standin, name))
        return standin

    lines = ["/dev/null", "0 0", f"{mode(root.lstat(), '/')} {root.lstat().st_uid} {root.lstat().st_gid}"]

    def walk(directory: Path, inside: str) -> None:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
        siblings = {e.name for e in entries}
        for entry in entries:
            where = f"{inside}/{entry.name}"
            st = entry.stat(follow_symlinks=False)
            target = os.readlink(entry.path) if entry.is_symlink() else ""
            name = name_in(inside, entry.name, siblings)
            if PROTO_UNSAFE.search(name) or PROTO_UNSAFE.search(target) or PROTO_UNSAFE.search(entry.path):
                raise BaseImageError(f"base image: {where} (or its link target {target!r}) has white space or is "
                                     "'$' (or the link target starts with ':'): mkfs.xfs's prototype file cannot "
                                     "name it")
            head = f"{name} {mode(st, where)} {st.st_uid} {st.st_gid}"
            kind = stat.S_IFMT(st.st_mode)
            if kind == stat.S_IFDIR:
                lines.append(head)
                walk(Path(entry.path), where)
                lines.append("$")
            elif kind == stat.S_IFREG:
                lines.append(f"{head} {entry.path}")
            elif kind == stat.S_IFLNK:
                lines.append(f"{head} {target}")
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                lines.append(f"{head} {os.major(st.st_rdev)} {os.minor(st.st_rdev)}")
            else:
                lines.append(head)

    walk(root, "")
    lines.append("$")
    return XfsPrototype("\n".join(lines) + "\n", sticky, renames)


def _xfs_tool(cmd: list[str], what: str) -> str:
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    except subprocess.TimeoutExpired:
        raise BaseImageError(f"base image: {what} timed out") from None
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        raise BaseImageError(f"base image: {what} failed (exit {proc.returncode}): {out[-2000:]}")
    return out


def _xfs_rename(part: Path, directory: str, standin: str, name: str) -> None:
    """Rename an entry of a short-form directory (its entries in the directory's own inode, no hash index)
    in place; xfs_db recomputes the inode's CRC. A larger directory is refused: its entries are hashed."""
    listing = _xfs_tool(["xfs_db", "-r", "-c", f"path {directory}", "-c", "print u3", str(part)],
                        f"xfs_db (reading {directory})")
    found = re.search(rf'^u3\.sfdir3\.list\[(\d+)\]\.name = "{re.escape(standin)}"$', listing, re.MULTILINE)
    if found is None:
        raise BaseImageError(f"base image: {directory}/{name}: its directory is not a short-form one (or lacks "
                             f"{standin}): the name cannot be set in place")
    field = f"u3.sfdir3.list[{found[1]}].name"
    out = _xfs_tool(["xfs_db", "-x", "-c", f"path {directory}", "-c", f'write {field} "{name}"', str(part)],
                    f"xfs_db (naming {directory}/{name})")
    if f'{field} = "{name}"' not in out:
        raise BaseImageError(f"base image: xfs_db did not name {directory}/{name}: {out[-500:]}")


def _make_xfs(root: Path, work: Path, part: Path, part_mib: int) -> None:
    prototype = xfs_prototype(root)
    proto = work / "xfs.proto"
    proto.write_text(prototype.text, encoding="utf-8")
    with part.open("wb") as fh:
        fh.truncate(part_mib * 1024 * 1024)
    _xfs_tool(["mkfs.xfs", "-q", "-f", "-L", ROOT_LABEL, "-m", f"uuid={ROOT_FS_UUID}", "-p", str(proto), str(part)],
              "mkfs.xfs -p")
    for where, full_mode in prototype.sticky:
        # xfs_db reads numbers in C notation (a leading 0: octal); core.mode holds the type bits too
        out = _xfs_tool(["xfs_db", "-x", "-c", f"path {where}", "-c", f"write core.mode 0{full_mode:o}", str(part)],
                        f"xfs_db (sticky bit of {where})")
        if f"core.mode = 0{full_mode:o}" not in out:
            raise BaseImageError(f"base image: xfs_db did not set {where}'s mode to {full_mode:o}: {out[-500:]}")
    for directory, standin, name in prototype.renames:
        _xfs_rename(part, directory, standin, name)
    proto.unlink()


def make_disk(root: Path, work: Path, raw: Path, fs: RootFilesystem) -> None:
    part = work / "part.img"
    part_mib = DISK_SIZE_MIB - PART_START_MIB - GPT_BACKUP_MIB
    fs.make(root, work, part, part_mib)
    with raw.open("wb") as fh:
        fh.truncate(DISK_SIZE_MIB * 1024 * 1024)
    layout = gpt_layout(raw, part_mib)
    proc = subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", str(raw)], input=layout.encode(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    if proc.returncode != 0:
        raise BaseImageError(f"base image: sfdisk failed: {proc.stdout.decode(errors='replace')[-2000:]}")
    _copy_sparse(part, raw, PART_START_MIB * 1024 * 1024)
    part.unlink()


def gpt_layout(raw: Path, root_mib: int) -> str:
    """sfdisk's script for the hybrid disk: root as partition 1, BIOS boot and ESP numbered as Debian's."""
    lines = ["label: gpt", "unit: sectors", "first-lba: 2048",
             f"{raw}1 : start={PART_START_MIB * 2048}, size={root_mib * 2048}, type={GPT_TYPES['root']}, name=root"]
    for (number, start, size), kind in ((BIOS_BOOT_PART, "bios"), (ESP_PART, "esp")):
        lines.append(f"{raw}{number} : start={start * 2048}, size={size * 2048}, type={GPT_TYPES[kind]}")
    return "\n".join(lines) + "\n"


def make_esp(root: Path, work: Path, raw: Path) -> None:
    """The EFI system partition: a FAT filesystem with shim at the removable path and GRUB's stub config."""
    esp = work / "esp.img"
    _, start, size = ESP_PART
    with esp.open("wb") as fh:
        fh.truncate(size * 1024 * 1024)
    run_step(["mkfs.vfat", "-i", ESP_VOLUME_ID, "-n", ESP_LABEL, str(esp)], "mkfs.vfat (ESP)")
    stub = work / "grub-efi.cfg"
    stub.write_text(GRUB_EFI_STUB_CFG, encoding="utf-8")
    mtools = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    dirs = sorted({"::/" + str(Path(dst).parent) for dst in ESP_FILES.values()} | {"::/EFI", "::/EFI/debian"})
    copies = [(root / src, dst) for src, dst in ESP_FILES.items()] + [(stub, "EFI/debian/grub.cfg")]
    for src, _dst in copies:
        if not src.is_file():
            raise BaseImageError(f"base image: {src} missing (shim-signed or grub-efi-amd64-signed not installed?)")
    for cmd in (["mmd", "-i", str(esp), *dirs],
                *(["mcopy", "-i", str(esp), str(src), f"::/{dst}"] for src, dst in copies)):
        proc = subprocess.run(cmd, env=mtools, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise BaseImageError(f"base image: {cmd[0]} (ESP) failed: {proc.stdout.decode(errors='replace')[-1000:]}")
    run_step(["fsck.vfat", "-n", str(esp)], "fsck.vfat (ESP)")
    _copy_sparse(esp, raw, start * 1024 * 1024)
    esp.unlink()


def _copy_sparse(src: Path, dst: Path, offset: int, chunk: int = 1024 * 1024) -> None:
    zero = bytes(chunk)
    with src.open("rb") as fi, dst.open("r+b") as fo:
        pos = 0
        while block := fi.read(chunk):
            if block != zero[: len(block)]:
                fo.seek(offset + pos)
                fo.write(block)
            pos += len(block)


def kernel_and_initrd(root: Path) -> tuple[Path, Path]:
    """The newest kernel in ROOT/boot (Debian version order) and its initrd."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"), key=lambda k: Version(k.name.removeprefix("vmlinuz-")))
    if not kernels:
        raise BaseImageError(f"base image: no kernel in {root}/boot (linux-image-cloud-amd64 missing?)")
    k = kernels[-1]
    initrd = root / "boot" / ("initrd.img-" + k.name.removeprefix("vmlinuz-"))
    if not initrd.is_file():
        raise BaseImageError(f"base image: {initrd} missing (initramfs-tools did not run)")
    return k, initrd


def prepare_grub(root: Path, fs: RootFilesystem) -> tuple[bytes, bytes]:
    """GRUB's modules and grub.cfg into ROOT/boot/grub; returns (core.img, boot.img) for embed_grub."""
    lib = root / "usr/lib/grub/i386-pc"
    if not (lib / "boot.img").is_file() or not (root / "usr/bin/grub-mkimage").is_file():
        raise BaseImageError(f"base image: {lib}/boot.img or grub-mkimage missing (grub-pc not installed?)")
    kernel, initrd = kernel_and_initrd(root)
    grub = root / "boot/grub"
    (grub / "i386-pc").mkdir(parents=True, exist_ok=True)
    for f in lib.iterdir():
        if f.suffix in (".mod", ".lst", ".img") or f.name == "modinfo.sh":
            shutil.copy2(f, grub / "i386-pc" / f.name)
    (grub / "grub.cfg").write_text(GRUB_CFG.format(uuid=ROOT_FS_UUID, kernel=kernel.name, initrd=initrd.name,
                                                   fs_module=fs.grub_module), encoding="utf-8")
    # The root's own grub-mkimage, so core.img matches the modules it will load. It needs no /proc.
    scratch = Path(tempfile.mkdtemp(prefix="grub-", dir=root / "tmp"))
    try:
        (scratch / "early.cfg").write_text(GRUB_EARLY_CFG, encoding="utf-8")
        inside = "/" + str(scratch.relative_to(root))
        run_step(["chroot", str(root), "grub-mkimage", "-O", "i386-pc", "-d", "/usr/lib/grub/i386-pc",
              "-c", f"{inside}/early.cfg", "-p", "/boot/grub", "-o", f"{inside}/core.img", *GRUB_CORE_MODULES,
              fs.grub_module],
             "grub-mkimage")  # fmt: skip
        return (scratch / "core.img").read_bytes(), (lib / "boot.img").read_bytes()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# i386-pc boot.img layout (grub/include/grub/i386/pc/boot.h) and diskboot.img's block list.
SECTOR = 512
BOOT_BPB = slice(0x03, 0x5A)
BOOT_KERNEL_SECTOR = 0x5C
BOOT_DRIVE = 0x64
BOOT_DRIVE_CHECK = slice(0x66, 0x68)
MBR_NT_MAGIC = 0x1B8  # disk signature and partition table from here on: the disk's, not boot.img's
DISKBOOT_BLOCKLIST = SECTOR - 12  # struct { u64 start; u16 len; u16 segment } ending diskboot.img
DISKBOOT_SEGMENT = 0x820


def embed_grub(raw: Path, boot_img: bytes, core_img: bytes, end_sector: int, *, core_sector: int = 1) -> None:
    """What grub-bios-setup does: boot.img into sector 0, core.img from ``core_sector`` up to ``end_sector``
    (an MBR disk: from sector 1 to the first partition; a GPT disk: its BIOS boot partition)."""
    if len(boot_img) != SECTOR:
        raise BaseImageError(f"base image: boot.img is {len(boot_img)} bytes, not one sector")
    sectors = -(-len(core_img) // SECTOR)
    if core_sector + sectors > end_sector:
        where = "before the first partition" if core_sector == 1 else "in the BIOS boot partition"
        raise BaseImageError(f"base image: core.img ({sectors} sectors) does not fit {where}")
    core = bytearray(core_img.ljust(sectors * SECTOR, b"\0"))
    start, length, segment = struct.unpack_from("<QHH", core, DISKBOOT_BLOCKLIST)
    if (start, segment) != (2, DISKBOOT_SEGMENT) or length not in (0, sectors - 1):
        raise BaseImageError(f"base image: core.img has an unexpected block list ({start}, {length}, {segment:#x})")
    # diskboot.img (core.img's first sector) loads the rest of core.img, the sectors after it, to 0x820:0000.
    struct.pack_into("<QHH", core, DISKBOOT_BLOCKLIST, core_sector + 1, sectors - 1, DISKBOOT_SEGMENT)
    with raw.open("r+b") as fh:
        mbr = fh.read(SECTOR)
        if len(mbr) != SECTOR or mbr[510:] != b"\x55\xaa":
            raise BaseImageError(f"base image: {raw} has no MBR partition table")
        boot = bytearray(boot_img)
        boot[BOOT_BPB] = mbr[BOOT_BPB]
        struct.pack_into("<Q", boot, BOOT_KERNEL_SECTOR, core_sector)
        boot[BOOT_DRIVE] = 0xFF  # the drive the BIOS booted from
        boot[BOOT_DRIVE_CHECK] = b"\x90\x90"  # grub-setup's hard-disk workaround for buggy BIOSes
        boot[MBR_NT_MAGIC:] = mbr[MBR_NT_MAGIC:]
        fh.seek(0)
        fh.write(boot)
        fh.seek(core_sector * SECTOR)
        fh.write(core)


def _check_ext4(raw: Path, work: Path) -> None:
    """The root filesystem, as written into the disk, must be clean for e2fsck."""
    spec = f"{raw}?offset={PART_START_MIB * 1024 * 1024}"
    check = subprocess.run(["e2fsck", "-fn", spec], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if check.returncode != 0:
        raise BaseImageError(f"base image: e2fsck found problems:\n{check.stdout.decode(errors='replace')[-1500:]}")


def _check_xfs(raw: Path, work: Path) -> None:
    """The same for xfs_repair, which reads a filesystem at offset 0 only: the partition copied out first."""
    part = work / "check.img"
    run_step(["qemu-img", "convert", "-O", "raw", "--image-opts",
          f"driver=raw,offset={PART_START_MIB * 1024 * 1024},file.driver=file,file.filename={raw}", str(part)],
         "copying the XFS root out for xfs_repair")  # fmt: skip
    try:
        _xfs_tool(["xfs_repair", "-n", "-f", str(part)], "xfs_repair -n (problems found)")
    finally:
        part.unlink(missing_ok=True)


@dataclass(frozen=True)
class RootFilesystem:
    """What differs per root filesystem: fstab's options and pass, GRUB's module for it, how the partition file
    is made from the tree and how the finished disk is checked."""

    fstab_entry: str
    grub_module: str
    recipe: str  # what the maker pins (part of the recipe hash)
    make: Callable[[Path, Path, Path, int], None]
    check: Callable[[Path, Path], None]


FILESYSTEMS: dict[str, RootFilesystem] = {
    "ext4": RootFilesystem("ext4 defaults,errors=remount-ro 0 1", "ext2", MKE2FS_CONF, _make_ext4, _check_ext4),
    # fsck.xfs does nothing (XFS replays its log at mount): pass 0, as Debian's installer writes it.
    "xfs": RootFilesystem("xfs defaults 0 0", "xfs", "mkfs.xfs -p prototype; sticky bits by xfs_db; xfs_repair -n",
                          _make_xfs, _check_xfs),
}



def fstab(fs: RootFilesystem) -> str:
    return f"UUID={ROOT_FS_UUID} / {fs.fstab_entry}\nUUID={ESP_FS_UUID} /boot/efi vfat defaults,umask=0077,nofail 0 2\n"
