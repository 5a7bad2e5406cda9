"""Install media: Proxmox's ISO, verified against the SHA256SUMS Proxmox publishes, prepared for automated
installation with Proxmox's own proxmox-auto-install-assistant (prepare-iso).

The assistant's command line (pve-installer 8.4.6 and 9.1.7, proxmox-auto-install-assistant/src/main.rs,
CommandPrepareISO): ``prepare-iso [--output F] --fetch-from iso|http|partition [--answer-file F] [--url U]
[--cert-fingerprint FP] [--partition-label L] [--on-first-boot F] <INPUT>``; it needs xorriso.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import requests

from image_factory import tools
from image_factory.errors import FactoryError, bad_flag
from image_factory.image.manifest import sha256_file

ASSISTANT = "proxmox-auto-install-assistant"
FetchFrom = Literal["iso", "http", "partition"]
FETCH_MODES: tuple[FetchFrom, ...] = ("iso", "http", "partition")
PARTITION_LABEL = "proxmox-ais"  # utils.rs default_partition_label
SUMS_LINE_RE = re.compile(r"^([0-9a-fA-F]{64})\s+\*?(\S.*)$")
FINGERPRINT_RE = re.compile(r"^([0-9A-F]{2}:){31}[0-9A-F]{2}$")
INSTALL_HINT = tools.missing_message(ASSISTANT) + ". xorriso is what the assistant uses to write the ISO."
SUMS_TIMEOUT = 30.0


class MediaError(FactoryError):
    """The ISO cannot be prepared."""


class IsoNotVerified(MediaError):
    """The ISO is not the one Proxmox's sums list: a check refused (exit 3, as a bad signature)."""

    exit_code = 3


@dataclass(frozen=True)
class MediaPlan:
    iso: Path
    output: Path
    fetch_from: FetchFrom
    first_boot_hook: Path
    answer_file: Path | None = None
    url: str | None = None
    cert_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.fetch_from not in FETCH_MODES:
            raise bad_flag("--fetch-from", f"one of {', '.join(FETCH_MODES)} (got {self.fetch_from!r})")
        if self.fetch_from == "iso" and self.answer_file is None:
            raise bad_flag("--hypervisor", "--fetch-from iso embeds one hypervisor's answer: name the hypervisor")
        if self.fetch_from == "http":
            if not self.url or urlsplit(self.url).scheme != "https":
                raise bad_flag("--url", "--fetch-from http needs the answer server's https:// URL")
            if not self.cert_fingerprint or not FINGERPRINT_RE.match(self.cert_fingerprint):
                raise bad_flag("--cert-fingerprint", "--fetch-from http needs the answer server's certificate "
                               "fingerprint (32 colon-separated hex bytes, as invoke host.answer-server prints it)")


def prepare_command(assistant: str, plan: MediaPlan, output: Path) -> list[str]:
    command = [assistant, "prepare-iso", "--output", str(output), "--fetch-from", plan.fetch_from]
    if plan.fetch_from == "iso":
        command += ["--answer-file", str(plan.answer_file)]
    elif plan.fetch_from == "http":
        command += ["--url", str(plan.url), "--cert-fingerprint", str(plan.cert_fingerprint)]
    else:
        command += ["--partition-label", PARTITION_LABEL]
    return [*command, "--on-first-boot", str(plan.first_boot_hook), str(plan.iso)]


def find_assistant() -> str:
    found = shutil.which(ASSISTANT)
    if found is None:
        raise MediaError(INSTALL_HINT)
    return found


# ------------------------------------------------------------------------------------- verification


def parse_sums(text: str) -> dict[str, str]:
    """``sha256sum`` lines: file name -> lowercase hex digest."""
    sums = {}
    for line in text.splitlines():
        m = SUMS_LINE_RE.match(line.strip())
        if m:
            sums[Path(m.group(2).strip()).name] = m.group(1).lower()
    return sums


def read_sums(source: str, get: Callable[[str], str] | None = None) -> str:
    """The SHA256SUMS text from a local file or an https:// URL (TLS verified; plain http refused)."""
    scheme = urlsplit(source).scheme
    if scheme == "https":
        return (get or _https_get)(source)
    if scheme:
        raise bad_flag("--sums", f"{source}: only https:// URLs or a local file (a checksum over plain {scheme} "
                       "proves nothing)")
    try:
        return Path(source).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise MediaError(f"--sums {source}: cannot read it: {exc.strerror}") from None


def _https_get(url: str) -> str:
    try:
        response = requests.get(url, timeout=SUMS_TIMEOUT)
        response.raise_for_status()
    except requests.RequestException as exc:
        raise MediaError(f"--sums {url}: {exc}") from None
    return response.text


def verify_iso(iso: Path, sums_text: str, sums_source: str) -> str:
    """The ISO's SHA-256, when it is the one the sums list for its file name; MediaError otherwise."""
    if not iso.is_file():
        raise MediaError(f"--iso {iso}: no such file")
    listed = parse_sums(sums_text).get(iso.name)
    if listed is None:
        raise IsoNotVerified(f"{sums_source} lists no {iso.name} (keep Proxmox's file name, e.g. proxmox-ve_9.1-1.iso)")
    actual = sha256_file(iso)
    if actual != listed:
        raise IsoNotVerified(f"{iso} has SHA-256 {actual}, but {sums_source} lists {listed}: a damaged or different "
                         "download; not preparing it")
    return actual


# ------------------------------------------------------------------------------------------- prepare


def prepare(plan: MediaPlan, sums_text: str, sums_source: str, *, assistant: str | None = None,
            run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> Path:
    """Verify, then prepare into a temporary name beside the output and rename it into place: a failure leaves
    no half-written ISO."""
    assistant = assistant or find_assistant()
    verify_iso(plan.iso, sums_text, sums_source)
    plan.output.parent.mkdir(parents=True, exist_ok=True)
    partial = plan.output.with_name(f".{plan.output.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        result = run(prepare_command(assistant, plan, partial), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-10:])
            raise MediaError(f"{ASSISTANT} prepare-iso failed (exit {result.returncode}):\n{tail}")
        if not partial.is_file():
            raise MediaError(f"{ASSISTANT} prepare-iso exited 0 but wrote no {partial}")
        os.replace(partial, plan.output)
    finally:
        partial.unlink(missing_ok=True)
    return plan.output
