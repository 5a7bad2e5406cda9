"""QEMU helpers shared by the base-image build and the image tests: accelerator choice, ports.

KVM is used only when it is detected working: /dev/kvm must be usable AND a probe VM must still be
running after a moment (on some nested hypervisors /dev/kvm exists but qemu aborts at vCPU setup
with "failed to set MSR"). Everything else runs under TCG.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time

from .errors import FactoryError

ACCELERATORS = ("auto", "kvm", "tcg")


class QemuError(FactoryError):
    pass


def require_qemu() -> str:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        raise QemuError("qemu-system-x86_64 not found: apt-get install qemu-system-x86 qemu-utils")
    return exe


@functools.lru_cache(maxsize=1)
def kvm_works(probe_seconds: float = 3.0) -> bool:
    """True if a KVM guest starts here (cached for the process)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which("qemu-system-x86_64") is None:
        return False
    cmd = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "64", "-nographic",
           "-nodefaults", "-monitor", "none", "-serial", "none", "-net", "none"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + probe_seconds
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            time.sleep(0.1)
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def resolve_accelerator(accelerator: str) -> str:
    if accelerator not in ACCELERATORS:
        raise QemuError(f"accelerator {accelerator!r} unknown: use one of {', '.join(ACCELERATORS)}")
    if accelerator == "auto":
        return "kvm" if kvm_works() else "tcg"
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
