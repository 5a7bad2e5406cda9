"""QEMU helpers shared by the base-image build and the image tests: accelerator choice, ports.

KVM is used only when it is detected working (``detect_accelerator``: the host's kernel must boot
under it); everything else runs under TCG.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Literal

from image_factory import tools
from image_factory.errors import FactoryError

ACCELERATORS = ("auto", "kvm", "tcg")


# What a guest kernel prints on its console when it dies; under TCG it can die in its own code patching (an
# int3 that another vCPU met mid-patch: a race in QEMU's multi-threaded TCG), so every boot watches for it.
KERNEL_PANIC = "Kernel panic - not syncing"


def console_panicked(serial_log: Path) -> bool:
    try:
        return KERNEL_PANIC in serial_log.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return False


class QemuError(FactoryError):
    pass


def require_qemu() -> str:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        raise QemuError(tools.missing_message("qemu-system-x86_64"))
    return exe


def _probe_kernel() -> Path | None:
    boot = Path("/boot")
    kernels = sorted(boot.glob("vmlinuz-*")) if boot.is_dir() else []
    return kernels[-1] if kernels else None


@functools.lru_cache(maxsize=1)
def detect_accelerator() -> Literal["kvm", "tcg"]:
    """KVM only when it is proven to run a stock kernel; TCG otherwise (one probe for builds, image tests
    and the lab alike, cached for the process).

    /dev/kvm being openable is not enough (nested hypervisors expose one on which guests hang or
    QEMU aborts at vCPU setup), nor is ``-machine none``: the probe boots the host's own kernel
    under ``-accel kvm -cpu host`` and waits for it to reach the point of mounting a root file
    system. Without a kernel to probe with, the answer is TCG.
    """
    qemu = shutil.which("qemu-system-x86_64")
    kernel = _probe_kernel()
    if not (qemu and kernel and os.access("/dev/kvm", os.R_OK | os.W_OK)):
        return "tcg"
    cmd = [qemu, "-accel", "kvm", "-cpu", "host", "-m", "256", "-nographic", "-nodefaults",
           "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
           "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent rootwait=0"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=40, stdin=subprocess.DEVNULL)
        out = proc.stdout
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    return "kvm" if ("VFS: " in out or "Kernel panic" in out or "Waiting for root device" in out) else "tcg"


def resolve_accelerator(accelerator: str) -> str:
    if accelerator not in ACCELERATORS:
        raise QemuError(f"accelerator {accelerator!r} unknown: use one of {', '.join(ACCELERATORS)}")
    if accelerator == "auto":
        return detect_accelerator()
    return accelerator


def accel_args(accelerator: str) -> list[str]:
    """qemu arguments for the accelerator setting ('auto' detects)."""
    if resolve_accelerator(accelerator) == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (small race; callers retry on bind failure)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_seed_iso(directory: Path, files: dict[str, str]) -> Path:
    """A NoCloud seed (an ISO labelled ``cidata`` holding meta-data, user-data, network-config) in directory:
    the one seed builder of the image tests and the lab's cloud-init drives."""
    src = directory / "seed"
    src.mkdir()
    for name, text in files.items():
        (src / name).write_text(text, encoding="utf-8")
    iso = directory / "seed.iso"
    if shutil.which("xorriso"):
        cmd = ["xorriso", "-as", "mkisofs"]
    elif shutil.which("genisoimage"):
        cmd = ["genisoimage"]
    else:
        raise QemuError(f"neither xorriso nor genisoimage found: {tools.provided_by('xorriso')}")
    cmd += ["-quiet", "-output", str(iso), "-volid", "cidata", "-joliet", "-rock", str(src)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise QemuError(f"seed ISO: {cmd[0]} failed: {proc.stdout.decode(errors='replace')[-1000:]}")
    return iso
