"""A delta publish against the two-host lab (real sshd running the shipped host scripts, LabPve importing the
rebuilt file with qemu-img): v1 published in full, v2 (5% of its clusters changed) sent as a delta and rebuilt on
each host, and a host whose base was corrupted falling back to the full image."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from image_factory.image import manifest as mf
from image_factory.image.builddir import BuildDir
from image_factory.image.delta import guest_sha256, published_base
from image_factory.lab import factories
from image_factory.lab.pytest_plugin import LabHandle
from image_factory.publish import publish_image
from image_factory.pve.client import PveClient
from image_factory.settings import Settings
from image_factory.site.inventory import Site

pytestmark = pytest.mark.lab
IMAGE = "debian-lab"
MIB = 1024 * 1024
CLUSTER = 64 * 1024
DISK = 256 * MIB


def build(builds: Path, raw: bytes, build_id: str) -> mf.Manifest:
    """A build of ``raw`` as the guest's disk (a qcow2 with every cluster allocated) and its tested manifest."""
    d = builds / IMAGE
    d.mkdir(parents=True, exist_ok=True)
    art = factories.qcow2_of(raw, d / "debian-lab.qcow2")
    m = factories.manifest_of(art, IMAGE, build_id=build_id, tested=True,
                              fingerprint=hashlib.sha256(build_id.encode()).hexdigest(),
                              git={"commit": "abc123", "dirty": False}, finished_at="2026-12-06T19:00:00Z")
    m.artifact.path = art.name
    mf.save(d, m)
    return m


def template_disk(lab: LabHandle, host: str, vmid: int) -> tuple[Path, str]:
    """The file behind a template's scsi0: on the lab host's directory storage, or its LVM-thin pool's raw file."""
    volid = str(PveClient(lab.hv(host)).vm_config(vmid)["scsi0"]).split(",")[0]
    sid, name = volid.split(":", 1)
    if sid == "local-lvm":
        return lab.paths.storage_dir(host).parents[2] / "dev" / "pve" / name, "raw"
    assert sid == "local", volid
    path = lab.paths.storage_dir(host) / "images" / name.split("/")[-2] / name.split("/")[-1]
    return path, path.suffix.lstrip(".")


@pytest.fixture
def env(fresh_lab: LabHandle, tmp_path: Path) -> tuple[LabHandle, Settings, Site]:
    settings = dataclasses.replace(fresh_lab.settings, builds_dir=tmp_path / "builds")
    return fresh_lab, settings, fresh_lab.site


def test_v2_is_sent_as_a_delta_and_a_corrupted_base_falls_back_to_the_full_image(env: Any) -> None:
    lab, settings, site = env
    good, corrupted = list(lab.hypervisors)[:2]
    v1 = os.urandom(DISK)
    m1 = build(settings.builds_dir, v1, "b1")
    first = publish_image(settings, site, IMAGE, hypervisors=[good, corrupted], progress=False)
    assert first.ok, first.to_dict()
    assert {h.upload for h in first.hosts} == {"uploaded"}
    kept = published_base(BuildDir.of(settings, IMAGE))
    assert kept is not None and kept.sha256 == m1.artifact.sha256  # the next night's base, kept locally

    # The base on one host rots (a bit flip in its data, the size unchanged): that host cannot rebuild v2.
    base_on_host = lab.paths.import_dir(corrupted) / "debian-lab-b1.qcow2"
    with base_on_host.open("r+b") as fh:
        fh.seek(base_on_host.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))

    v2 = factories.clusters_changed(v1, 0.05, 2)
    m2 = build(settings.builds_dir, v2, "b2")
    full_asked = publish_image(settings, site, IMAGE, hypervisors=[good, corrupted], progress=False, dry_run=True,
                               delta=False)  # --full
    assert {h.plan["upload"] for h in full_asked.hosts} == {"upload"}
    second = publish_image(settings, site, IMAGE, hypervisors=[good, corrupted], progress=False)
    assert second.ok, second.to_dict()
    delta, full = second.host(good), second.host(corrupted)
    assert delta.plan["upload"] == full.plan["upload"] == "delta"  # both hold the base's import file
    assert delta.upload == "delta" and delta.plan["delta_base"] == "debian-lab-b1.qcow2"
    # The bytes on the wire: the delta (5% of the clusters plus qcow2's tables), far below the 256 MiB image.
    assert delta.bytes_sent == delta.plan["delta_bytes"]
    assert 0.04 * DISK < delta.bytes_sent < 0.08 * DISK, delta.bytes_sent
    assert full.upload == "uploaded" and full.bytes_sent == delta.bytes_sent + m2.artifact.disk_size
    assert any("guest view does not match" in n and "sent the full image" in n for n in full.notes), full.notes

    want = hashlib.sha256(v2).hexdigest()
    assert mf.require(settings.builds_dir / IMAGE).guest_sha256 == want
    for host, result in ((good, delta), (corrupted, full)):
        assert result.action == "created" and result.template_vmid is not None
        assert guest_sha256(*template_disk(lab, host, result.template_vmid)) == want
        left = sorted(p.name for p in lab.paths.import_dir(host).iterdir() if "debian-lab" in p.name)
        assert left == ["debian-lab-b1.qcow2", "debian-lab-b2.qcow2"], left  # no delta, rebuild or raw left
    assert mf.sha256_file(lab.paths.import_dir(good) / "debian-lab-b1.qcow2") == m1.artifact.sha256  # untouched

    again = publish_image(settings, site, IMAGE, hypervisors=[good, corrupted], progress=False)
    assert {h.action for h in again.hosts} == {"unchanged"} and again.bytes_sent == 0
