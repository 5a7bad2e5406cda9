"""Build orchestration: cache logic, manifest, failure handling, process-group stop.

A fake ``packer`` on PATH records every invocation (so "no packer process started" is checked by
its log staying empty) and plays a build: it writes a real qcow2 with qemu-img, prints
machine-readable lines, fails, or hangs with a child process standing in for QEMU. qemu-img,
ssh-keygen and openssl are the real tools. The real packer build is in tests/e2e/test_build_e2e.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from image_factory.image import build, buildcache, buildevents, bundle, packerrun, render, rendercheck, strategy
from image_factory.image.manifest import load, save, sha256_file
from image_factory.lab import factories
from image_factory.settings import REPO_ROOT, Settings
from image_factory.site.inventory import Image, load_site

pytestmark = pytest.mark.unit

FAKE_PACKER = textwrap.dedent(
    """\
    #!{python}
    import os, re, subprocess, sys, time
    log = os.environ["FAKE_PACKER_LOG"]
    with open(log, "a") as fh:
        fh.write(" ".join(sys.argv[1:]) + "\\n")
    cmd = sys.argv[1]
    if cmd == "version":
        print("Packer v1.6.6")
        sys.exit(0)
    if cmd in ("fmt", "validate"):
        sys.exit(0)
    mode = os.environ.get("FAKE_PACKER_MODE", "ok")
    if mode == "gate":  # a build that goes on once the test opens the gate (the file FAKE_PACKER_GATE)
        gate = os.environ["FAKE_PACKER_GATE"]
        open(gate + ".entered", "w").close()
        for _ in range(6000):
            if os.path.exists(gate):
                break
            time.sleep(0.02)
    var_file = [a.split("=", 1)[1] for a in sys.argv if a.startswith("-var-file=")][0]
    vars_ = dict(re.findall(r'^(\\w+) = "(.*)"$', open(var_file).read(), re.M))
    hcl = open(sys.argv[-1]).read()
    name = re.search(r'vm_name\\s*=\\s*"([^"]+)"', hcl).group(1)
    def say(kind, *data):
        print("1700000000,qemu.image," + kind + "," + ",".join(d.replace(",", "%!(PACKER_COMMA)") for d in data),
              flush=True)
    say("ui", "say", "==> qemu.image: Starting VM%!(PACKER_COMMA) booting disk image")
    if mode == "fail":
        say("ui", "error", "==> qemu.image: Error executing Ansible: Non-zero exit status: exit status 2")
        print("1700000001,,error-count,1", flush=True)
        print("1700000001,qemu.image,error,Error executing Ansible: exit status 2", flush=True)
        sys.exit(1)
    if mode == "hang":
        child = subprocess.Popen(["sleep", "300"])
        open(os.environ["FAKE_PACKER_CHILD"], "w").write(str(child.pid))
        time.sleep(300)
        sys.exit(0)
    with open(log + ".env", "a") as fh:
        strategy = [k + "=" + v for k, v in sorted(os.environ.items()) if k.startswith("ANSIBLE_STRATEGY")]
        fh.write(" ".join(strategy) + "\\n")
    out = os.path.join(vars_["work_dir"], "output")
    os.makedirs(out)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", os.path.join(out, name), "64M"], check=True)
    say("ui", "say", "==> qemu.image: Gracefully halting virtual machine...")
    print("1700000002,qemu.image,artifact-count,1", flush=True)
    print("1700000002,qemu.image,artifact,0,file,0," + os.path.join(out, name), flush=True)
    sys.exit(0)
    """
)


@pytest.fixture
def fake_packer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    exe = bindir / "packer"
    exe.write_text(FAKE_PACKER.format(python=sys.executable))
    exe.chmod(0o755)
    log = tmp_path / "packer-invocations.log"
    log.write_text("")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PACKER_LOG", str(log))
    render._packer_version_cache.clear()
    return log


@pytest.fixture
def repo(tmp_path: Path) -> Settings:
    for d in ("packer", "kickstart", "ansible"):
        shutil.copytree(REPO_ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    base = tmp_path / "builds/base"
    base.mkdir(parents=True)
    src = base / "debian-13-base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "64M"], check=True)
    (base / "debian-13-base.qcow2.sha256").write_text(f"{sha256_file(src)}  debian-13-base.qcow2\n")
    return Settings.from_mapping({"builds_dir": str(tmp_path / "builds"), "accelerator": "tcg"}, root=tmp_path)


@pytest.fixture
def image(repo: Settings) -> Image:
    """debian-lab without its upstream repositories: unit tests ask no archive (epochs have their own test)."""
    return load_site(REPO_ROOT / "ansible/inventory", repo.images).images["debian-lab"].model_copy(
        update={"repositories": []})


@pytest.fixture
def no_validate(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Validation has its own tests (test_render.py); here it only has to be called."""
    calls: list[str] = []
    monkeypatch.setattr(rendercheck, "validate", lambda result, settings: calls.append(result.image.name))
    return calls


def invocations(log: Path) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if ln]


def _built(repo: Settings, image: Image, fake_packer: Path) -> build.BuildOutcome:
    outcome = build.build_image(repo, image, compress=False)
    assert outcome.status == "built"
    return outcome



def assert_gone(pid: int, after: str) -> None:
    """The stand-in QEMU child must be gone within 5 s of the stop."""
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail(f"the stand-in QEMU process {pid} survived {after}")

def test_parse_machine_readable() -> None:
    assert packerrun.parse_machine_readable("1700000000,qemu.image,ui,say,a%!(PACKER_COMMA) b\\nc\n") == (
        "qemu.image", "ui", ["say", "a, b\nc"])
    assert packerrun.parse_machine_readable("1700000000,,error-count,1") == ("", "error-count", ["1"])
    assert packerrun.parse_machine_readable("not machine readable") is None


def test_build_writes_manifest_matching_the_artifact(
    repo: Settings, image: Image, fake_packer: Path, no_validate: list[str]
) -> None:
    events: list[buildevents.BuildEvent] = []
    outcome = build.build_image(repo, image, compress=True, on_event=events.append)
    assert outcome.status == "built" and outcome.manifest is not None
    m = load(outcome.build_dir)
    assert m is not None and m.to_dict() == outcome.manifest.to_dict()
    art = outcome.build_dir / m.artifact.path
    assert not Path(m.artifact.path).is_absolute() and art.is_file()
    assert m.artifact.path == "debian-lab.qcow2"
    assert sha256_file(art) == m.artifact.sha256 and m.artifact.disk_size == art.stat().st_size
    assert m.artifact.virtual_size == 64 * 1024**2
    assert m.build_id == m.artifact.sha256[:12]
    assert m.fingerprint == outcome.fingerprint and m.inputs["source_checksum"] != "missing"
    assert m.accelerator == "tcg" and m.tools["packer"] == "1.6.6"
    assert m.mode == "cloud" and m.family == "debian" and m.release == 13
    assert no_validate == ["debian-lab"]
    # live progress saw the step, and the full log has every line
    assert any(e.kind == "step" and "Starting VM, booting disk image" in e.message for e in events)
    assert "Gracefully halting" in (outcome.build_dir / "build.log").read_text()
    # nothing temporary is left behind
    assert not list(outcome.build_dir.glob(".work-*"))
    builds = [ln for ln in invocations(fake_packer) if ln.startswith("build ")]
    assert len(builds) == 1 and "-machine-readable" in builds[0]


def test_tcg_build_runs_the_ansible_provisioner_under_mitogen(
    repo: Settings, image: Image, fake_packer: Path, no_validate: list[str]
) -> None:
    outcome = _built(repo, image, fake_packer)
    env = Path(f"{fake_packer}.env").read_text().split()
    assert "ANSIBLE_STRATEGY=mitogen_linear" in env
    plugins = Path(next(e for e in env if e.startswith("ANSIBLE_STRATEGY_PLUGINS=")).split("=", 1)[1])
    assert (plugins / "mitogen_linear.py").is_file()
    assert outcome.manifest is not None and outcome.manifest.ansible_strategy == "mitogen_linear"
    assert outcome.manifest.tools["mitogen"][0].isdigit()
    assert "# ANSIBLE_STRATEGY=mitogen_linear" in (outcome.build_dir / "build.log").read_text()


def test_linear_strategy_is_explicit_and_recorded(
    repo: Settings, image: Image, fake_packer: Path, no_validate: list[str]
) -> None:
    outcome = build.build_image(repo, image, compress=False, ansible_strategy="linear")
    # Set even for linear, so an ANSIBLE_STRATEGY in the caller's environment cannot leak in.
    assert Path(f"{fake_packer}.env").read_text().split() == ["ANSIBLE_STRATEGY=linear"]
    assert outcome.manifest is not None and outcome.manifest.ansible_strategy == "linear"
    assert "mitogen" not in outcome.manifest.tools


def test_auto_strategy_follows_the_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    assert strategy.resolve_ansible_strategy("auto", "kvm").name == "linear"
    assert strategy.resolve_ansible_strategy("auto", "tcg").name == "mitogen_linear"
    assert strategy.resolve_ansible_strategy("auto", "tcg", "fedora").name == "linear"  # Python 3.14+: unproven
    assert strategy.resolve_ansible_strategy("mitogen", "tcg", "fedora").name == "mitogen_linear"  # asked for
    assert strategy.resolve_ansible_strategy("mitogen", "kvm").name == "mitogen_linear"
    assert strategy.resolve_ansible_strategy("linear", "tcg").name == "linear"
    monkeypatch.setattr(strategy, "mitogen_strategy_dir", lambda: None)
    fallback = strategy.resolve_ansible_strategy("auto", "tcg")
    assert fallback.name == "linear" and "mitogen is not installed" in fallback.why
    with pytest.raises(buildevents.BuildError, match="mitogen package is not installed"):
        strategy.resolve_ansible_strategy("mitogen", "tcg")


def test_unknown_strategy_is_refused_before_packer_runs(
    repo: Settings, image: Image, fake_packer: Path, no_validate: list[str]
) -> None:
    bad = dataclasses.replace(repo, ansible_strategy="turbo")
    refused = r"ansible strategy 'turbo' \(--ansible-strategy or factory.ansible_strategy\) is not one of auto"
    with pytest.raises(buildevents.BuildSettingError, match=refused) as err:
        build.build_image(bad, image)
    assert err.value.exit_code == 2, "bad input, like every other setting error"
    assert not [ln for ln in invocations(fake_packer) if ln.startswith("build ")]
    assert not (repo.builds_dir / image.name / "manifest.json").exists()


def test_compression_follows_the_catalogue_unless_overridden(
    repo: Settings, image: Image, fake_packer: Path, no_validate: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real = packerrun.compact
    monkeypatch.setattr(packerrun, "compact", lambda src, dst, *, compress: (seen.append(compress), real(src, dst,
                        compress=compress))[1])
    assert image.compress is False  # the lab fixture travels over loopback
    build.build_image(repo, image)
    build.build_image(repo, image.model_copy(update={"compress": True}), force=True)
    build.build_image(repo, image.model_copy(update={"compress": True}), force=True, compress=False)
    assert seen == [False, True, False]


def test_cache_hit_starts_no_packer_process(
    repo: Settings, image: Image, fake_packer: Path, no_validate: list[str]
) -> None:
    first = _built(repo, image, fake_packer)
    fake_packer.write_text("")
    second = build.build_image(repo, image)
    assert second.status == "cached"
    assert second.manifest is not None and first.manifest is not None
    assert second.manifest.artifact.sha256 == first.manifest.artifact.sha256
    assert invocations(fake_packer) == [], "a cache hit must not run packer at all"
    assert no_validate == ["debian-lab"], "a cache hit does not re-validate"


def test_a_second_build_of_the_image_waits_for_the_first_and_finds_its_result(
    repo: Settings, image: Image, fake_packer: Path, no_validate: list[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two builds of one image at once (each its own open of builds/<image>/.lock, as two processes have): the
    second renders nothing and reads no cache until the first is done, then its result is a cache hit."""
    gate = tmp_path / "gate"
    monkeypatch.setenv("FAKE_PACKER_MODE", "gate")
    monkeypatch.setenv("FAKE_PACKER_GATE", str(gate))
    outcomes: dict[str, build.BuildOutcome | BaseException] = {}
    second_waits = threading.Event()

    def run(name: str) -> None:
        def on_event(ev: buildevents.BuildEvent) -> None:
            if name == "second" and ev.message.startswith("waiting for another build of debian-lab"):
                second_waits.set()
        try:
            outcomes[name] = build.build_image(repo, image, compress=False, on_event=on_event)
        except BaseException as exc:
            outcomes[name] = exc

    first = threading.Thread(target=run, args=("first",))
    first.start()
    entered = gate.with_name("gate.entered")
    for _ in range(3000):  # the first build's packer is running
        if entered.exists() or not first.is_alive():
            break
        time.sleep(0.02)
    assert entered.exists(), outcomes
    rendered = {p: p.read_bytes() for p in (repo.builds_dir / "debian-lab").glob("*.pkr.hcl")}
    second = threading.Thread(target=run, args=("second",))
    second.start()
    assert second_waits.wait(60), outcomes
    assert {p: p.read_bytes() for p in rendered} == rendered
    gate.touch()
    first.join(120)
    second.join(120)
    built, found = outcomes["first"], outcomes["second"]
    assert isinstance(built, build.BuildOutcome) and built.status == "built", built
    assert isinstance(found, build.BuildOutcome) and found.status == "cached", found
    assert found.manifest is not None and built.manifest is not None
    assert found.manifest.build_id == built.manifest.build_id
    assert len([ln for ln in invocations(fake_packer) if ln.startswith("build ")]) == 1


def test_force_rebuilds(repo: Settings, image: Image, fake_packer: Path, no_validate: list[str]) -> None:
    _built(repo, image, fake_packer)
    fake_packer.write_text("")
    again = build.build_image(repo, image, force=True, compress=False)
    assert again.status == "built" and again.reason == "--force"
    assert [ln for ln in invocations(fake_packer) if ln.startswith("build ")]


def test_changed_template_invalidates(repo: Settings, image: Image, fake_packer: Path, no_validate: list[str]) -> None:
    _built(repo, image, fake_packer)
    tpl = repo.root / "packer/image.pkr.hcl.j2"
    tpl.write_text(tpl.read_text() + "# a change\n")
    plan = build.build_image(repo, image, dry_run=True)
    assert plan.status == "planned"
    assert "inputs changed" in plan.reason and "packer/image.pkr.hcl.j2" in plan.reason


def test_changed_role_invalidates(repo: Settings, image: Image, fake_packer: Path, no_validate: list[str]) -> None:
    _built(repo, image, fake_packer)
    role = repo.root / "ansible/roles/baseline/defaults/main.yml"
    role.write_text(role.read_text() + "# a change\n")
    assert build.build_image(repo, image, dry_run=True).status == "planned"


def test_corrupted_artifact_invalidates(
    repo: Settings, image: Image, fake_packer: Path, no_validate: list[str]
) -> None:
    first = _built(repo, image, fake_packer)
    assert first.artifact is not None
    with first.artifact.open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff")
    fake_packer.write_text("")
    plan = build.build_image(repo, image, dry_run=True)
    assert plan.status == "planned" and "sha256" in plan.reason
    assert not [ln for ln in invocations(fake_packer) if ln.startswith("build ")], "dry run starts no build"
    rebuilt = build.build_image(repo, image, compress=False)
    assert rebuilt.status == "built" and rebuilt.manifest is not None
    assert sha256_file(first.artifact) == rebuilt.manifest.artifact.sha256


def test_changed_source_checksum_invalidates(
    repo: Settings, image: Image, fake_packer: Path, no_validate: list[str]
) -> None:
    _built(repo, image, fake_packer)
    src = repo.root / "builds/base/debian-13-base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "128M"], check=True)
    (src.parent / "debian-13-base.qcow2.sha256").write_text(f"{sha256_file(src)}  debian-13-base.qcow2\n")
    assert build.build_image(repo, image, dry_run=True).status == "planned"


def test_packer_failure_keeps_the_previous_artifact(
    repo: Settings, image: Image, fake_packer: Path, no_validate: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = _built(repo, image, fake_packer)
    assert good.manifest is not None and good.artifact is not None
    monkeypatch.setenv("FAKE_PACKER_MODE", "fail")
    with pytest.raises(buildevents.BuildError) as exc:
        build.build_image(repo, image, force=True)
    msg = str(exc.value)
    assert "packer build failed" in msg and "Error executing Ansible" in msg
    assert str(good.build_dir / "build.log") in msg
    assert "rebuild with --ansible-strategy linear" in msg, "under mitogen, the way to rule it out is named"
    with pytest.raises(buildevents.BuildError) as linear:
        build.build_image(repo, image, force=True, ansible_strategy="linear")
    assert "Error executing Ansible" in str(linear.value) and "mitogen" not in str(linear.value)
    # the previous, good artifact and its manifest are untouched; no temporary directory is left
    m = load(good.build_dir)
    assert m is not None and m.artifact.sha256 == good.manifest.artifact.sha256
    assert sha256_file(good.artifact) == m.artifact.sha256
    assert not list(good.build_dir.glob(".work-*"))


@pytest.fixture
def hanging_packer(fake_packer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake packer hangs with a child standing in for QEMU; returns the file holding its pid."""
    child_file = tmp_path / "child.pid"
    monkeypatch.setenv("FAKE_PACKER_MODE", "hang")
    monkeypatch.setenv("FAKE_PACKER_CHILD", str(child_file))
    return child_file


def test_timeout_stops_packer_and_its_children(
    repo: Settings, image: Image, hanging_packer: Path, no_validate: list[str]
) -> None:
    child_file = hanging_packer
    with pytest.raises(buildevents.BuildError, match="build timeout"):
        build.build_image(repo, image, timeout_s=3)
    assert_gone(int(child_file.read_text()), "the stop")
    assert load(repo.builds_dir / "debian-lab") is None
    assert not list((repo.builds_dir / "debian-lab").glob(".work-*"))


def test_missing_source_says_run_base_image(repo: Settings, image: Image, fake_packer: Path,
                                            no_validate: list[str]) -> None:
    (repo.root / "builds/base/debian-13-base.qcow2").unlink()
    with pytest.raises(buildevents.BuildError, match=r"invoke lab\.base-image"):
        build.build_image(repo, image)
    assert not [ln for ln in invocations(fake_packer) if ln.startswith("build ")]


def test_source_checksum_mismatch(repo: Settings, image: Image, fake_packer: Path, no_validate: list[str]) -> None:
    (repo.root / "builds/base/debian-13-base.qcow2.sha256").write_text("0" * 64 + "  debian-13-base.qcow2\n")
    with pytest.raises(buildevents.BuildError, match="checksum mismatch"):
        build.build_image(repo, image)
    assert not [ln for ln in invocations(fake_packer) if ln.startswith("build ")]


def test_packer_missing_says_how_to_install(repo: Settings, image: Image, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(render.ToolMissing, match=r"packer is not installed .*Packer >= 1\.7"):
        build.build_image(repo, image)


def test_a_build_without_ansible_playbook_names_the_build_extra_before_packer_runs(
        repo: Settings, image: Image, fake_packer: Path, no_validate: list[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain install (no [build] extra) used to fail inside Packer with "ansible-playbook not found"."""
    bare = tmp_path / "bare-venv-bin"
    bare.mkdir()
    monkeypatch.setattr(render, "venv_bin", lambda: bare)
    if shutil.which("ansible-playbook") is not None:
        monkeypatch.setenv("PATH", os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                                                  if not (Path(d) / "ansible-playbook").exists()))
    with pytest.raises(render.ToolMissing,
                       match=r"ansible-playbook .*ansible-core, a dependency of the factory itself"):
        build.build_image(repo, image, compress=False)
    assert not [ln for ln in invocations(fake_packer) if ln.startswith("build ")]


def test_accelerator_override_and_detection(repo: Settings) -> None:
    assert strategy.resolve_accelerator(repo, "kvm") == "kvm"
    assert strategy.resolve_accelerator(repo, "auto") == "tcg"  # settings say tcg
    with pytest.raises(buildevents.BuildError, match="not one of"):
        strategy.resolve_accelerator(repo, "xen")
    assert strategy.detect_accelerator() in ("kvm", "tcg")


def test_manifest_round_trip_through_cache_status(tmp_path: Path) -> None:
    art = tmp_path / "x.qcow2"
    art.write_bytes(b"data")
    m = factories.manifest("x", path="x.qcow2", sha256=sha256_file(art), disk_size=4, fingerprint="f1")
    save(tmp_path, m)
    assert buildcache.cache_status(tmp_path, "f1")[0] is not None
    assert buildcache.cache_status(tmp_path, "f2") == (None, "inputs changed")
    art.write_bytes(b"datb")
    assert "sha256" in buildcache.cache_status(tmp_path, "f1")[1]
    assert stat.S_ISREG((tmp_path / "manifest.json").stat().st_mode)
    assert json.loads((tmp_path / "manifest.json").read_text())["fingerprint"] == "f1"


def test_a_build_older_than_max_age_is_rebuilt(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    art = tmp_path / "x.qcow2"
    art.write_bytes(b"data")
    m = factories.manifest("x", build_id="abc", path="x.qcow2", sha256=sha256_file(art), disk_size=4, fingerprint="f1",
                           release=13,
                           finished_at="2026-11-20T02:00:00Z")
    save(tmp_path, m)
    six_days, eight_days = datetime(2026, 11, 26, 2, 0, tzinfo=UTC), datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
    assert buildcache.cache_status(tmp_path, "f1", max_age_days=7, now=six_days)[0] is not None
    hit, why = buildcache.cache_status(tmp_path, "f1", max_age_days=7, now=eight_days)
    assert hit is None and why == "build abc is 8.0 days old (max_age_days 7): rebuilt for current updates"
    assert buildcache.cache_status(tmp_path, "f1", now=eight_days)[0] is not None  # an image without updates


def test_ctrl_c_stops_packer_and_qemu_and_leaves_nothing(
    repo: Settings, image: Image, hanging_packer: Path, no_validate: list[str]
) -> None:
    import signal
    import threading

    child_file = hanging_packer

    def interrupt_once_started() -> None:
        for _ in range(300):
            if child_file.exists():
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        build.build_image(repo, image)
    assert_gone(int(child_file.read_text()), "Ctrl-C")
    build_dir = repo.builds_dir / "debian-lab"
    assert load(build_dir) is None and not list(build_dir.glob("*.qcow2"))
    assert not list(build_dir.glob(".work-*"))
    assert "interrupted" in (build_dir / "build.log").read_text()


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()} if root.exists() else {}


def test_dry_run_writes_nothing_under_builds(
    repo: Settings, image: Image, fake_packer: Path, no_validate: list[str]
) -> None:
    before = _tree(repo.builds_dir)
    fresh = build.build_image(repo, image, dry_run=True)
    assert fresh.status == "planned" and _tree(repo.builds_dir) == before
    built = _built(repo, image, fake_packer)
    assert built.status == "built"
    (repo.builds_dir / image.name / f"{image.name}.pkr.hcl").write_text("# edited by hand\n")
    before = _tree(repo.builds_dir)
    again = build.build_image(repo, image, dry_run=True)
    assert _tree(repo.builds_dir) == before, "the dry run rewrote a rendered file"
    assert again.fingerprint == built.fingerprint  # same decision as a real run
    assert again.status == "cached"


def test_upstream_epochs_join_the_fingerprint_and_an_unknown_state_rebuilds(
        repo: Settings, image: Image, monkeypatch: pytest.MonkeyPatch) -> None:
    from image_factory.image import render, upstream
    from image_factory.site.inventory import Repository

    img = image.model_copy(update={"repositories": [Repository(kind="debian", uri="http://a/debian", suite="s")]})
    answers: list[tuple[dict[str, str], dict[str, str]]] = [
        ({"http://a/debian s": "InRelease D1 sha256:1"}, {}),
        ({"http://a/debian s": "InRelease D2 sha256:2"}, {}),
        ({}, {"http://a/debian s": "http://a/debian/dists/s/InRelease: HTTP 503"}),
    ]
    monkeypatch.setattr(upstream, "repository_epochs", lambda *a, **k: answers.pop(0))
    fingerprints, reasons = [], []
    for _ in range(3):
        result = render.render_image(repo, img, packer_version=(1, 6, 6))
        try:
            inputs, why = buildcache.upstream_inputs(repo, img, offline=False, previous=None)
            buildcache.with_upstream(result, inputs)
            fingerprints.append(result.fingerprint)
            reasons.append(why)
        finally:
            result.cleanup()
    assert len(set(fingerprints)) == 3, "each upstream state is its own build identity"
    assert reasons[:2] == ["", ""] and "HTTP 503" in reasons[2]
    previous = factories.manifest("x", release=13, inputs={"upstream:http://a/debian s": "InRelease D1 sha256:1",
                                                           "x": "y"})
    assert buildcache.upstream_inputs(repo, img, offline=True, previous=previous) == (
        {"upstream:http://a/debian s": "InRelease D1 sha256:1"}, "")  # --offline: nothing fetched


@pytest.mark.parametrize(("family", "release", "core", "warned"), [
    ("fedora", 45, (2, 19), "Python 3.15, which ansible-core 2.19 does not support as a target (up to 3.13)"),
    ("fedora", 44, (2, 19), "Use ansible-core 2.20+"),
    ("fedora", 44, (2, 20), ""),
    ("fedora", 45, (2, 21), "No ansible-core release known here supports it yet"),
    ("fedora", 45, (2, 30), ""),
    ("debian", 13, (2, 19), ""),
    ("debian", 14, (2, 19), ""),  # not known here: no guess
])
def test_ansible_core_too_old_for_the_targets_python_is_named(family: str, release: int, core: tuple[int, int],
                                                              warned: str) -> None:
    message = strategy.ansible_target_warning(family, release, core)
    assert (warned in message and message) if warned else message == ""


def test_a_build_vm_kernel_panic_stops_packer_at_once(tmp_path: Path) -> None:
    """A stand-in packer whose VM console reports a panic: stopped within seconds, not at Packer's SSH timeout."""
    serial = tmp_path / "work" / "serial.log"
    serial.parent.mkdir()
    fake = tmp_path / "packer"
    fake.write_text("#!/bin/sh\necho '1,,ui,say,==> qemu.image: Waiting for SSH to become available...'\n"
                    f"sleep 1; printf '[ 26.3] Oops: int3\\n[ 26.4] Kernel panic - not syncing: x\\n' > {serial}\n"
                    "exec sleep 120\n")
    fake.chmod(0o755)
    started = time.monotonic()
    panicked = "(?s)kernel panicked.*re-run the build.*Kernel panic - not syncing"
    with pytest.raises(buildevents.BuildError, match=panicked):
        packerrun.run_packer([str(fake)], cwd=tmp_path, log_path=tmp_path / "build.log", timeout_s=300,
                             sink=buildevents.EventSink(), serial_log=serial)
    assert time.monotonic() - started < 30
    assert "the build VM's kernel panicked" in (tmp_path / "build.log").read_text()


def _packer_panicking_first(tmp_path: Path, then: str) -> tuple[Path, Path]:
    """A stand-in packer whose first build VM panics; later runs do ``then`` (shell)."""
    work = tmp_path / "work"
    (work / "output").mkdir(parents=True)
    runs = tmp_path / "runs"
    fake = tmp_path / "packer"
    fake.write_text(f"#!/bin/sh\necho run >> {runs}\n"
                    f"if [ $(wc -l < {runs}) -eq 1 ]; then\n"
                    f"  printf '[ 26.4] Kernel panic - not syncing: x\\n' > {work}/serial.log; exec sleep 120\nfi\n"
                    f"test -e {work}/output && {{ echo 'Output directory exists'; exit 1; }}\n{then}\n")
    fake.chmod(0o755)
    return fake, work


@pytest.mark.parametrize(
    ("accel", "then", "outcome"),
    [
        ("tcg", "echo '1,,ui,say,==> qemu.image: done'", "built on the second attempt"),
        ("tcg", "printf '[ 26.4] Kernel panic - not syncing: x\\n' > $(dirname $0)/work/serial.log; exec sleep 120",
         "a second panic fails"),
        ("tcg", "exit 3", "another failure on the second attempt is not retried again"),
        ("kvm", "echo never reached", "a panic under KVM is the build's result"),
    ],
)
def test_a_build_vm_panic_under_tcg_is_built_once_more_and_reported(tmp_path: Path, accel: str, then: str,
                                                                    outcome: str) -> None:
    fake, work = _packer_panicking_first(tmp_path, then)
    log = tmp_path / "build.log"
    sink = buildevents.EventSink()

    def run() -> packerrun._Run:
        return packerrun.run_packer_once_more_on_tcg_panic(
            [str(fake)], accel=accel, work=work, sink=sink, cwd=tmp_path, log_path=log, timeout_s=300)

    def statuses() -> list[tuple[str, str]]:  # the build's own word on the run, beside packer's output
        return [(ev.kind, ev.message) for ev in sink.events if ev.kind == "status"]

    if outcome == "built on the second attempt":
        run()
        assert (tmp_path / "runs").read_text().count("run") == 2
        assert len(statuses()) == 1
        assert "kernel panicked" in statuses()[0][1] and "building once more" in statuses()[0][1]
        assert "the build VM's kernel panicked" in (tmp_path / "build.panicked.log").read_text()
        assert "Kernel panic" in (tmp_path / "serial.panicked.log").read_text()
        assert "kernel panicked" not in log.read_text()
        return
    expected = buildevents.BuildVmPanicked if "panic" in outcome else buildevents.BuildError
    with pytest.raises(expected) as caught:
        run()
    if outcome.startswith("another failure"):
        assert not isinstance(caught.value, buildevents.BuildVmPanicked) and "exit 3" in str(caught.value)
    runs = (tmp_path / "runs").read_text().count("run")
    assert runs == (1 if accel == "kvm" else 2)
    assert len(statuses()) == (0 if accel == "kvm" else 1)


def test_an_unchanged_artifact_is_not_hashed_again_and_any_change_is_seen(tmp_path: Path, monkeypatch) -> None:
    from image_factory.image import manifest as mf

    art = tmp_path / "x.qcow2"
    art.write_bytes(b"data")
    sha = sha256_file(art)
    old = time.time_ns() - 10**10  # settled: changed long enough ago for a stamp
    os.utime(art, ns=(old, old))
    monkeypatch.setattr(mf, "STAMP_SETTLE_NS", 0)
    assert mf.has_sha256(art, sha) and (tmp_path / ".x.qcow2.sha256-stamp").is_file()
    hashed: list[Path] = []
    real = mf.sha256_file
    monkeypatch.setattr(mf, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert mf.has_sha256(art, sha) and hashed == []  # remembered
    assert not mf.has_sha256(art, "0" * 64) and hashed == [art]  # another digest is checked, not trusted
    art.write_bytes(b"datb")  # same size; new content, so a new ctime
    os.utime(art, ns=(old, old))  # even with the old mtime put back
    assert not mf.has_sha256(art, sha) and len(hashed) == 2


def test_a_compressed_artifact_is_zstd_and_holds_the_same_disk(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as fh:
        fh.write(b"factory " * 512 * 1024)  # 4 MiB that compresses
        fh.truncate(16 * 1024 * 1024)
    packed = tmp_path / "disk.qcow2"
    packerrun.compact(raw, packed, compress=True)
    info = json.loads(subprocess.check_output(["qemu-img", "info", "--output=json", str(packed)]))
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    assert packed.stat().st_size < 1024 * 1024
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(raw), str(packed)], check=True)


def test_factory_bundle_is_the_wheel_and_the_lock_built_outside_the_checkout(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The factory's own wheel (debian-lab-builder, factory: true) is built from a copy of its sources: the
    checkout gets no build/ or egg-info, and the bundle holds exactly the wheel and the hashed lock."""
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds")}, root=REPO_ROOT)
    image = load_site(settings.inventory, settings.images).images["debian-lab-builder"]
    before = sorted(p.name for p in REPO_ROOT.iterdir())
    bundle_dir, work = tmp_path / "secret" / render.FACTORY_BUNDLE_DIR, tmp_path / "work"
    work.mkdir()
    fetched: list[tuple[str, Path]] = []  # the lock's files come from PyPI: the e2e build fetches them for real
    monkeypatch.setattr(bundle, "guest_wheelhouse", lambda s, i, dest: fetched.append((i.name, dest)))
    bundle.factory_bundle(settings, image, bundle_dir, work)
    assert fetched == [("debian-lab-builder", bundle_dir / "wheelhouse.tar")]
    names = sorted(p.name for p in bundle_dir.iterdir())
    assert len(names) == 2 and names[0].startswith("deevnet_image_factory-") and names[0].endswith("-py3-none-any.whl")
    assert names[1] == "requirements.txt"
    assert (bundle_dir / "requirements.txt").read_bytes() == (REPO_ROOT / render.FACTORY_LOCK).read_bytes()
    assert "--hash=sha256:" in (bundle_dir / "requirements.txt").read_text()
    assert stat.S_IMODE(bundle_dir.stat().st_mode) == 0o700
    assert sorted(p.name for p in REPO_ROOT.iterdir()) == before
    assert list(work.iterdir()) == []


def test_guest_wheelhouse_needs_the_images_python(tmp_path: Path) -> None:
    settings = Settings.from_mapping({"builds_dir": str(tmp_path / "builds")}, root=REPO_ROOT)
    image = load_site(settings.inventory, settings.images).images["debian-lab-builder"]
    with pytest.raises(buildevents.BuildError, match="release 99's"):
        bundle.guest_wheelhouse(settings, image.model_copy(update={"release": 99}), tmp_path / "w.tar")


@pytest.mark.parametrize(("python", "wanted", "left_out"), [((3, 13), "ansible-core==2.21.5", "ansible-core==2.19.14"),
                                                            ((3, 11), "ansible-core==2.19.14", "ansible-core==2.21.5")])
def test_guest_lock_keeps_the_entries_for_the_guests_python(tmp_path: Path, python: tuple[int, int], wanted: str,
                                                           left_out: str) -> None:
    """pip download reads the lock's markers for this machine's Python: the guest's entries are chosen first."""
    out = bundle.guest_lock(REPO_ROOT / render.FACTORY_LOCK, python, tmp_path / "guest.txt").read_text()
    assert f"\n{wanted} \\\n    --hash=sha256:" in out and left_out not in out and ";" not in out
    assert 0 < out.count("==") < (REPO_ROOT / render.FACTORY_LOCK).read_text().count("==")
