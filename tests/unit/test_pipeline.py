"""Pipeline orchestration: a failing image never reaches publish, the others still run, the report says why.

The stages themselves are proven against real parts in their own tests and in tests/e2e; here they
are replaced by recorders so that the orchestration rules can be checked exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from image_factory import preflight, publish
from image_factory.errors import FactoryError, ValidationFailed
from image_factory.image import build, imagetest
from image_factory.image import manifest as mf
from image_factory.image.builddir import BuildDir
from image_factory.lab import factories
from image_factory.pipeline import default_images, run_pipeline
from image_factory.settings import REPO_ROOT, Settings
from image_factory.site.inventory import load_site

pytestmark = pytest.mark.unit


@dataclass
class Recorder:
    built: list[str] = field(default_factory=list)
    tested: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    preflights: list[str] = field(default_factory=list)


def _manifest(name: str, tested: bool | None) -> mf.Manifest:
    return factories.manifest(name, build_id="abababababab", tested=tested, family="fedora", release=44,
                              failures=("test_hygiene::test_artifact_has_no_ssh_host_keys",))


@pytest.fixture
def stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, Recorder, dict[str, Any]]:
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds")})
    rec = Recorder()
    behaviour: dict[str, Any] = {"test_passes": {}, "build_fails": set(), "cached_test": set()}

    def fake_build(s: Settings, image: Any, **kw: Any) -> build.BuildOutcome:
        rec.built.append(image.name)
        if image.name in behaviour["build_fails"]:
            raise FactoryError(f"{image.name}: packer failed: boom")
        bdir = s.builds_dir / image.name
        m = _manifest(image.name, True if image.name in behaviour["cached_test"] else None)
        mf.save(bdir, m)
        return build.BuildOutcome(status="built", manifest=m, dir=BuildDir(bdir), log=None, duration_s=1.0)

    def fake_test(s: Settings, image: Any, build_dir: BuildDir, **kw: Any) -> mf.ImageTestResult:
        rec.tested.append(image.name)
        ok = behaviour["test_passes"].get(image.name, True)
        result = _manifest(image.name, ok).image_test
        assert result is not None
        mf.record_test_result(build_dir.path, result)
        return result

    def fake_publish(s: Settings, site: Any, name: str, **kw: Any) -> Any:
        rec.published.append(name)
        report = publish.PublishReport(image=name, build_id="x", sha256="y", digest="z", transport="ssh",
                                       dry_run=False, tested=True, forced_untested=False, keep=3)
        report.hosts.append(publish.HostResult(host="pve-mgmt", action="created", template_vmid=9000))
        return report

    class Passed:
        def raise_for_failures(self) -> None:
            rec.preflights.append("ok")

    def fake_preflight(s: Settings, site: Any, hosts: Any, **kw: Any) -> Any:
        if behaviour.get("preflight_fails"):
            raise FactoryError("pve-mgmt: storage: storage 'local' lacks content type import")
        return Passed()

    monkeypatch.setattr(preflight, "run_preflight", fake_preflight)
    monkeypatch.setattr(build, "build_image", fake_build)
    monkeypatch.setattr(imagetest, "test_image", fake_test)
    monkeypatch.setattr(publish, "publish_image", fake_publish)
    return settings, rec, behaviour


def _site() -> Any:
    return load_site(REPO_ROOT / "ansible/inventory", REPO_ROOT / "packer/images.yml")


def test_failing_image_test_stops_that_images_publish_and_others_still_run(stages: Any) -> None:
    settings, rec, behaviour = stages
    behaviour["test_passes"]["fedora-44"] = False
    report = run_pipeline(settings, _site(), ["fedora-44", "fedora-45"], progress=False)
    assert rec.tested == ["fedora-44", "fedora-45"]
    assert rec.published == ["fedora-45"]
    by_name = {r.image: r for r in report.images}
    assert by_name["fedora-44"].status == "failed" and by_name["fedora-44"].stage == "test"
    assert "test_artifact_has_no_ssh_host_keys" in by_name["fedora-44"].error
    assert by_name["fedora-45"].status == "ok"
    assert not report.ok
    assert report.to_dict()["ok"] is False


def test_build_failure_is_reported_and_the_next_image_runs(stages: Any) -> None:
    settings, rec, behaviour = stages
    behaviour["build_fails"].add("fedora-44")
    report = run_pipeline(settings, _site(), ["fedora-44", "fedora-45"], progress=False)
    assert rec.built == ["fedora-44", "fedora-45"]
    assert rec.published == ["fedora-45"]
    assert report.images[0].stage == "build" and "boom" in report.images[0].error


def test_a_passing_test_for_the_same_artifact_is_not_run_again(stages: Any) -> None:
    settings, rec, behaviour = stages
    behaviour["cached_test"].add("fedora-45")
    report = run_pipeline(settings, _site(), ["fedora-45"], progress=False)
    assert rec.tested == []
    assert report.images[0].tests == {"status": "passed", "cached": True}
    assert report.ok


def test_unknown_image_or_host_fails_before_any_stage_runs(stages: Any) -> None:
    settings, rec, _ = stages
    with pytest.raises(ValidationFailed):
        run_pipeline(settings, _site(), ["fedora-44", "nope"], progress=False)
    with pytest.raises(ValidationFailed):
        run_pipeline(settings, _site(), ["fedora-44"], ["pve-3"], progress=False)
    assert rec.built == []


def test_default_images_are_those_the_inventory_uses() -> None:
    assert default_images(_site()) == ["fedora-44", "fedora-45"]


def test_preflight_runs_first_and_a_failure_stops_before_any_build(stages: Any) -> None:
    settings, rec, behaviour = stages
    run_pipeline(settings, _site(), ["fedora-45"], progress=False)
    assert rec.preflights == ["ok"]
    behaviour["preflight_fails"] = True
    rec.built.clear()
    with pytest.raises(FactoryError, match="lacks content type import"):
        run_pipeline(settings, _site(), ["fedora-45"], progress=False)
    assert rec.built == []


def test_markdown_summary_shows_why_what_changed_and_each_hosts_action() -> None:
    from image_factory.pipeline import ImageRun, PipelineReport, markdown_summary

    ok = ImageRun("debian-lab", status="ok", build={
        "status": "built", "reason": "inputs changed: upstream:http://deb.debian.org/debian-security trixie-security",
        "package_changes": {"from_build": "b1", "to_build": "b2", "added": [], "removed": [],
                            "changed": [{"name": "openssl", "from": "3.5.1-1", "to": "3.5.1-1+deb13u1"}]},
        "security_updates": ["openssl 3.5.1-1+deb13u1 (trixie-security)"]},
        tests={"status": "passed"},
        publish={"hosts": [{"host": "pve-mgmt", "action": "created", "template_vmid": 9001,
                            "pruned": [{"vmid": 9000}], "notes": []},
                           {"host": "pve-tenant", "action": "unchanged", "template_vmid": 9000,
                            "notes": ["no new template: same packages"]}]})
    bad = ImageRun("fedora-45", status="failed", stage="build", error="source | checksum\nmismatch")
    text = markdown_summary(PipelineReport(started_at="2026-11-28T01:00:00Z", total_s=312, images=[ok, bad]))
    assert text.startswith("## Image pipeline: FAILED (312 s, 2026-11-28T01:00:00Z)")
    assert ("| debian-lab | ok | built | inputs changed: upstream:http://deb.debian.org/debian-security "
            "trixie-security | passed | pve-mgmt: created 9001, pruned 1, pve-tenant: unchanged 9000 |") in text
    assert "| fedora-45 | failed at build | - |  | - | - |" in text
    assert "- openssl: 3.5.1-1 → 3.5.1-1+deb13u1" in text
    assert "Security fixes: openssl 3.5.1-1+deb13u1 (trixie-security)" in text
    assert "- debian-lab on pve-tenant: no new template: same packages" in text
    assert "**fedora-45 failed at build:** source | checksum\nmismatch" in text


def test_the_nightly_workflow_is_valid_and_fans_out_one_job_per_image() -> None:
    """GitHub's workflow schema (check-jsonschema's vendored copy, offline) and the shape the nightly
    relies on: a matrix from `pipeline --list-images`, builds/ and the Packer cache outside the workspace."""
    import shutil
    import subprocess

    import yaml

    workflow = REPO_ROOT / ".github/workflows/nightly.yml"
    tool = shutil.which("check-jsonschema") or str(Path(__import__("sys").executable).parent / "check-jsonschema")
    proc = subprocess.run([tool, "--builtin-schema", "vendor.github-workflows", str(workflow)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    flow = yaml.safe_load(workflow.read_text())
    assert flow["env"]["INVOKE_FACTORY_BUILDS_DIR"].startswith("/") and flow["env"]["PACKER_CACHE_DIR"].startswith("/")
    plan = "\n".join(step.get("run", "") for step in flow["jobs"]["plan"]["steps"])
    assert "invoke pipeline --list-images" in plan
    image = flow["jobs"]["image"]
    assert image["strategy"]["matrix"]["image"] == "${{ fromJSON(needs.plan.outputs.images) }}"
    run = "\n".join(step.get("run", "") for step in image["steps"])
    assert '--images "$IMAGE"' in run and '--summary "$GITHUB_STEP_SUMMARY"' in run
