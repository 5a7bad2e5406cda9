"""The factory inside an image (catalogue ``factory: true``): its wheel built from this checkout, its hashed
lock, and the lock's files for the image's Python, handed to the build VM, which installs them with
--no-index."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from packaging.markers import Marker  # ansible-core depends on packaging: always installed with it

from image_factory import families
from image_factory.image import render
from image_factory.image.buildevents import BuildError
from image_factory.settings import Settings
from image_factory.site.inventory import Image

# The platform tags of Debian 13's glibc (2.41) and older that wheels are published for: pip download matches
# --platform exactly, it does not expand a manylinux tag to the older ones.
GUEST_WHEEL_PLATFORMS = ("manylinux1", "manylinux2010", "manylinux2014",
                         *(f"manylinux_2_{minor}" for minor in (17, 24, 27, 28, 31, 34, 35, 36, 38, 39, 40, 41)))


def guest_wheelhouse(settings: Settings, image: Image, dest: Path) -> None:
    """Every file of the hashed lock for the image's Python, downloaded here (pip checks each hash): the build VM
    installs from it with --no-index. It cannot reach PyPI itself wherever TLS is inspected on the way out (a CA
    this machine trusts, the guest does not), and installing from local files is the cheaper half under TCG
    anyway. The files are cached per lock and Python in the factory's cache directory."""
    python = families.get(image.family).target_python(image.release)
    if python is None:
        raise BuildError(f"{image.name}: factory: true needs the image's Python version, and the {image.family} "
                         f"family does not know release {image.release}'s")
    lock = guest_lock(settings.root / render.FACTORY_LOCK, python, dest.parent / "guest-requirements.txt")
    tag = f"{python[0]}{python[1]}"
    cache = settings.cache_dir / "wheelhouse" / f"{hashlib.sha256(lock.read_bytes()).hexdigest()[:16]}-cp{tag}"
    try:
        _download_wheelhouse(lock, python, cache)
    finally:
        lock.unlink(missing_ok=True)
    with tarfile.open(dest, "w") as tar:  # one file, one transfer (the files are compressed already)
        for path in sorted(cache.iterdir()):
            tar.add(path, arcname=path.name)


def guest_lock(lock: Path, python: tuple[int, int], out: Path) -> Path:
    """The lock's entries whose environment markers hold on the guest (Linux x86_64, CPython ``python``), the
    markers dropped: pip download evaluates them against this machine's Python, whatever --python-version says
    (it took ansible-core 2.19 for a 3.13 guest whose lock entry is 2.21)."""
    guest = {"python_version": f"{python[0]}.{python[1]}", "python_full_version": f"{python[0]}.{python[1]}.0",
             "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
             "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    kept: list[str] = []
    for entry in re.split(r"\n(?=[^\s#])", lock.read_text(encoding="utf-8")):
        head, _, rest = entry.partition("\n")
        requirement, _, marker = head.partition(";")
        if entry.startswith("#") or not requirement.strip():
            continue
        if marker.strip() and not Marker(marker.strip().rstrip("\\").strip()).evaluate(guest):
            continue
        kept.append(f"{requirement.strip()} \\\n{rest}" if marker.strip() else entry)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return out


def _download_wheelhouse(lock: Path, python: tuple[int, int], cache: Path) -> None:
    tag = f"{python[0]}{python[1]}"
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps", "--prefer-binary",
           "--require-hashes", "--python-version", f"{python[0]}.{python[1]}", "--implementation", "cp",
           "--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none",
           *(arg for platform in GUEST_WHEEL_PLATFORMS for arg in ("--platform", f"{platform}_x86_64")),
           "-r", str(lock), "-d", str(cache)]  # fmt: skip
    try:
        done = subprocess.run(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True,
                              timeout=1200)
    except subprocess.TimeoutExpired:
        raise BuildError("downloading the factory's locked dependencies timed out after 1200 s") from None
    if done.returncode != 0:
        raise BuildError(f"downloading the factory's locked dependencies ({lock}) failed: "
                         f"{(done.stderr or done.stdout).strip()[-1500:]}")


def factory_bundle(settings: Settings, image: Image, bundle: Path, work: Path) -> None:
    """The factory's wheel (built from a copy of its sources, so the checkout gets no build/ or egg-info), its
    hashed lock and the lock's files for the image's Python (wheelhouse.tar), for a playbook that installs the
    factory (catalogue: factory: true)."""
    sources = work / "factory-src"
    for path in render.factory_sources(settings):
        target = sources / path.relative_to(settings.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    bundle.mkdir(mode=0o700, parents=True, exist_ok=True)
    quiet = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "-w", str(bundle), str(sources)]  # fmt: skip
    try:
        done = subprocess.run(cmd, env=quiet, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise BuildError("building the factory's wheel timed out after 600 s") from None
    if done.returncode != 0:
        raise BuildError(f"building the factory's wheel failed: {(done.stderr or done.stdout).strip()[-1500:]}")
    wheels = sorted(bundle.glob("deevnet_image_factory-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"building the factory's wheel left {len(wheels)} wheels in {bundle}")
    shutil.copy2(settings.root / render.FACTORY_LOCK, bundle / "requirements.txt")
    shutil.rmtree(sources, ignore_errors=True)
    guest_wheelhouse(settings, image, bundle / "wheelhouse.tar")
