"""The offline Debian base image: a small, bootable cloud image made without internet.

``ensure_base_image`` produces builds/base/debian-13-base.qcow2 (plus a ``sha256sum`` file) from the
Debian archive this machine reaches, with no loop devices or mounts:

1. ``debootstrap --variant=minbase`` of trixie (its release suite, so the build's update step has
   newer packages from trixie-updates and trixie-security to apply, a kernel among them) with a
   kernel, GRUB, cloud-init, OpenSSH and the QEMU guest agent into a temporary root (the .deb files
   cached in <cache_dir>/debs, shared by every clone on the machine; debootstrap checks each against
   the signed archive index);
2. configuration written into that root: NoCloud + None datasources, DHCP on the first NIC from
   cloud-init's network config (or its fallback), serial console, no SSH host keys, empty
   /etc/machine-id, root password locked;
3. a hybrid GPT raw disk laid out as Debian's genericcloud image (root = partition 1 at 64 MiB, BIOS boot
   partition 14, EFI system partition 15): ``mkfs.ext4 -d ROOT`` into a partition file, copied in place;
   the XFS variant (debian-13-xfs.qcow2) is the same tree on an XFS root: ``mkfs.xfs -p`` with a prototype
   file listing the tree (xfsprogs before 6.17 cannot copy a directory), the sticky bits the prototype
   format cannot express set afterwards with ``xfs_db -x``, checked with ``xfs_repair -n``;
4. GRUB (BIOS) installed without booting anything: the root's own ``grub-mkimage`` makes core.img
   (which finds /boot/grub by the filesystem UUID), its modules and a grub.cfg go into the
   filesystem, and boot.img and core.img are written into the protective MBR and the BIOS boot
   partition, exactly where ``grub-install`` puts them; core.img's filesystem module, grub.cfg's ``insmod``
   and fstab's entry follow the variant's root filesystem (FILESYSTEMS). The disk boots by itself, like any cloud
   image. (A boot under QEMU running grub-install cost 20-30 s under TCG.)
   UEFI: the ESP (FAT, ``mkfs.vfat`` + mtools, no mount) gets Debian's signed shim at the removable path
   EFI/BOOT/BOOTX64.EFI, the signed GRUB beside it, and EFI/debian/grub.cfg (the signed GRUB's prefix)
   handing over to /boot/grub/grub.cfg on the root, found by its UUID: the same menu for both firmwares.
5. ``qemu-img convert -O qcow2`` (uncompressed: it stays on this machine).

The result is cached: it is rebuilt only when missing, when its sha256 no longer matches the
recorded one, or when the recipe (package list, files, scripts, sizes) changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from image_factory import tools
from image_factory.console import console
from image_factory.errors import FactoryError
from image_factory.files import write_atomic
from image_factory.image.manifest import sha256_file
from image_factory.settings import Settings

SUITE = "trixie"
IMAGE_NAME = "debian-13-base.qcow2"
# The same system with the release suite's packages only, as the release's own cloud image: a build from it
# upgrades from the updates and security suites, a newer kernel included, and reboots into it (what every
# Fedora build does). The current image is what a vendor's refreshed cloud image is: a build from it applies
# only what the suites published since, and reboots only when that includes a kernel.
RELEASE_IMAGE_NAME = "debian-13-release.qcow2"
# The current image's tree on an XFS root (the builder image's base, and the offline XFS readers' real case).
XFS_IMAGE_NAME = "debian-13-xfs.qcow2"
RECIPE_NAME = "debian-13-base.recipe.json"
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

PACKAGES = (
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "grub-pc",
    # The UEFI path: Debian's signed shim and GRUB (so Secure Boot can be turned on later); their binaries
    # are copied onto the ESP, the packages keep them current for a clone's own grub-install.
    "shim-signed",
    "grub-efi-amd64-signed",
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "python3",
    # Debian's cloud images carry it (unattended-upgrades needs it); Ansible's apt module does too.
    "python3-apt",
    # debootstrap does not resolve virtual packages: python3-cryptography needs this provider.
    "python3-cffi-backend",
    "sudo",
    "iproute2",
    "ifupdown",
    "isc-dhcp-client",
    "netbase",
    "cloud-init",
    "qemu-guest-agent",
    "chrony",
    "e2fsprogs",
    # No xfsprogs: it pulls libicu (36 MB) into every variant. The XFS variant's root is checked here, and an
    # image built on it installs xfsprogs where it needs xfs_growfs (ansible/roles/builder).
    "ca-certificates",
)

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

# Written into the root before debootstrap, so its dpkg runs and initramfs builds see them.
# A VM's disk controllers only (MODULES=list): a 6 MB initramfs made in 2 s instead of 15 MB in
# 6 s (twice per debootstrap), and unpacked faster at every boot under TCG.
# ext4 is built into Debian's kernel, XFS is a module: listed so the XFS variant's initramfs can mount its root.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "sr_mod", "ahci", "ata_piix", "nvme",
                     "xfs")
DPKG_UNSAFE_IO = "etc/dpkg/dpkg.cfg.d/00-factory-build-unsafe-io"  # removed again after debootstrap
PRESEED_FILES: dict[str, str] = {
    DPKG_UNSAFE_IO: "# A failed build is thrown away, so no fsync per unpacked file.\nforce-unsafe-io\n",
    "etc/initramfs-tools/conf.d/factory": "MODULES=list\n",
    # Not /etc/initramfs-tools/modules: that is initramfs-tools' conffile, which dpkg would not replace.
    "usr/share/initramfs-tools/modules.d/factory-vm": "".join(f"{m}\n" for m in INITRAMFS_MODULES),
}

# Files written into the root, path -> content. Part of the recipe hash.
FILES: dict[str, str] = {
    "etc/hostname": "debian\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n",
    "etc/default/locale": "LANG=C.UTF-8\n",
    # cloud-init writes /etc/network/interfaces.d/50-cloud-init (from the seed, or its fallback:
    # DHCP on the first NIC whatever its name).
    "etc/network/interfaces": "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n",
    "etc/cloud/cloud.cfg.d/90-factory.cfg": (
        "# deevnet image factory base image\n"
        "datasource_list: [ NoCloud, None ]\n"
        "ssh_deletekeys: true\n"
        "ssh_genkeytypes: [ed25519, ecdsa]\n"
        "disable_root: true\n"
        "manage_etc_hosts: true\n"
        "system_info:\n"
        "  network:\n"
        "    renderers: ['eni']\n"
    ),
    # No RSA host key: generating one costs 3-15 s of every first boot under TCG.
    "etc/ssh/sshd_config.d/10-factory.conf": (
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        "HostKey /etc/ssh/ssh_host_ed25519_key\nHostKey /etc/ssh/ssh_host_ecdsa_key\n"
    ),
    # Host keys are made at first boot by cloud-init; if cloud-init is off, make them anyway
    # (`ssh-keygen -A` would add the RSA key too).
    "etc/systemd/system/ssh.service.d/10-hostkeys.conf": (
        "[Unit]\nAfter=cloud-init-network.service cloud-init.service\n\n[Service]\n"
        "ExecStartPre=/bin/sh -c 'for t in ed25519 ecdsa; do k=/etc/ssh/ssh_host_$${t}_key; "
        "[ -s $$k ] || ssh-keygen -q -t $$t -N \"\" -f $$k || exit 1; done'\n"
    ),
    "etc/systemd/journald.conf.d/10-factory.conf": "[Journal]\nSystemMaxUse=64M\nRuntimeMaxUse=32M\n",
    "etc/default/grub": (
        "GRUB_DEFAULT=0\n"
        "GRUB_TIMEOUT=1\n"
        "GRUB_DISTRIBUTOR=Debian\n"
        'GRUB_CMDLINE_LINUX_DEFAULT=""\n'
        'GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8"\n'
        'GRUB_TERMINAL="console serial"\n'
        # Exactly what the baseline role writes, so a build changes nothing here and skips update-grub.
        'GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"\n'
        "GRUB_DISABLE_OS_PROBER=true\n"
        # One entry per kernel: every kernel upgrade runs update-grub, slow under TCG.
        "GRUB_DISABLE_RECOVERY=true\n"
    ),
    # No translated descriptions: the fixture's apt runs under TCG, where every index parsed costs seconds.
    # gzip indexes: a third faster to unpack than xz there (the archive publishes both).
    "etc/apt/apt.conf.d/90factory": ('APT::Install-Recommends "false";\nAcquire::Languages "none";\n'
                                     'Acquire::CompressionTypes::Order:: "gz";\n'),
}

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


@dataclass(frozen=True)
class BasePaths:
    dir: Path
    image: Path
    sha256: Path
    recipe: Path
    debs: Path
    release_image: Path
    release_sha256: Path
    xfs_image: Path
    xfs_sha256: Path

    def variants(self) -> dict[str, tuple[Path, Path]]:
        """Every image the recipe makes: name -> (qcow2, its sha256sum file)."""
        return {IMAGE_NAME: (self.image, self.sha256), RELEASE_IMAGE_NAME: (self.release_image, self.release_sha256),
                XFS_IMAGE_NAME: (self.xfs_image, self.xfs_sha256)}


def base_paths(settings: Settings) -> BasePaths:
    d = settings.builds_dir / "base"
    return BasePaths(d, d / IMAGE_NAME, d / f"{IMAGE_NAME}.sha256", d / RECIPE_NAME, settings.cache_dir / "debs",
                     d / RELEASE_IMAGE_NAME, d / f"{RELEASE_IMAGE_NAME}.sha256",
                     d / XFS_IMAGE_NAME, d / f"{XFS_IMAGE_NAME}.sha256")


def recipe() -> dict[str, object]:
    return {
        "suite": SUITE,
        "variant": "minbase",
        "packages": sorted(PACKAGES),
        "preseed": PRESEED_FILES,
        "files": FILES,
        "grub": [GRUB_EARLY_CFG, list(GRUB_CORE_MODULES), GRUB_CFG],
        "filesystems": {name: [fs.fstab_entry, fs.grub_module, fs.recipe] for name, fs in FILESYSTEMS.items()},
        "efi": [GRUB_EFI_STUB_CFG, ESP_FILES, ESP_VOLUME_ID, ESP_LABEL],
        "layout": ["gpt", BIOS_BOOT_PART, ESP_PART, GPT_BACKUP_MIB],
        "mke2fs": MKE2FS_CONF,
        "disk_mib": DISK_SIZE_MIB,
        "part_start_mib": PART_START_MIB,
        "uuid": ROOT_FS_UUID,
        "cleanup": CLEANUP_VERSION,
        "variants": {name: [tree, fs] for name, (tree, fs) in VARIANTS.items()},
    }


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()


def read_sha256_file(path: Path, name: str = IMAGE_NAME) -> str | None:
    """The hex digest from a ``sha256sum`` line ("<hex>  <name>"), or None if absent/garbled."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    m = re.match(r"^([0-9a-f]{64}) [ *]" + re.escape(name) + r"\s*$", text)
    return m.group(1) if m else None


def cache_state(settings: Settings) -> str:
    """'ok', or why the base image must be (re)built."""
    variants = base_paths(settings).variants()
    if not all(image.is_file() for image, _ in variants.values()):
        return "missing"
    recorded = {name: read_sha256_file(checksum, name) for name, (_, checksum) in variants.items()}
    if None in recorded.values():
        return "checksum file missing or malformed"
    try:
        stamp = json.loads(base_paths(settings).recipe.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return "recipe stamp missing"
    if stamp.get("recipe_hash") != recipe_hash():
        return "recipe changed"
    if any(sha256_file(image) != recorded[name] for name, (image, _) in variants.items()):
        return "sha256 mismatch (corrupted)"
    return "ok"


def describe(settings: Settings) -> dict[str, object]:
    """The recipe stamp of the cached image (sha256, sizes, build figures), or {} if none."""
    try:
        data = json.loads(base_paths(settings).recipe.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def ensure_base_image(settings: Settings, force: bool = False, *, mirror: str | None = None) -> Path:
    """Return builds/base/debian-13-base.qcow2, building it only when missing, corrupted or stale."""
    p = base_paths(settings)
    state = "forced" if force else cache_state(settings)
    if state == "ok":
        console.print(f"base image up to date: {p.image}")
        return p.image
    console.print(f"building base image ({state}): {p.image}")
    _check_tools()
    mirror = _mirror(mirror)
    p.dir.mkdir(parents=True, exist_ok=True)
    p.debs.mkdir(parents=True, exist_ok=True)
    figures: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=p.dir))
    try:
        root = work / "root"
        t0 = time.monotonic()
        with _locked(p.debs / ".lock"):  # another clone may be filling the same cache
            _debootstrap(root, mirror, p.debs, work / "debootstrap.log")
        figures["debootstrap_s"] = round(time.monotonic() - t0, 1)
        release_root = work / "release-root"
        _unmount_below(root)
        _run(["cp", "-a", "-x", "--reflink=auto", str(root), str(release_root)], "copying the release tree")
        t0 = time.monotonic()
        _apply_updates(root, mirror, work / "updates.log")
        figures["updates_s"] = round(time.monotonic() - t0, 1)
        made: dict[str, tuple[Path, str]] = {}
        kernels: dict[str, str] = {}
        trees = {"current": root, "release": release_root}
        for name, (tree_name, fs_name) in VARIANTS.items():
            tree, fs = trees[tree_name], FILESYSTEMS[fs_name]
            kernels[name] = kernel_and_initrd(tree)[0].name.removeprefix("vmlinuz-")
            _configure(tree, mirror, fs)
            t0 = time.monotonic()
            core_img, boot_img = _prepare_grub(tree, fs)
            raw = work / "disk.raw"
            _make_disk(tree, work, raw, fs)
            _, bios_start, bios_size = BIOS_BOOT_PART
            embed_grub(raw, boot_img, core_img, (bios_start + bios_size) * 2048, core_sector=bios_start * 2048)
            _make_esp(tree, work, raw)
            fs.check(raw, work)
            figures[f"disk_s:{name}"] = round(time.monotonic() - t0, 1)
            t0 = time.monotonic()
            qcow = work / name
            # Not compressed: it never leaves this machine, and -c costs ~15 s here.
            _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], "qemu-img convert")
            raw.unlink()
            figures[f"convert_s:{name}"] = round(time.monotonic() - t0, 1)
            made[name] = (qcow, sha256_file(qcow))
        # Publish: stamp removed first, written last, so a crash in between means "rebuild".
        p.recipe.unlink(missing_ok=True)
        for name, (target, checksum) in p.variants().items():
            os.replace(made[name][0], target)
            write_atomic(checksum, f"{made[name][1]}  {name}\n")
        stamp = {
            "recipe_hash": recipe_hash(),
            "sha256": made[IMAGE_NAME][1],
            "release_sha256": made[RELEASE_IMAGE_NAME][1],
            "xfs_sha256": made[XFS_IMAGE_NAME][1],
            "kernels": kernels,
            "mirror": mirror,
            "size": p.image.stat().st_size,
            "virtual_size": DISK_SIZE_MIB * 1024 * 1024,
            "figures": figures,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_atomic(p.recipe, json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    finally:
        _unmount_below(work)  # never let rmtree walk into a mounted /proc or a bind-mounted /dev
        shutil.rmtree(work, ignore_errors=True)
    console.print(f"base image built: {p.image} ({p.image.stat().st_size // (1024 * 1024)} MiB) {figures}")
    return p.image


def fetch_packages(settings: Settings, *, mirror: str | None = None) -> bool:
    """Download the .deb files the base image needs into the shared cache, building nothing.

    Part of the machine set-up (``./dev setup``), like installing apt packages, so that the demo
    and the tests then make the base image from local files. Returns False when the cache already
    holds this package set from this mirror (a stamp file; no network, no debootstrap).
    """
    p = base_paths(settings)
    mirror = _mirror(mirror)
    want = hashlib.sha256(json.dumps({"suite": SUITE, "packages": sorted(PACKAGES), "mirror": mirror},
                                     sort_keys=True).encode()).hexdigest()  # fmt: skip
    stamp = p.debs / ".fetched"
    if stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == want:
        return False
    _check_tools()
    p.debs.mkdir(parents=True, exist_ok=True)
    with _locked(p.debs / ".lock"):
        target = Path(tempfile.mkdtemp(prefix="fetch-", dir=p.debs.parent))
        try:
            console.print(f"downloading the base image's packages from {mirror} into {p.debs} ...")
            _run(_debootstrap_cmd(target, mirror, p.debs, "--download-only"), "debootstrap --download-only")
        finally:
            shutil.rmtree(target, ignore_errors=True)
        write_atomic(stamp, want + "\n")
    return True


# ------------------------------------------------------------------------------------------ steps

# 3: the release variant and both kernels in the stamp; 4: hybrid GPT (BIOS + UEFI); 5: the XFS variant
CLEANUP_VERSION = 5


def _check_tools() -> None:
    need = ("debootstrap", "qemu-img", "sfdisk", "mkfs.ext4", "e2fsck", "mkfs.vfat", "mcopy", "fsck.vfat",
            "mkfs.xfs", "xfs_db", "xfs_repair")
    missing = [f"{tool} ({tools.get(tool).provider.short()})" for tool in need if tools.find(tool) is None]
    if missing:
        raise BaseImageError("base image: missing tools: " + ", ".join(missing))
    if os.geteuid() != 0:
        raise BaseImageError("base image: debootstrap needs root (run as root or under sudo)")


DEBIAN_SUITES = {"bullseye", "bookworm", "trixie", "forky", "duke", "sid", "oldstable", "stable", "testing",
                 "unstable"}


def _debian_suite(suites: str) -> bool:
    """Whether a sources entry is a Debian archive (any release: the fixture's need not be the host's)."""
    return any(s.split("-")[0] in DEBIAN_SUITES for s in suites.split())


def find_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian archive URI this machine uses for main (any suite; not the security archive): the
    fixture's suite need not be the machine's own release."""
    candidates: list[str] = []
    for f in sorted(sources.glob("sources.list.d/*.sources")):
        for stanza in f.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith("#"):
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
            if _debian_suite(fields.get("suites", "")) and "main" in fields.get("components", "").split():
                candidates += fields.get("uris", "").split()
    lists = [sources / "sources.list", *sorted(sources.glob("sources.list.d/*.list"))]
    for f in lists:
        if not f.is_file():
            continue
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = re.sub(r"\[[^]]*\]", "", line).split()
            if len(parts) >= 4 and parts[0] == "deb" and _debian_suite(parts[2]) and "main" in parts[3:]:
                candidates.append(parts[1])
    for uri in candidates:
        if "security" not in uri:
            return uri.rstrip("/")
    raise BaseImageError(
        f"base image: no Debian 'main' archive found in {sources}/sources.list*; "
        "set FACTORY_DEBIAN_MIRROR=http://<mirror>/debian"
    )


def security_mirror(mirror: str) -> str:
    """The security archive beside ``mirror`` (``.../debian`` -> ``.../debian-security``), or
    FACTORY_DEBIAN_SECURITY_MIRROR."""
    configured = os.environ.get("FACTORY_DEBIAN_SECURITY_MIRROR")
    if configured:
        return configured.rstrip("/")
    return f"{mirror.rstrip('/')}-security" if mirror.rstrip("/").endswith("/debian") else \
        "http://deb.debian.org/debian-security"


def _run(cmd: list[str], what: str, log: Path | None = None, timeout: float = 1800) -> None:
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


def _mirror(mirror: str | None) -> str:
    return mirror or os.environ.get("FACTORY_DEBIAN_MIRROR") or find_mirror()


def _debootstrap_cmd(target: Path, mirror: str, debs: Path, *extra: str) -> list[str]:
    return ["debootstrap", *extra, "--variant=minbase", f"--cache-dir={debs.resolve()}",
            "--include=" + ",".join(PACKAGES), SUITE, str(target), mirror]  # fmt: skip


def _write_files(root: Path, files: dict[str, str]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")


def _mounts_below(top: Path) -> list[Path]:
    """Mount points at or below ``top``, deepest first (/proc/self/mounts escapes blanks as octal)."""
    prefix = str(top.resolve())
    found = []
    for line in Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines():
        where = line.split()[1].encode().decode("unicode_escape")
        if where == prefix or where.startswith(prefix + "/"):
            found.append(Path(where))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _unmount_below(top: Path) -> None:
    """debootstrap unmounts the chroot's /proc on exit but ignores a failure (a busy mount stays): a copy of
    the tree, or its removal, would then walk the host's /proc."""
    for where in _mounts_below(top):
        _run(["umount", "-l", str(where)], f"unmounting {where}")


def _debootstrap(root: Path, mirror: str, debs: Path, log: Path) -> None:
    _write_files(root, PRESEED_FILES)
    console.print(f"debootstrap {SUITE} from {mirror} ...")
    _run(_debootstrap_cmd(root, mirror, debs), "debootstrap", log)
    (root / DPKG_UNSAFE_IO).unlink()


def _sources_list(root: Path, mirror: str) -> None:
    (root / "etc/apt/sources.list").write_text(
        f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n"
        f"deb {security_mirror(mirror)} {SUITE}-security main\n", encoding="utf-8"
    )


# The chroot's services must not start (a policy-rc.d that refuses every action, removed afterwards).
POLICY_RC_D = "usr/sbin/policy-rc.d"


def _apply_updates(root: Path, mirror: str, log: Path) -> None:
    """The updates and security suites applied in the chroot, at this machine's native speed, and the
    kernel they replaced purged: one kernel, as in a fresh install."""
    _sources_list(root, mirror)
    (root / POLICY_RC_D).write_text("#!/bin/sh\nexit 101\n", encoding="utf-8")
    (root / POLICY_RC_D).chmod(0o755)
    mounts = [(["mount", "-t", "proc", "proc"], root / "proc"), (["mount", "-t", "sysfs", "sysfs"], root / "sys"),
              (["mount", "--bind", "/dev"], root / "dev")]
    mounted: list[Path] = []
    apt = ["chroot", str(root), "env", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C.UTF-8", "apt-get", "-q", "-y",
           "-o", "Dpkg::Options::=--force-unsafe-io", "-o", "Dpkg::Options::=--force-confdef",
           "-o", "Dpkg::Options::=--force-confold"]  # fmt: skip
    try:
        for cmd, where in mounts:
            _run([*cmd, str(where)], f"mounting {where.name} in the chroot")
            mounted.append(where)
        console.print(f"applying {SUITE}-updates and {SUITE}-security ...")
        _run([*apt, "update"], "apt-get update in the chroot", log)
        _run([*apt, "dist-upgrade"], "apt-get dist-upgrade in the chroot", log)
        newest = kernel_and_initrd(root)[0].name.removeprefix("vmlinuz-")
        listed = subprocess.run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\\n",
                                 "linux-image-[0-9]*"], capture_output=True, text=True, check=False).stdout
        old = [line.split()[0] for line in listed.splitlines()
               if line.endswith(" installed") and line.split()[0] != f"linux-image-{newest}"]
        if old:
            _run([*apt, "purge", *old], "purging the replaced kernel", log)
    finally:
        for where in reversed(mounted):
            subprocess.run(["umount", "-l", str(where)], check=False)
        (root / POLICY_RC_D).unlink(missing_ok=True)


def _configure(root: Path, mirror: str, fs: RootFilesystem) -> None:
    _write_files(root, {**FILES, "etc/fstab": fstab(fs)})
    _sources_list(root, mirror)
    # Root password locked (also for `passwd -S`), no build user exists.
    shadow = root / "etc/shadow"
    lines = shadow.read_text(encoding="utf-8").splitlines()
    out = []
    for line in lines:
        f = line.split(":")
        if f[0] == "root":
            f[1] = "!*"
        out.append(":".join(f))
    shadow.write_text("\n".join(out) + "\n", encoding="utf-8")
    # Identity made at first boot: host keys (cloud-init), machine-id (systemd).
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("", encoding="utf-8")
    (root / "boot/efi").mkdir(parents=True, exist_ok=True)  # the ESP's mount point (fstab)
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    # No caches, no logs, no state from the build.
    for d in ("var/cache/apt/archives", "var/lib/apt/lists", "var/lib/cloud", "tmp", "var/tmp"):
        target = root / d
        if target.is_dir():
            for child in target.iterdir():
                if child.name in ("partial", "lock"):
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    for log in (root / "var/log").rglob("*"):
        if log.is_file():
            log.write_bytes(b"")
    (root / "root/.bash_history").unlink(missing_ok=True)


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


def _make_disk(root: Path, work: Path, raw: Path, fs: RootFilesystem) -> None:
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


def _make_esp(root: Path, work: Path, raw: Path) -> None:
    """The EFI system partition: a FAT filesystem with shim at the removable path and GRUB's stub config."""
    esp = work / "esp.img"
    _, start, size = ESP_PART
    with esp.open("wb") as fh:
        fh.truncate(size * 1024 * 1024)
    _run(["mkfs.vfat", "-i", ESP_VOLUME_ID, "-n", ESP_LABEL, str(esp)], "mkfs.vfat (ESP)")
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
    _run(["fsck.vfat", "-n", str(esp)], "fsck.vfat (ESP)")
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
    from debian.debian_support import Version

    kernels = sorted((root / "boot").glob("vmlinuz-*"), key=lambda k: Version(k.name.removeprefix("vmlinuz-")))
    if not kernels:
        raise BaseImageError(f"base image: no kernel in {root}/boot (linux-image-cloud-amd64 missing?)")
    k = kernels[-1]
    initrd = root / "boot" / ("initrd.img-" + k.name.removeprefix("vmlinuz-"))
    if not initrd.is_file():
        raise BaseImageError(f"base image: {initrd} missing (initramfs-tools did not run)")
    return k, initrd


def _prepare_grub(root: Path, fs: RootFilesystem) -> tuple[bytes, bytes]:
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
        _run(["chroot", str(root), "grub-mkimage", "-O", "i386-pc", "-d", "/usr/lib/grub/i386-pc",
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
    _run(["qemu-img", "convert", "-O", "raw", "--image-opts",
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
# Each image the recipe makes: name -> (tree, root filesystem). "current": release + updates + security, one
# kernel; "release": the release suite only. The XFS image is the current tree again, so no second debootstrap.
VARIANTS: dict[str, tuple[str, str]] = {
    IMAGE_NAME: ("current", "ext4"),
    RELEASE_IMAGE_NAME: ("release", "ext4"),
    XFS_IMAGE_NAME: ("current", "xfs"),
}


def fstab(fs: RootFilesystem) -> str:
    return f"UUID={ROOT_FS_UUID} / {fs.fstab_entry}\nUUID={ESP_FS_UUID} /boot/efi vfat defaults,umask=0077,nofail 0 2\n"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


__all__ = [
    "ensure_base_image", "fetch_packages", "describe", "base_paths", "cache_state", "recipe_hash", "find_mirror",
    "BaseImageError",
]
