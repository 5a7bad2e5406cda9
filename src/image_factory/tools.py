"""Every external program (and file, and Python package) the factory runs: one registry.

Each entry says how the product finds the thing, how its version is read, what provides it on each
distribution (Debian's apt, Fedora's dnf, this project's Python extras, HashiCorp's repository), which
targets need it (required or optional) and the minimum version the product relies on. ``invoke doctor`` reports
from this table and every "X is not installed" message is made from it (:func:`missing_message`), so the two
can never disagree.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

# What each target is: the tasks whose tools it names. `doctor` with no --target checks NIGHTLY.
TARGETS: dict[str, str] = {
    "build": "build.image, build.fedora, build.render and the image test after a build (image.test)",
    "publish": "publish.template: upload to each hypervisor over SSH and its API",
    "deploy": "deploy.*, tenant.export, mac.export: VMs over the API, hand-offs to OpenTofu and DHCP servers",
    "lab": "the built-in two-host lab (lab.*, ./dev demo): sshd, fakepve, the base image",
    "host": "host.media: Proxmox VE install media",
    "test": "the factory's own test suite (./dev test, CI): the lab's and the builder's tools and the DHCP validators",
}
NIGHTLY = ("build", "publish")  # what a nightly build runner runs: pipeline = build, image test, publish
ALL = "all"

# (OVMF code, variable store template) as each distribution's package installs them, first found wins.
OVMF_LOCATIONS: tuple[tuple[str, str], ...] = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),  # Debian, Ubuntu: ovmf
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),  # Fedora: edk2-ovmf
    ("/usr/share/edk2/x64/OVMF_CODE.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),  # Arch: edk2-ovmf
)

Version = tuple[int, ...]


@dataclass(frozen=True)
class Provider:
    """What installs a tool. ``extra``: "core" (a dependency of the factory itself) or the extra's name."""

    apt: str = ""
    dnf: str = ""
    python: str = ""
    extra: str = ""
    debian: str = "Debian"  # where the apt package is found, when not every Debian has it
    fedora: str = "Fedora"
    note: str = ""
    short_note: str = ""  # the note in a table cell (default: the note, where nothing else provides the tool)

    def short(self) -> str:
        """For a table: the package names only."""
        parts = [f"apt {self.apt}"] if self.apt else []
        parts += [f"dnf {self.dnf}"] if self.dnf else []
        if self.python:
            parts.append(f"pip {self.python} ({'core' if self.extra == 'core' else f'[{self.extra}] extra'})")
        note = self.short_note or ("" if parts else self.note)
        return ", ".join(parts) + (f"; {note}" if parts and note else note)

    def text(self) -> str:
        parts = []
        if self.python and self.extra == "core":
            parts.append(f"{self.python}, a dependency of the factory itself: pip install deevnet-image-factory "
                         "(a checkout: ./dev setup)")
        elif self.python:
            profile = " build" if self.extra == "build" else ""  # requirements/dev.txt holds every other extra
            parts.append(f"{self.python}, in the [{self.extra}] extra: pip install "
                         f"'deevnet-image-factory[{self.extra}]' (a checkout: ./dev setup{profile})")
        system = [f"apt-get install {self.apt} ({self.debian})"] if self.apt else []
        system += [f"dnf install {self.dnf} ({self.fedora})"] if self.dnf else []
        if system:
            parts.append(" or ".join(system))
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)

    def as_dict(self) -> dict[str, str]:
        return {"apt": self.apt, "dnf": self.dnf, "python": self.python, "extra": self.extra, "note": self.note}


@dataclass(frozen=True)
class Need:
    required: bool
    why: str


def required(why: str) -> Need:
    return Need(True, why)


def optional(why: str) -> Need:
    return Need(False, why)


@dataclass(frozen=True)
class Tool:
    """``find``: a key of FINDERS; ``names``: the commands (alternatives, first found wins) or files it looks for;
    ``version``: the arguments that print the version, or ``("dist", NAME)`` for a Python distribution, or ()."""

    name: str
    label: str
    find: str
    provider: Provider
    needs: Mapping[str, Need]
    names: tuple[str, ...] = ()
    version: tuple[str, ...] = ("--version",)
    minimum: Version | None = None
    # (from this version on, what it means for the factory): the newest that applies is shown
    notes: tuple[tuple[Version, str], ...] = ()

    @property
    def candidates(self) -> tuple[str, ...]:
        return self.names or (self.name,)


_HASHICORP = ("./dev setup installs it, from the distribution or HashiCorp's signed repository (Debian 13 and Fedora "
              "ship no packer; docs/install.md), or https://developer.hashicorp.com/packer/install")
_QEMU = Provider(apt="qemu-system-x86", dnf="qemu-system-x86")
_OPENSSH = Provider(apt="openssh-client", dnf="openssh-clients")
_OFFLINE = "the image test's offline checks of an artifact whose root filesystem is {}"

REGISTRY: tuple[Tool, ...] = (
    Tool("packer", "Packer >= 1.7 (Debian 12's 1.6.6 works too)", "path",
         Provider(apt="packer", dnf="packer", debian="Debian 12; Debian 13 from HashiCorp's apt repository",
                  fedora="from HashiCorp's rpm repository", note=_HASHICORP,
                  short_note="Debian 13 and Fedora: HashiCorp's repository (./dev setup adds it)"),
         {"build": required("builds every image"), "test": required("the render, build and nightly tests")},
         version=("version",), minimum=(1, 6, 6),
         notes=(((1, 6, 6), "plugins built in: no packer init"),
                ((1, 7, 0), "packer init installs the pinned qemu and ansible plugins (GitHub, once)"),
                ((1, 10, 0), "bundles no plugin: packer init runs before every validate and build"))),
    Tool("qemu-system-x86_64", "QEMU", "path", _QEMU,
         {"build": required("Packer's qemu builder and the image test boot it"),
          "lab": required("the lab's VMs"), "test": required("the image and lab tests")}),
    Tool("qemu-img", "qemu-img", "path", Provider(apt="qemu-utils", dnf="qemu-img"),
         {"build": required("Packer's disk and the artifact checks"), "lab": required("the lab's disks"),
          "test": required("the build and lab tests")}),
    Tool("xorriso", "xorriso (or genisoimage)", "path", Provider(apt="xorriso", dnf="xorriso"),
         {"build": required("the NoCloud seed CD of the image test (and of UEFI cloud builds on Packer 1.6)"),
          "lab": required("the lab VMs' cloud-init seed"), "test": required("the image and lab tests")},
         names=("xorriso", "genisoimage")),
    Tool("ovmf", "OVMF (UEFI firmware for QEMU)", "files", Provider(apt="ovmf", dnf="edk2-ovmf"),
         {"build": optional("images with firmware: uefi"), "test": required("the UEFI build and image tests")},
         names=tuple(code for code, _ in OVMF_LOCATIONS), version=()),
    Tool("swtpm", "swtpm (software TPM)", "path", Provider(apt="swtpm", dnf="swtpm"),
         {"build": optional("images with tpm: true: the TPM 2.0 of the build and image-test VMs"),
          "test": required("the vTPM fixture's build and image test (debian-lab-uefi)")}),
    Tool("virt-firmware", "virt-firmware", "python", Provider(python="virt-firmware", extra="build"),
         {"build": optional("images with secure_boot: true: enrols the key set into OVMF's variable store"),
          "test": required("the Secure Boot fixture and the key-set tests")},
         version=("dist", "virt-firmware")),
    Tool("ansible-playbook", "Ansible", "venv", Provider(python="ansible-core", extra="core"),
         {"build": required("the baseline playbook, through Packer's ansible provisioner"),
          "test": required("the build and collection tests")},
         version=("dist", "ansible-core")),
    Tool("ansible-lint", "ansible-lint", "venv", Provider(python="ansible-lint", extra="build"),
         {"build": required("validates the playbook before a build"), "test": required("the validator tests")},
         version=("dist", "ansible-lint")),
    Tool("ksvalidator", "ksvalidator", "venv", Provider(python="pykickstart", extra="build"),
         {"build": required("validates Fedora kickstarts"), "test": required("the validator tests")},
         version=("dist", "pykickstart")),
    Tool("mitogen", "mitogen", "python", Provider(python="mitogen", extra="build"),
         {"build": optional("speeds the Ansible provisioner up under TCG (factory.ansible_strategy)")},
         version=("dist", "mitogen")),
    Tool("openssl", "OpenSSL", "path", Provider(apt="openssl", dnf="openssl"),
         {"build": required("the kickstart's password hash"), "test": required("the render tests")},
         version=("version",)),
    Tool("ssh-keygen", "OpenSSH ssh-keygen", "path", _OPENSSH,
         {"build": required("the per-build SSH key"), "test": required("the build and image tests")}, version=()),
    Tool("ssh", "OpenSSH ssh", "path", _OPENSSH,
         {"publish": optional("the fast upload engine (without it: the exec engine over paramiko)"),
          "test": required("the upload engine tests")}, version=("-V",)),
    Tool("git", "git", "path", Provider(apt="git", dnf="git"),
         {"build": optional("records the factory's commit in the manifest")}),
    Tool("debugfs", "debugfs", "path", Provider(apt="e2fsprogs", dnf="e2fsprogs"),
         {"build": optional(_OFFLINE.format("ext2/3/4")), "test": required("the offline checks' tests")},
         version=("-V",)),
    Tool("xfs_db", "xfs_db", "path", Provider(apt="xfsprogs", dnf="xfsprogs"),
         {"build": optional(_OFFLINE.format("XFS")), "lab": required("lab.base-image: the XFS variant"),
          "test": required("the offline checks' tests")},
         version=("-V",)),
    Tool("btrfs", "btrfs", "path", Provider(apt="btrfs-progs", dnf="btrfs-progs"),
         {"build": optional(_OFFLINE.format("btrfs")), "test": required("the offline checks' tests")}),
    Tool("tofu", "OpenTofu", "path",
         Provider(note="OpenTofu's own packages (https://opentofu.org/docs/intro/install/); Terraform works too",
                  short_note="OpenTofu's packages (or Terraform)"),
         {"deploy": optional("applies what tenant.export writes (the factory writes it, never runs it)")},
         names=("tofu", "terraform"), version=("version",)),
    Tool("kea-dhcp4", "Kea DHCPv4", "path", Provider(apt="kea-dhcp4-server", dnf="kea"),
         {"deploy": optional("checks mac.export --format kea (kea-dhcp4 -t)"),
          "test": required("the Kea export is checked by Kea itself")}, version=("-v",)),
    Tool("kea-dhcp6", "Kea DHCPv6", "path", Provider(apt="kea-dhcp6-server", dnf="kea"),
         {"deploy": optional("checks mac.export --format kea6 (kea-dhcp6 -t)"),
          "test": required("the Kea DHCPv6 export is checked by Kea itself")}, version=("-v",)),
    Tool("cloud-init", "cloud-init", "venv",
         Provider(apt="cloud-init", dnf="cloud-init",
                  note="./dev setup unpacks that package into the venv without installing it (installed, cloud-init "
                       "also runs at the machine's boot: install it on a runner only, never on a hypervisor)",
                  short_note="./dev setup unpacks it into the venv (installed, it runs at boot)"),
         {"deploy": optional("cloud-init schema checks a VM's vendor_data (without it: its shape only)"),
          "test": required("the vendor_data test: cloud-init's own schema check refuses a bad one")},
         version=("--version",)),
    Tool("dnsmasq", "dnsmasq", "path", Provider(apt="dnsmasq-base", dnf="dnsmasq"),
         {"deploy": optional("checks mac.export --format dnsmasq (dnsmasq --test)"),
          "test": required("the dnsmasq export is checked by dnsmasq itself")}),
    Tool("sshd", "OpenSSH sshd", "files", Provider(apt="openssh-server", dnf="openssh-server"),
         {"lab": required("one sshd per lab hypervisor"), "test": required("the lab tests")},
         names=("/usr/sbin/sshd",), version=("-V",)),
    Tool("fakepve", "fakepve", "python", Provider(python="fakepve", extra="lab"),
         {"lab": required("the lab hypervisors' API"), "test": required("the lab tests")},
         version=("dist", "fakepve")),
    Tool("debootstrap", "debootstrap", "path", Provider(apt="debootstrap", dnf="debootstrap"),
         {"lab": required("lab.base-image (as root)"), "test": required("the lab base image")}),
    *(Tool(name, name, "path", Provider(apt=apt, dnf=dnf), {"lab": required("lab.base-image: the disk and its ESP"),
                                                            "test": required("the lab base image")}, version=())
      for name, apt, dnf in (("sfdisk", "fdisk", "util-linux"), ("mkfs.ext4", "e2fsprogs", "e2fsprogs"),
                             ("e2fsck", "e2fsprogs", "e2fsprogs"), ("mkfs.vfat", "dosfstools", "dosfstools"),
                             ("fsck.vfat", "dosfstools", "dosfstools"), ("mcopy", "mtools", "mtools"),
                             ("mkfs.xfs", "xfsprogs", "xfsprogs"), ("xfs_repair", "xfsprogs", "xfsprogs"))),
    Tool("proxmox-auto-install-assistant", "Proxmox's auto-install assistant", "path",
         Provider(note="Proxmox's package of that name, in the Proxmox VE repositories: on a Proxmox VE host "
                       "`apt install proxmox-auto-install-assistant xorriso`; on Debian 12/13 add the Proxmox VE "
                       "no-subscription repository and its key first "
                       "(https://pve.proxmox.com/wiki/Package_Repositories)",
                  short_note="apt proxmox-auto-install-assistant, from the Proxmox VE repository"),
         {"host": required("host.media prepares the installer ISO with it")}),
)
TOOLS: dict[str, Tool] = {t.name: t for t in REGISTRY}


def get(name: str) -> Tool:
    return TOOLS[name]


def provided_by(name: str) -> str:
    tool = TOOLS.get(name)
    return tool.provider.text() if tool else "its package"


def missing_message(name: str) -> str:
    """The one wording of a missing tool: what it is and what provides it."""
    tool = TOOLS.get(name)
    label = f"{tool.label}: " if tool and tool.label not in (name, tool.name) else ""
    return f"{name} is not installed (or not on PATH): it comes with {label}{provided_by(name)}"


# ------------------------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class Probe:
    """What this machine has: where the tool was found (None: missing), its version and the raw version text."""

    tool: str
    found: str | None
    version: Version | None = None
    version_text: str = ""


VERSION_RE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> Version | None:
    m = VERSION_RE.search(text)
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


def venv_bin() -> Path:
    return Path(sys.executable).parent


def _on_path(tool: Tool) -> str | None:
    return next((p for n in tool.candidates if (p := shutil.which(n))), None)


def _venv_then_path(tool: Tool) -> str | None:
    """As render.require_tool finds it: this venv's bin first, then PATH."""
    local = next((venv_bin() / n for n in tool.candidates if (venv_bin() / n).exists()), None)
    return str(local) if local else _on_path(tool)


def _files(tool: Tool) -> str | None:
    return next((n for n in tool.candidates if Path(n).is_file()), None)


def _python(tool: Tool) -> str | None:
    try:
        importlib.metadata.version(tool.version[1] if tool.version[:1] == ("dist",) else tool.name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return f"python: {sys.executable}"


FINDERS: dict[str, Callable[[Tool], str | None]] = {
    "path": _on_path, "venv": _venv_then_path, "files": _files, "python": _python,
}


def find(name: str) -> str | None:
    tool = TOOLS[name]
    return FINDERS[tool.find](tool)


def _version_text(tool: Tool, found: str) -> str:
    if not tool.version:
        return ""
    if tool.version[0] == "dist":
        try:
            return importlib.metadata.version(tool.version[1])
        except importlib.metadata.PackageNotFoundError:
            return ""
    try:
        proc = subprocess.run([found, *tool.version], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    out = (proc.stdout + "\n" + proc.stderr).strip()
    return next((line.strip() for line in out.splitlines() if VERSION_RE.search(line)), "")


def probe(name: str) -> Probe:
    tool = TOOLS[name]
    found = FINDERS[tool.find](tool)
    if found is None:
        return Probe(name, None)
    text = _version_text(tool, found)
    return Probe(name, found, parse_version(text), text[:120])


def probe_all(names: list[str]) -> dict[str, Probe]:
    return {name: probe(name) for name in names}


# ------------------------------------------------------------------ cloud-init, unpacked, never installed

# cloud-init's own `cloud-init schema` checks vendor data (site.vendordata), but an installed cloud-init runs at
# every boot of the machine. So ./dev setup takes the distribution's package, unpacks its Python tree into the
# venv (CLOUD_INIT_TREE) and writes a launcher into the venv's bin, where the "venv" finder looks first. Its
# Python dependencies (PyYAML, Jinja2, jsonschema, requests, configobj, jsonpatch) are in the dev extra's lock.
CLOUD_INIT_TREE = "cloud-init"  # under the venv
CLOUD_INIT_LAUNCHER = """#!{python}
# cloud-init from {package}, unpacked by ./dev setup and never installed (no boot services):
# the factory runs its `cloud-init schema` (image_factory.site.vendordata).
import sys
sys.path.insert(0, {tree!r})
from cloudinit.cmd.main import main
sys.exit(main())
"""


class UnpackError(Exception):
    """The package could not be fetched or unpacked: what failed and its own words."""


def _run_step(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UnpackError(f"{what}: {exc}") from None
    if done.returncode != 0:
        raise UnpackError(f"{what} failed: {(done.stderr or done.stdout).strip()[-400:]}")


def _fetch_and_extract(manager: str, work: Path) -> Path:
    """The package downloaded by the distribution's own client into ``work`` and extracted under work/root."""
    root = work / "root"
    root.mkdir()
    if manager == "apt":
        _run_step(["apt-get", "download", "-q", "cloud-init"], work, "apt-get download cloud-init")
        [package] = work.glob("cloud-init_*.deb")
        _run_step(["dpkg-deb", "-x", str(package), str(root)], work, f"dpkg-deb -x {package.name}")
    elif manager == "dnf":
        _run_step(["dnf", "download", "-q", "--destdir", str(work), "cloud-init"], work, "dnf download cloud-init")
        [package] = work.glob("cloud-init-*.rpm")
        _run_step(["sh", "-c", 'rpm2cpio "$1" | cpio -idm --quiet', "sh", str(package)], root,
                  f"rpm2cpio {package.name} | cpio")
    else:
        raise UnpackError(f"unknown package manager {manager!r} (apt or dnf)")
    return package


def unpack_cloud_init(manager: str, venv: Path | None = None) -> str:
    """cloud-init's package unpacked into ``venv`` (default: this one) with a launcher in its bin; what was done.
    A no-op where a cloud-init is already found; a failure leaves no half-made tree or launcher."""
    venv = venv or Path(sys.prefix)
    with open(venv / ".cloud-init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two set-ups of one venv at once: the second finds the first's work
        return _unpack_cloud_init(manager, venv)


def _unpack_cloud_init(manager: str, venv: Path) -> str:
    launcher, tree = venv / "bin" / "cloud-init", venv / CLOUD_INIT_TREE
    if launcher.exists() and (tree / "cloudinit").is_dir():
        return f"cloud-init already unpacked: {launcher}"
    if shutil.which("cloud-init"):
        return f"cloud-init is installed: {shutil.which('cloud-init')}"
    with tempfile.TemporaryDirectory(dir=venv) as tmp:
        work = Path(tmp)
        package = _fetch_and_extract(manager, work)
        found = sorted(work.glob("root/usr/lib/python3*/*-packages/cloudinit/__init__.py"))
        if not found:
            raise UnpackError(f"{package.name} holds no cloudinit Python package")
        staged = work / "tree"
        staged.mkdir()
        found[0].parent.rename(staged / "cloudinit")
        script = work / "cloud-init"
        script.write_text(CLOUD_INIT_LAUNCHER.format(python=venv / "bin" / "python", package=package.name,
                                                     tree=str(tree)))
        script.chmod(0o755)
        shutil.rmtree(tree, ignore_errors=True)
        staged.rename(tree)
        script.rename(launcher)  # last: the launcher exists only with its tree
    return f"cloud-init unpacked from {package.name}: {launcher}"


def main(argv: list[str]) -> int:
    """``python -m image_factory.tools unpack-cloud-init apt|dnf`` (./dev setup)."""
    if len(argv) != 2 or argv[0] != "unpack-cloud-init":
        print("usage: python -m image_factory.tools unpack-cloud-init apt|dnf", file=sys.stderr)
        return 2
    try:
        print(f">> {unpack_cloud_init(argv[1])}")
    except UnpackError as exc:
        print(f"!! cloud-init's package: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
