"""End to end, the nightly against an upstream that moves: a signed apt repository on loopback that the test
controls (image_factory.lab.aptrepo), added to the build VM as an extra, build-only repository, with one
package installed from it. Four nights through the real pipeline (packer under TCG, testinfra, publish to
both lab hosts):

1. first night: builds, tests, publishes a template to each host;
2. nothing changed: a cache hit that starts no packer process and sends 0 bytes;
3. the repository publishes a new version of the package: rebuilt (the repository's epoch moved), a new
   template on each host, and the report's package changes are exactly that package's version change;
4. the repository is re-signed with nothing else changed: rebuilt (its epoch moved) but the build installed
   what the newest template holds, so no host gets a new template.

The builds start from the debian-lab build (already current with Debian's suites), so they apply no kernel
update and need no reboot: three TCG builds of about 1.5 minutes each.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from image_factory.image import build, contents
from image_factory.image.manifest import require
from image_factory.lab.aptrepo import AptRepo
from image_factory.lab.baseimage import ensure_base_image
from image_factory.lab.pytest_plugin import LabHandle, running_lab
from image_factory.pipeline import run_pipeline
from image_factory.pve import templates
from image_factory.pve.client import PveClient
from image_factory.settings import Settings
from image_factory.site.inventory import load_site

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

IMAGE = "debian-nightly"
PACKAGE = "factory-canary"


@pytest.fixture(scope="module")
def nightly_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    ensure_base_image(Settings.from_mapping({}))
    with running_lab(tmp_path_factory.mktemp("nightly-lab")) as handle:
        yield handle


@pytest.fixture
def canary_repo(tmp_path: Path) -> Iterator[AptRepo]:
    repo = AptRepo(tmp_path, suite="canary")
    repo.publish({PACKAGE: "1.0"})
    repo.serve()
    try:
        yield repo
    finally:
        repo.close()


def _nightly_settings(lab: LabHandle, repo: AptRepo, tmp_path: Path) -> Settings:
    """The lab's settings with a catalogue that adds the nightly image, built from the debian-lab build."""
    base = lab.settings
    debian_lab = load_site(base.inventory, base.images).images["debian-lab"]
    source = build.build_image(base, debian_lab)  # a cache hit when an earlier test built it
    assert source.manifest is not None
    catalogue = yaml.safe_load(base.images.read_text(encoding="utf-8"))
    catalogue["images"][IMAGE] = {
        "family": "debian", "release": 13, "mode": "cloud", "eol": "2030-06-30",
        "source": {"url": str(source.build_dir / source.manifest.artifact.path),
                   "checksum": f"sha256:{source.manifest.artifact.sha256}"},
        "disk_size": "2G", "memory": 1024, "compress": False, "updates": True,
        "repositories": [{
            "kind": "debian", "uri": repo.url, "suite": repo.suite,
            "key": str(repo.write_public_key(tmp_path / "canary.asc")), "fingerprint": repo.fingerprint,
            "packages": [PACKAGE], "build_only": True,
        }],
        "test_suites": ["common", "updates"],
    }
    images = tmp_path / "images.yml"
    images.write_text(yaml.safe_dump(catalogue, sort_keys=False), encoding="utf-8")
    return dataclasses.replace(base, images=images, builds_dir=tmp_path / "builds")


@pytest.fixture
def packer_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `packer` first on PATH that records each invocation, then runs the real one."""
    real = shutil.which("packer")
    assert real is not None, "packer is not installed: run ./dev setup"
    log = tmp_path / "packer-invocations.log"
    log.write_text("")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "packer").write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    (bindir / "packer").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def _templates(settings: Settings, site: Any) -> dict[str, list[int]]:
    return {hv.name: sorted(t.vmid for t in templates.find_templates(PveClient(hv), IMAGE))
            for hv in site.hypervisors.values()}


def _installed(build_dir: Path) -> dict[str, str]:
    recorded = contents.load_packages(build_dir)
    assert recorded is not None and recorded[0] == require(build_dir).build_id
    return {p.name: p.version for p in recorded[1]}


def _night(settings: Settings, packer_calls: Path) -> tuple[dict[str, Any], list[str]]:
    packer_calls.write_text("")
    site = load_site(settings.inventory, settings.images)
    report = run_pipeline(settings, site, [IMAGE], progress=False)
    (run,) = report.images
    assert report.ok, f"{run.stage}: {run.error}"
    builds = [line for line in packer_calls.read_text().splitlines() if line.startswith("build ")]
    return dataclasses.asdict(run), builds


def test_four_nights_against_a_repository_the_test_controls(
        nightly_lab: LabHandle, canary_repo: AptRepo, tmp_path: Path, packer_calls: Path) -> None:
    settings = _nightly_settings(nightly_lab, canary_repo, tmp_path)
    site = load_site(settings.inventory, settings.images)
    hosts = {hv.name for hv in site.hypervisors.values()}
    build_dir = settings.builds_dir / IMAGE

    # Night 1: built from the debian-lab build with the canary installed from the loopback repository.
    first, builds = _night(settings, packer_calls)
    assert first["build"]["status"] == "built" and len(builds) == 1
    assert {h["host"]: h["action"] for h in first["publish"]["hosts"]} == dict.fromkeys(hosts, "created")
    assert _installed(build_dir)[PACKAGE] == "1.0"
    after_first = _templates(settings, site)
    assert all(len(vmids) == 1 for vmids in after_first.values())

    # Night 2: nothing moved: no packer process, nothing sent, nothing new.
    second, builds = _night(settings, packer_calls)
    assert second["build"]["status"] == "cached" and builds == []
    assert sum(h["bytes_sent"] for h in second["publish"]["hosts"]) == 0
    assert {h["host"]: h["action"] for h in second["publish"]["hosts"]} == dict.fromkeys(hosts, "unchanged")
    assert _templates(settings, site) == after_first

    # Night 3: the repository ships 1.1: rebuilt because its epoch moved, new templates, exactly that change.
    canary_repo.publish({PACKAGE: "1.1"})
    third, builds = _night(settings, packer_calls)
    assert third["build"]["status"] == "built" and len(builds) == 1
    assert f"{canary_repo.url} canary" in third["build"]["reason"], third["build"]["reason"]
    changes = third["build"]["package_changes"]
    assert changes["changed"] == [{"name": PACKAGE, "from": "1.0", "to": "1.1"}], changes
    assert changes["added"] == [] and changes["removed"] == []
    assert _installed(build_dir)[PACKAGE] == "1.1"
    assert {h["host"]: h["action"] for h in third["publish"]["hosts"]} == dict.fromkeys(hosts, "created")
    after_third = _templates(settings, site)
    assert all(len(after_third[h]) == 2 for h in hosts)

    # Night 4: re-signed, same packages: rebuilt, but no host gets a new template.
    canary_repo.publish({PACKAGE: "1.1"})
    fourth, builds = _night(settings, packer_calls)
    assert fourth["build"]["status"] == "built" and len(builds) == 1
    assert fourth["build"]["build_id"] != third["build"]["build_id"]
    assert fourth["build"]["package_changes"]["changed"] == []
    for h in fourth["publish"]["hosts"]:
        assert h["action"] == "unchanged" and h["bytes_sent"] == 0, h
        assert any("same packages" in note for note in h["notes"]), h
    assert _templates(settings, site) == after_third
