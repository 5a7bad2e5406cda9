"""Faults injected into the lab or its twin for preflight's lab tests (each undone after its test)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakepve.certs import make_cert

from image_factory.lab import sshd
from image_factory.lab.config import playbook_grants
from image_factory.lab.pve import LabPve, NodeSpec
from image_factory.lab.pytest_plugin import LabHandle
from image_factory.settings import REPO_ROOT

from .lab_nodes import Served, Twin, root_session, with_hv


@pytest.fixture
def rekeyed(fresh_lab: LabHandle, tmp_path: Path) -> Iterator[str]:
    """pve-tenant got a new SSH host key (reinstalled): its sshd now offers a key the inventory does not pin."""
    key = sshd.host_key_path(fresh_lab.paths, "pve-tenant")
    saved = {p: p.read_bytes() for p in (key, key.with_suffix(".pub"))}
    fresh = tmp_path / "new_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "root@pve-tenant", "-f", str(fresh)],
                   check=True)
    key.write_bytes(fresh.read_bytes())  # sshd loads its host key for every new connection
    key.with_suffix(".pub").write_bytes(fresh.with_suffix(".pub").read_bytes())
    try:
        yield fresh.with_suffix(".pub").read_text()
    finally:
        for path, data in saved.items():
            path.write_bytes(data)


@pytest.fixture
def import_disabled(fresh_lab: LabHandle) -> Iterator[str]:
    """An administrator disabled `import` content on pve-mgmt's `local` (pvesm set local --content ...)."""
    s, base = root_session(fresh_lab, "pve-mgmt")
    original = s.get(f"{base}/storage/local", timeout=20).json()["data"]["content"]
    without = ",".join(c for c in original.split(",") if c != "import")
    s.put(f"{base}/storage/local", data={"content": without}, timeout=20).raise_for_status()
    try:
        yield without
    finally:
        s.put(f"{base}/storage/local", data={"content": original}, timeout=20).raise_for_status()


@pytest.fixture
def twin(lab: LabHandle, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Twin]:
    """pve-tenant's API served by an in-process LabPve built from the lab's own node spec (indirect
    parametrisation picks another pve-manager release)."""
    host = "pve-tenant"
    spec = NodeSpec.from_mapping(json.loads((lab.paths.host_dir(host) / "pve.json").read_text()))
    version = getattr(request, "param", spec.version)
    if version != spec.version:  # the grants the playbook gives on that release's major
        storages = [path.split("/")[2] for path in spec.privileges if path.startswith("/storage/")]
        spec = dataclasses.replace(spec, version=version, privileges=playbook_grants(
            REPO_ROOT, version, spec.node, storages))
    cert, key, _ = make_cert(str(tmp_path), name="twin", hosts=("127.0.0.1",))
    root_pw = tmp_path / "root-password"
    root_pw.write_text("twin-root\n")
    spec = dataclasses.replace(
        spec, address="127.0.0.1", port=0, cert=Path(cert), key=Path(key), root_password_file=root_pw,
        storage_dir=tmp_path / "storage", staging_dir=tmp_path / "var-tmp", vms_dir=tmp_path / "vms",
        log_dir=tmp_path / "log", control_socket=tmp_path / "control.sock", time_scale=0.0,
    )
    served = Served(LabPve(spec), cert, key)
    try:
        site = with_hv(lab.site, host, api_url=f"https://127.0.0.1:{served.pve.port}", tls_ca_file=Path(cert),
                       tls_fingerprint=None)
        settings = dataclasses.replace(lab.settings, builds_dir=tmp_path / "builds")
        yield Twin(served.pve, settings, site, host)
    finally:
        served.stop()


@pytest.fixture
def small_fs(tmp_path: Path, small_tmpfs: Any) -> Path:
    """A 64 MiB filesystem (tmpfs), 56 MiB of it used: a nearly full disk."""
    mnt = small_tmpfs(tmp_path / "small", 64)
    (mnt / "filler").write_bytes(b"\0" * (56 << 20))
    return mnt

