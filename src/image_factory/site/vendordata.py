"""cloud-init vendor data from the site repository: read, bounded and checked when the inventory is loaded."""

from __future__ import annotations

import functools
import hashlib
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationInfo

from image_factory import tools

# cloud-init vendor data reaches the guest through PVE, which reads a snippet with a 1 MiB limit
# (qemu-server Cloudinit.pm read_cloudinit_snippets_file).
MAX_SNIPPET = 1024 * 1024


@functools.lru_cache(maxsize=64)
def cloud_config_problem(text: str) -> str:
    """Why ``text`` is no valid cloud-config ("" if it is): cloud-init's own ``cloud-init schema`` where it is
    installed, else the shape cloud-init requires (a ``#cloud-config`` first line and a YAML mapping)."""
    if not text.startswith("#cloud-config"):
        return "vendor data must start with a '#cloud-config' line (the only format the factory hands on)"
    try:
        body = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return f"is not YAML: {str(exc).splitlines()[0]}"
    if not isinstance(body, dict):
        return "is not a YAML mapping of cloud-config keys"
    tool = tools.find("cloud-init")
    if tool is None:
        return ""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as tmp:
        tmp.write(text)
        tmp.flush()
        done = subprocess.run([tool, "schema", "--config-file", tmp.name], capture_output=True, text=True,
                              timeout=120, check=False)
    if done.returncode != 0:
        detail = " ".join((done.stderr or done.stdout).replace(tmp.name, "<file>").split())  # one line
        return f"cloud-init schema refuses it: {detail[-600:]}"
    return ""


@dataclass(frozen=True)
class VendorData:
    """A cloud-init vendor-data file from the site repository, read and checked when the inventory is loaded.

    On the hypervisor it is stored under a name made from its content, so a changed file is a changed
    ``cicustom`` (drift) and a snippet another VM still uses is never overwritten."""

    file: str
    sha256: str
    text: str = field(repr=False)

    @property
    def snippet_name(self) -> str:
        return f"factory-vendor-{self.sha256[:16]}.yaml"

    def volume(self, storage: str) -> str:
        return f"{storage}:snippets/{self.snippet_name}"


VENDOR_FILE_RE = re.compile(r"^[A-Za-z0-9_./-]+$")


def read_vendor_data(v: Any, info: ValidationInfo) -> Any:
    """``vendor_data: <path>`` relative to the directory that holds the inventory (load_site's context)."""
    if v is None or isinstance(v, VendorData):
        return v
    if not isinstance(v, str) or not VENDOR_FILE_RE.match(v) or v.startswith("/") or ".." in v.split("/"):
        raise ValueError(f"{v!r} must be a relative path inside the site repository (letters, digits, '_', '.', "
                         "'-', '/'; no '..')")
    base = Path((info.context or {}).get("site_dir", "."))
    path = base / v
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SNIPPET:
        raise ValueError(f"{path} is {len(data)} bytes; PVE reads at most {MAX_SNIPPET} of a snippet")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    problem = cloud_config_problem(text)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return VendorData(v, hashlib.sha256(data).hexdigest(), text)
