"""Build orchestration: cache logic, manifest, failure handling, process-group stop.

A fake ``packer`` on PATH records every invocation (so "no packer process started" is checked by
its log staying empty) and plays a build: it writes a real qcow2 with qemu-img, prints
machine-readable lines, fails, or hangs with a child process standing in for QEMU. qemu-img,
ssh-keygen and openssl are the real tools. The real packer build is in tests/e2e/test_build_e2e.py.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from image_factory import pipeline
from image_factory.image import build, buildcache, buildevents, firmware, packerrun, render, rendercheck, strategy
from image_factory.image.builddir import BuildDir
from image_factory.image.manifest import load, sha256_file
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
    if vars_.get("ovmf_vars"):  # the installer writes its boot entry into the build VM's variable store
        with open(vars_["ovmf_vars"], "r+b") as fh:
            fh.seek(-16, 2)
            fh.write(b"installer-entry!")
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


def test_the_build_dir_names_what_the_build_wrote(
    repo: Settings, image: Image, fake_packer: Path, no_validate: list[str]
) -> None:
    """The one BuildDir value the build hands on: its paths are the files the build wrote, and the test and
    publish stages find the same ones from the settings and the image name."""
    outcome = _built(repo, image, fake_packer)
    bdir = outcome.dir
    assert bdir == BuildDir.of(repo, image.name) == BuildDir.at(repo.builds_dir / image.name)
    assert BuildDir.at(bdir) is bdir and bdir.image == image.name
    m = bdir.require()
    assert outcome.manifest == m and bdir.manifest.is_file() and outcome.build_dir == bdir.path
    assert outcome.artifact == bdir.artifact(m) and sha256_file(bdir.artifact(m)) == m.artifact.sha256
    assert outcome.log == bdir.build_log and "packer build" in bdir.build_log.read_text()
    assert bdir.lock.is_file()  # held through the build; left for the next one
    assert not bdir.serial_failed_log.exists() and not bdir.test_junit.exists() and not bdir.package_diff.exists()


def test_a_secure_boot_build_keeps_the_store_it_enrolled_beside_the_disk_with_its_sha256(
    repo: Settings, fake_packer: Path, no_validate: list[str]
) -> None:
    """What publish imports into a microsoft-2023 template's efidisk0: the store as the build enrolled it (the
    manifest's secure_boot_enrolled reads it, the same platform key), not as the installer left it."""
    uefi = load_site(REPO_ROOT / "ansible/inventory", repo.images).images["debian-lab-uefi"].model_copy(
        update={"repositories": [], "keys": "microsoft-2023", "tpm": False})
    outcome = build.build_image(repo, uefi, compress=False)
    m = outcome.dir.require()
    kept = outcome.dir.efi_vars(m)
    assert m.efi_vars == "efivars.raw" and kept == outcome.dir.path / "efivars.raw" and kept.is_file()
    assert sha256_file(kept) == m.efi_vars_sha256
    assert firmware.enrolment(kept) == m.secure_boot_enrolled
    assert b"installer-entry!" not in kept.read_bytes()
    assert {e["subject"] for e in m.secure_boot_enrolled if e["variable"] == "db"} == {
        "CN=Windows UEFI CA 2023,O=Microsoft Corporation,C=US",
        "CN=Microsoft UEFI CA 2023,O=Microsoft Corporation,C=US",
        "CN=Microsoft Option ROM UEFI CA 2023,O=Microsoft Corporation,C=US"}
    assert not list(outcome.dir.path.glob(".work-*"))
    plain = _built(repo, load_site(REPO_ROOT / "ansible/inventory", repo.images).images["debian-lab"].model_copy(
        update={"repositories": []}), fake_packer).dir.require()
    assert (plain.efi_vars, plain.efi_vars_sha256) == ("", "")


def test_build_one_records_skipped_tests_and_tests_only_a_new_build(
    repo: Settings, image: Image, fake_packer: Path, no_validate: list[str]
) -> None:
    """The build.* tasks' flow (pipeline.build_one): --skip-tests is written into the new build's manifest; a
    cache hit starts neither packer nor the image test."""
    first = pipeline.build_one(repo, image, build.BuildOptions(compress=False), skip_tests=True)
    assert first.outcome.status == "built" and first.tests is None
    assert first.outcome.dir.require().skip_tests is True
    again = pipeline.build_one(repo, image, build.BuildOptions(compress=False), skip_tests=False)
    assert again.outcome.status == "cached" and again.tests is None
    assert [ln.split()[0] for ln in invocations(fake_packer) if ln.startswith("build ")] == ["build"]


def test_build_options_are_given_once(repo: Settings, image: Image) -> None:
    with pytest.raises(TypeError, match="not both"):
        build.build_image(repo, image, build.BuildOptions(force=True), force=True)
    with pytest.raises(TypeError):
        build.build_image(repo, image, forse=True)  # a misspelt option is no silent default


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


def test_ctrl_c_stops_packer_and_qemu_and_leaves_nothing(
    repo: Settings, image: Image, hanging_packer: Path, no_validate: list[str]
) -> None:
    import signal
    import threading

    child_file = hanging_packer

    def interrupt_once_started() -> None:
        # Ctrl-C once packer runs (its child wrote its pid): a fixed 15 s wait fired during Popen on a loaded
        # machine, which is another test (an interrupt before there is a process to stop).
        deadline = time.monotonic() + 300
        while not child_file.exists() and time.monotonic() < deadline:
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
