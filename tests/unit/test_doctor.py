"""invoke doctor: the pure verdict per target (table-tested), and the real command on this machine's tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from image_factory import doctor, tools
from image_factory.errors import ValidationFailed
from image_factory.image import render
from image_factory.settings import REPO_ROOT
from image_factory.tools import Need, Probe, Provider, Tool

pytestmark = pytest.mark.unit

NEED = Tool("need", "Need", "path", Provider(apt="need-deb"), {"build": Need(True, "r")}, minimum=(1, 7))
NEED_ANY = Tool("need-any", "Need any", "path", Provider(apt="any-deb"), {"build": Need(True, "r")})
NICE = Tool("nice", "Nice", "path", Provider(apt="nice-deb"), {"build": Need(False, "o")}, minimum=(2, 0))
ELSEWHERE = Tool("elsewhere", "Elsewhere", "path", Provider(apt="x"), {"lab": Need(True, "r")})
REGISTRY = (NEED, NEED_ANY, NICE, ELSEWHERE)


def found(name: str, version: tuple[int, ...] | None) -> Probe:
    return Probe(name, f"/usr/bin/{name}", version, "")


@pytest.mark.parametrize(("probes", "statuses", "ok"), [
    # everything there, new enough
    ({"need": found("need", (1, 7, 0)), "need-any": found("need-any", None), "nice": found("nice", (2, 1))},
     {"need": "ok", "need-any": "ok", "nice": "ok"}, True),
    # a required tool missing fails the target
    ({"need-any": found("need-any", None), "nice": found("nice", (2, 1))},
     {"need": "missing", "need-any": "ok", "nice": "ok"}, False),
    # older than the minimum the product relies on fails; without a minimum, any version (or none read) passes
    ({"need": found("need", (1, 6, 6)), "need-any": found("need-any", (0, 1)), "nice": found("nice", (2, 0))},
     {"need": "too old", "need-any": "ok", "nice": "ok"}, False),
    # a minimum whose version cannot be read is not taken on trust
    ({"need": found("need", None), "need-any": found("need-any", None)},
     {"need": "version unreadable", "need-any": "ok", "nice": "missing"}, False),
    # an optional tool missing or too old is reported, never fails
    ({"need": found("need", (1, 10)), "need-any": found("need-any", None), "nice": found("nice", (1, 9))},
     {"need": "ok", "need-any": "ok", "nice": "too old"}, True),
    ({"need": found("need", (1, 10)), "need-any": found("need-any", None)},
     {"need": "ok", "need-any": "ok", "nice": "missing"}, True),
])
def test_the_verdict_of_a_target(probes: dict[str, Probe], statuses: dict[str, str], ok: bool) -> None:
    verdict = doctor.verdict("build", probes, REGISTRY)
    assert {row.tool: row.status for row in verdict.rows} == statuses  # "elsewhere" belongs to lab only
    assert verdict.ok is ok
    assert [row.tool for row in verdict.rows if row.fails] == [t for t, s in statuses.items()
                                                                if s != "ok" and t != "nice"]


def test_packer_notes_follow_its_version() -> None:
    packer = tools.get("packer")
    assert doctor.version_note(packer, (1, 6, 6)) == "plugins built in: no packer init"
    assert "packer init installs" in doctor.version_note(packer, (1, 9, 4))
    assert "bundles no plugin" in doctor.version_note(packer, (1, 11, 2))
    assert doctor.status_of(packer, found("packer", (1, 6, 5))) == "too old"


@pytest.mark.parametrize(("asked", "targets"), [
    (None, ["build", "publish"]),
    ([], ["build", "publish"]),
    (["lab"], ["lab"]),
    (["test,build", "lab"], ["build", "lab", "test"]),
    (["all"], list(tools.TARGETS)),
])
def test_targets_asked(asked: list[str] | None, targets: list[str]) -> None:
    assert doctor.resolve_targets(asked) == targets


def test_an_unknown_target_is_bad_input_naming_the_known_ones() -> None:
    with pytest.raises(ValidationFailed) as err:
        doctor.resolve_targets(["build", "buld"])
    assert "--target: unknown target 'buld' (have: build, publish, deploy, lab, host, test, all)" in str(err.value)


def test_the_registry_is_consistent() -> None:
    """Every need names a real target, every finder exists, every tool says what provides it."""
    for tool in tools.REGISTRY:
        assert set(tool.needs) <= set(tools.TARGETS), tool.name
        assert tool.find in tools.FINDERS, tool.name
        assert tool.provider.text() and tool.provider.short(), tool.name
    assert all(any(t.needs.get(target) for t in tools.REGISTRY) for target in tools.TARGETS)


@pytest.mark.parametrize("tool", ["packer", "ansible-playbook", "ksvalidator", "qemu-img", "openssl"])
def test_the_build_error_and_doctor_word_a_tool_alike(tool: str) -> None:
    assert str(render.tool_missing(tool)) == tools.missing_message(tool)
    assert tools.provided_by(tool) in str(render.tool_missing(tool))


# ---------------------------------------------------------------------------------------- the command


def run_doctor(*args: str, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "invoke"), "doctor", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": path, "HOME": os.environ.get("HOME", "/root"), "COLUMNS": "400"})


@pytest.fixture
def path_without_packer(tmp_path: Path) -> str:
    """A PATH of symlinks to every program the registry names that this machine has, except packer."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools.REGISTRY:
        for name in tool.candidates if tool.find in ("path", "venv") else ():
            real = shutil.which(name)
            if real and name != "packer":
                (bin_dir / name).symlink_to(real)
    assert shutil.which("packer", path=str(bin_dir)) is None
    assert shutil.which("qemu-img", path=str(bin_dir)), "this machine has qemu-img (./dev setup installs it)"
    return str(bin_dir)


def test_doctor_without_packer_names_it_and_its_provider_and_fails(path_without_packer: str) -> None:
    proc = run_doctor(path=path_without_packer)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    error = proc.stderr[proc.stderr.index("error:"):]
    assert "build: packer missing" in error and "HashiCorp's signed repository" in error
    assert "qemu-img" not in error  # present: only what is missing is named in the error
    table_row = next(line for line in proc.stderr.splitlines() if line.startswith("│ packer "))
    assert "missing" in table_row and "HashiCorp's repository" in table_row


def test_doctor_json_shape(path_without_packer: str) -> None:
    proc = run_doctor("--json", "--target", "build", "--target", "deploy", path=path_without_packer)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)  # JSON only on stdout; the error goes to stderr
    assert report["ok"] is False
    assert [t["target"] for t in report["targets"]] == ["build", "deploy"]
    build, deploy = report["targets"]
    assert build["ok"] is False and build["missing"] == ["packer"]
    assert deploy["ok"] is True and deploy["missing"] == []
    rows = {row["tool"]: row for row in build["tools"]}
    assert set(rows["packer"]) == {"tool", "label", "required", "status", "found", "version", "version_text",
                                   "minimum", "why", "provided_by", "provides_text", "note"}
    assert rows["packer"] | {"provided_by": None, "provides_text": None} == {
        "tool": "packer", "label": tools.get("packer").label, "required": True, "status": "missing", "found": None,
        "version": None, "version_text": "", "minimum": "1.6.6", "why": "builds every image", "provided_by": None,
        "provides_text": None, "note": ""}
    assert rows["packer"]["provided_by"] == {"apt": "packer", "dnf": "packer", "python": "", "extra": "",
                                             "note": tools.get("packer").provider.note}
    assert rows["qemu-img"]["status"] == "ok" and rows["qemu-img"]["found"].endswith("/qemu-img")
    assert rows["qemu-img"]["version"].count(".") >= 1
    assert rows["swtpm"]["required"] is False


def test_doctor_passes_on_this_machine_for_the_nightly_and_ci_targets() -> None:
    """./dev setup installs every tool these targets need: the default (nightly) and test (CI) pass here."""
    proc = run_doctor(path=os.environ["PATH"])
    assert proc.returncode == 0, proc.stderr
    assert "ok: every required tool of build, publish is here" in proc.stderr
    proc = run_doctor("--target", "test", "--json", path=os.environ["PATH"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True


def test_doctor_refuses_an_unknown_target_without_a_traceback() -> None:
    proc = run_doctor("--target", "nightly", path=os.environ["PATH"])
    assert proc.returncode == 2
    assert "unknown target 'nightly' (have: build, publish, deploy, lab, host, test, all)" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_doctor_refuses_a_packer_older_than_the_factory_relies_on(path_without_packer: str) -> None:
    packer = Path(path_without_packer) / "packer"
    packer.write_text("#!/bin/sh\n[ \"$1\" = version ] && echo 'Packer v1.6.5'\n")
    packer.chmod(0o755)
    proc = run_doctor("--target", "build", path=path_without_packer)
    assert proc.returncode == 1, proc.stderr
    assert "build: packer too old (needs >= 1.6.6): it comes with" in proc.stderr
    packer.write_text("#!/bin/sh\n[ \"$1\" = version ] && echo 'Packer v1.11.2'\n")
    proc = run_doctor("--target", "build", path=path_without_packer)
    assert proc.returncode == 0, proc.stderr
    assert "bundles no plugin" in proc.stderr
