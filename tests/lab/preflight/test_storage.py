"""preflight's storage and space checks against the lab and its twin (a real nearly full filesystem)."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_factory import preflight as pf
from image_factory.image import manifest as mf
from image_factory.lab import factories
from image_factory.lab.pytest_plugin import LabHandle

from .lab_nodes import Twin, assert_failure, lab_snapshot, recorder, with_hv

pytestmark = pytest.mark.lab


def test_import_content_disabled(fresh_lab: LabHandle, import_disabled: str):
    before = lab_snapshot(fresh_lab)
    sent, factory = recorder()
    report = pf.run_preflight(fresh_lab.settings, fresh_lab.site, client_factory=factory)
    assert_failure(report, "pve-mgmt", "storage", "storage 'local' lacks content type import",
                   hint=f"pvesm set local --content {import_disabled},import")
    assert report.result("pve-tenant", "storage").ok
    assert set(sent) == {"GET"}
    assert lab_snapshot(fresh_lab) == before


def test_storage_nearly_full(twin: Twin, small_fs: Path):
    """The node's `local` storage, its upload staging dir and import dir all live on a nearly full disk."""
    for sub in ("vz/import", "var-tmp"):
        (small_fs / sub).mkdir(parents=True)
    twin.pve.storages["local"]["path"] = str(small_fs / "vz")  # PVE reports the filesystem under the path
    storage = twin.site.hypervisors[twin.host].storage.model_copy(
        update={"import_dir": str(small_fs / "vz" / "import"), "staging_dir": str(small_fs / "var-tmp")})
    site = with_hv(twin.site, twin.host, storage=storage)
    mf.save(twin.settings.builds_dir / "debian-lab",
            factories.manifest(build_id="b7", virtual_size=2 << 30, disk_size=20 << 20))
    before = twin.state()
    report = pf.run_preflight(twin.settings, site, [twin.host], checks=pf.PUBLISH_CHECKS)
    assert_failure(
        report, twin.host, "space", "import storage 'local' has ",
        " free, the largest artifact needs 20.0 MiB (artifact of debian-lab (build b7))",
        f"filesystem {small_fs} on pve-tenant (holding {small_fs / 'vz' / 'import'}) has ",
        "free, ssh uploads need 20.0 MiB there",
        hint="on storage local of pve-tenant",
    )
    assert twin.writes() == [] and twin.state() == before
    # 34 MiB free: one copy fits (SSH uploads write import/ only), an API upload's two copies do not
    with (small_fs / "filler").open("r+b") as fh:
        fh.truncate(30 << 20)
    twin.pve.storages["local"]["path"] = str(small_fs / "vz")
    assert pf.run_preflight(twin.settings, site, [twin.host], checks=["space"]).result(twin.host, "space").ok
    api = pf.run_preflight(twin.settings, site, [twin.host], checks=["space"], transport="api")
    assert_failure(
        api, twin.host, "space",
        f"filesystem {small_fs} on pve-tenant (holding {small_fs / 'vz' / 'import'} and {small_fs / 'var-tmp'})",
        "api uploads need 2 x 20.0 MiB there", "the API stages the upload and then copies it, both at once",
        hint="or publish with --transport ssh (one copy fewer)",
    )
    assert twin.writes() == [] and twin.state() == before
    assert sorted(p.name for p in small_fs.rglob("*")) == ["filler", "import", "var-tmp", "vz"]  # nothing written


def test_space_counts_the_images_storage(twin: Twin, small_fs: Path):
    """The template's disk is converted from the upload: on a `dir` images storage that is the import storage it
    lands beside the upload (one more copy on that filesystem); on LVM-thin it takes the pool's data space."""
    for sub in ("vz/import", "vz/images", "var-tmp"):
        (small_fs / sub).mkdir(parents=True)
    with (small_fs / "filler").open("r+b") as fh:
        fh.truncate(30 << 20)  # 34 MiB free: one 20 MiB copy fits, two do not
    twin.pve.storages["local"]["path"] = str(small_fs / "vz")
    mf.save(twin.settings.builds_dir / "debian-lab",
            factories.manifest(build_id="b8", virtual_size=2 << 30, disk_size=20 << 20))
    hv = twin.site.hypervisors[twin.host]
    paths = {"import_dir": str(small_fs / "vz" / "import"), "staging_dir": str(small_fs / "var-tmp")}
    thin = with_hv(twin.site, twin.host, storage=hv.storage.model_copy(update=paths))
    assert pf.run_preflight(twin.settings, thin, [twin.host], checks=["space"]).result(twin.host, "space").ok
    twin.pve.storages["local-lvm"]["pool_size"] = 16 << 20  # a 16 MiB pool holding nothing yet
    assert_failure(pf.run_preflight(twin.settings, thin, [twin.host], checks=["space"]), twin.host, "space",
                   "images storage 'local-lvm' (lvmthin pool) has 16.0 MiB free, the template's disk needs 20.0 MiB",
                   hint="free at least 4.0 MiB on storage local-lvm")
    on_dir = with_hv(twin.site, twin.host, storage=hv.storage.model_copy(
        update={**paths, "images": "local", "cloudinit": "local"}))
    assert_failure(pf.run_preflight(twin.settings, on_dir, [twin.host], checks=["space"]), twin.host, "space",
                   f"(holding {small_fs / 'vz' / 'import'} and {small_fs / 'vz' / 'images'})",
                   "ssh uploads need 2 x 20.0 MiB there",
                   "the template's disk is converted into images/ beside the upload", hint="free at least")
    assert twin.writes() == []

