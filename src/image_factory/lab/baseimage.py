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
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from image_factory import tools
from image_factory.console import console
from image_factory.files import write_atomic
from image_factory.image.manifest import sha256_file
from image_factory.lab.basedisk import (
    BIOS_BOOT_PART,
    DISK_SIZE_MIB,
    ESP_FILES,
    ESP_LABEL,
    ESP_PART,
    ESP_VOLUME_ID,
    FILESYSTEMS,
    GPT_BACKUP_MIB,
    GRUB_CFG,
    GRUB_CORE_MODULES,
    GRUB_EARLY_CFG,
    GRUB_EFI_STUB_CFG,
    MKE2FS_CONF,
    PART_START_MIB,
    ROOT_FS_UUID,
    BaseImageError,
    RootFilesystem,
    embed_grub,
    fstab,
    kernel_and_initrd,
    make_disk,
    make_esp,
    prepare_grub,
    run_step,
)
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
        run_step(["cp", "-a", "-x", "--reflink=auto", str(root), str(release_root)], "copying the release tree")
        t0 = time.monotonic()
        _apply_updates(root, mirror, work / "updates.log")
        figures["updates_s"] = round(time.monotonic() - t0, 1)
        made: dict[str, tuple[Path, str]] = {}
        kernels: dict[str, str] = {}
        trees = {"current": root, "release": release_root}
        for name, (tree_name, fs_name) in VARIANTS.items():
            kernels[name] = kernel_and_initrd(trees[tree_name])[0].name.removeprefix("vmlinuz-")
            made[name] = _make_variant(name, trees[tree_name], FILESYSTEMS[fs_name], work, mirror, figures)
        _publish(p, made, kernels, mirror, figures)
    finally:
        _unmount_below(work)  # never let rmtree walk into a mounted /proc or a bind-mounted /dev
        shutil.rmtree(work, ignore_errors=True)
    console.print(f"base image built: {p.image} ({p.image.stat().st_size // (1024 * 1024)} MiB) {figures}")
    return p.image


def _make_variant(name: str, tree: Path, fs: RootFilesystem, work: Path, mirror: str,
                  figures: dict[str, float]) -> tuple[Path, str]:
    """One image of the recipe from its tree: configured, on a disk with GRUB and an ESP, checked, as qcow2
    (its path in ``work`` and its sha256)."""
    _configure(tree, mirror, fs)
    t0 = time.monotonic()
    core_img, boot_img = prepare_grub(tree, fs)
    raw = work / "disk.raw"
    make_disk(tree, work, raw, fs)
    _, bios_start, bios_size = BIOS_BOOT_PART
    embed_grub(raw, boot_img, core_img, (bios_start + bios_size) * 2048, core_sector=bios_start * 2048)
    make_esp(tree, work, raw)
    fs.check(raw, work)
    figures[f"disk_s:{name}"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    qcow = work / name
    # Not compressed: it never leaves this machine, and -c costs ~15 s here.
    run_step(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], "qemu-img convert")
    raw.unlink()
    figures[f"convert_s:{name}"] = round(time.monotonic() - t0, 1)
    return qcow, sha256_file(qcow)


def _publish(p: BasePaths, made: dict[str, tuple[Path, str]], kernels: dict[str, str], mirror: str,
             figures: dict[str, float]) -> None:
    """The images into builds/base: the stamp removed first and written last, so a crash in between means
    "rebuild"."""
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
            run_step(_debootstrap_cmd(target, mirror, p.debs, "--download-only"), "debootstrap --download-only")
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
        run_step(["umount", "-l", str(where)], f"unmounting {where}")


def _debootstrap(root: Path, mirror: str, debs: Path, log: Path) -> None:
    _write_files(root, PRESEED_FILES)
    console.print(f"debootstrap {SUITE} from {mirror} ...")
    run_step(_debootstrap_cmd(root, mirror, debs), "debootstrap", log)
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
            run_step([*cmd, str(where)], f"mounting {where.name} in the chroot")
            mounted.append(where)
        console.print(f"applying {SUITE}-updates and {SUITE}-security ...")
        run_step([*apt, "update"], "apt-get update in the chroot", log)
        run_step([*apt, "dist-upgrade"], "apt-get dist-upgrade in the chroot", log)
        newest = kernel_and_initrd(root)[0].name.removeprefix("vmlinuz-")
        listed = subprocess.run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\\n",
                                 "linux-image-[0-9]*"], capture_output=True, text=True, check=False).stdout
        old = [line.split()[0] for line in listed.splitlines()
               if line.endswith(" installed") and line.split()[0] != f"linux-image-{newest}"]
        if old:
            run_step([*apt, "purge", *old], "purging the replaced kernel", log)
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


# Each image the recipe makes: name -> (tree, root filesystem). "current": release + updates + security, one
# kernel; "release": the release suite only. The XFS image is the current tree again, so no second debootstrap.
VARIANTS: dict[str, tuple[str, str]] = {
    IMAGE_NAME: ("current", "ext4"),
    RELEASE_IMAGE_NAME: ("release", "ext4"),
    XFS_IMAGE_NAME: ("current", "xfs"),
}



@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


__all__ = [
    "ensure_base_image", "fetch_packages", "describe", "base_paths", "cache_state", "recipe_hash", "find_mirror",
    "BaseImageError",
]
