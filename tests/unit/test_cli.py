"""The command line's grammar, walked over the whole collection tasks.py composes: -h is help on every task,
a short flag means one thing everywhere, --json is JSON on stdout, plans exit 0/2/1 (Terraform's detailed
exit codes) and dry runs look at local inputs before any host."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from invoke import Collection, Program

from image_factory.deploy.model import FieldDiff, VmPlan
from image_factory.image.manifest import sha256_file
from image_factory.settings import REPO_ROOT
from image_factory.tasks._common import FLAG_HELP

from .test_build import fake_packer, no_validate  # noqa: F401 - fixtures
from .test_deploy_fakepve import FakeSite, add_template, agents, fs  # noqa: F401 - fixtures

pytestmark = pytest.mark.unit


def collection() -> Collection:
    """The namespace `invoke` loads: tasks.py itself, not a copy of its composition."""
    spec = importlib.util.spec_from_file_location("factory_tasks_under_test", REPO_ROOT / "tasks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ns: Collection = module.ns
    return ns


NS = collection()
TASKS = sorted(NS.task_names)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        Program(namespace=NS, version="test").run(["invoke", *argv])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def arguments() -> Iterator[tuple[str, Any]]:
    for name in TASKS:
        for arg in NS[name].get_arguments():
            yield name, arg


# ------------------------------------------------------------------ flags


def test_a_short_flag_means_one_flag_in_every_task_and_h_is_always_help() -> None:
    meaning: dict[str, set[str]] = {}
    for task, arg in arguments():
        for short in (n for n in arg.names if len(n) == 1):
            meaning.setdefault(short, set()).add(arg.name)
            assert short != "h", f"{task}: -h is --{arg.name}, not help"
        if arg.name == "inventory":
            assert "i" in arg.names, f"{task}: --inventory has no -i"
        if arg.name in ("i-know-this-is-mgmt", "recreate", "force-untested"):
            assert all(len(n) > 1 for n in arg.names), f"{task}: --{arg.name} has a short form {arg.names}"
    assert meaning == {"i": {"inventory"}, "n": {"name"}}, meaning


def test_json_is_a_switch_everywhere_and_files_take_json_file() -> None:
    seen = 0
    for task, arg in arguments():
        if arg.name == "json":
            seen += 1
            assert not arg.takes_value, f"{task}: --json takes a value; a file is --json-file"
            assert "on stdout" in (arg.help or ""), f"{task}: --json help does not say stdout: {arg.help}"
        if arg.name == "json-file":
            assert arg.takes_value, f"{task}: --json-file takes the report's path"
    assert seen >= 15


@pytest.mark.parametrize("task", TASKS)
def test_every_task_answers_h_with_its_help_and_runs_nothing(task: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert all("h" not in a.names for a in NS[task].get_arguments()), "a task flag took -h: it would run"
    for flag in ("-h", "--help"):
        code, out, err = run_cli([task, flag], capsys)
        assert code == 0, err
        assert out.startswith("Usage: ") and f" {task} " in out.splitlines()[0], out
        assert "Docstring:" in out and "Options:" in out and err == "", (out, err)


def test_help_after_a_positional_argument_and_before_it_is_the_same(capsys: pytest.CaptureFixture[str]) -> None:
    _, before, _ = run_cli(["publish.template", "-h"], capsys)
    _, after, _ = run_cli(["publish.template", "debian-lab", "--help"], capsys)
    _, core, _ = run_cli(["--help", "publish.template"], capsys)
    assert before.splitlines()[1:] == after.splitlines()[1:] == core.splitlines()[1:]
    assert "--dry-run" in before and "2: changes pending" in before.replace("\n", " ").replace("  ", " ")


def test_invoke_pipeline_h_prints_help() -> None:
    """The issue's case, as a user types it: -h was --hypervisors and wanted a value."""
    proc = subprocess.run([str(Path(sys.executable).parent / "invoke"), "pipeline", "-h"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ") and "--hypervisors=STRING" in proc.stdout
    assert "--json-file=STRING" in proc.stdout


# ------------------------------------------------------------------ plans: 0 nothing to do, 2 pending, 1 blocked


def _plan(action: str, diffs: list[FieldDiff] | None = None) -> VmPlan:
    return VmPlan("vm", "tenant", "pve-tenant", "pve-tenant", 2101, action, diffs=diffs or [])  # type: ignore[arg-type]


SAFE, UNSAFE = FieldDiff("memory", 2048, 4096, True), FieldDiff("template", 9000, 9003, False)


@pytest.mark.parametrize(("plan", "pending", "blocked"), [
    (_plan("in-sync"), False, False),
    (_plan("create"), True, False),
    (_plan("recreate"), True, False),
    (_plan("drift", [SAFE]), True, False),
    (_plan("drift", [UNSAFE]), False, True),  # reported, never corrected without --recreate
    (_plan("drift", [SAFE, UNSAFE]), True, True),
    (_plan("blocked"), False, True),
], ids=["in-sync", "create", "recreate", "safe-drift", "unsafe-drift", "both-drifts", "blocked"])
def test_what_a_vm_plan_counts_as(plan: VmPlan, pending: bool, blocked: bool) -> None:
    assert (plan.pending, plan.blocked) == (pending, blocked)


def test_deploy_plans_exit_0_2_1_as_terraform_plan_does(fs: FakeSite, agents: None,  # noqa: F811
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from image_factory import deploy as dep

    inv = str(fs.site.inventory_path)
    dry_run = ["deploy.vm", "--all", "--dry-run", "--skip-preflight", "-i", inv]
    code, out, _ = run_cli(["deploy.plan", "--all", "-i", inv, "--json"], capsys)
    assert code == 2 and set(json.loads(out)["counts"]) == {"create"}, out
    assert run_cli(dry_run, capsys)[0] == 2
    assert dep.deploy_vms(None, fs.site, timeout=30, progress=False).ok
    code, out, _ = run_cli(["deploy.plan", "--all", "-i", inv, "--json"], capsys)
    assert code == 0 and set(json.loads(out)["counts"]) == {"in-sync"}, out
    assert run_cli(dry_run, capsys)[0] == 0

    # a newer template: the mgmt VMs' lineage drifts, which only --recreate (and the mgmt flag) resolves
    add_template(fs.pves["pve-mgmt"], "pve-mgmt", 9003, "fedora-44", "20261201T000000Z")
    assert run_cli(["deploy.plan", "--plane", "mgmt", "-i", inv], capsys)[0] == 1
    assert run_cli(["deploy.plan", "--plane", "tenant", "-i", inv], capsys)[0] == 0
    assert run_cli(["deploy.plan", "--plane", "mgmt", "--recreate", "-i", inv], capsys)[0] == 1
    assert run_cli(["deploy.plan", "--plane", "mgmt", "--recreate", "--i-know-this-is-mgmt", "-i", inv],
                   capsys)[0] == 2
    # a VM a PVE task holds is blocked
    fs.pves["pve-tenant"].vm(2101).config["lock"] = "backup"
    code, _, err = run_cli(["deploy.plan", "--plane", "tenant", "-i", inv], capsys)
    assert code == 1 and "locked (backup)" in err, err
    assert run_cli(["deploy.vm", "-n", "iot-api01", "--dry-run", "--skip-preflight", "-i", inv], capsys)[0] == 1
    assert all(m == "GET" for pve in fs.pves.values() for m, _, _ in pve.requests[-20:]), "a plan only reads"


def test_an_error_in_a_plan_exits_1_where_the_run_would_exit_2(fs: FakeSite,  # noqa: F811
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Bad input is 2 for a run but 1 for a plan: a plan's 2 means changes pending."""
    inv = str(fs.site.inventory_path)
    code, _, err = run_cli(["deploy.vm", "-n", "nope", "--skip-preflight", "-i", inv], capsys)
    assert code == 2 and "nope" in err, err
    code, _, err = run_cli(["deploy.vm", "-n", "nope", "--dry-run", "--skip-preflight", "-i", inv], capsys)
    assert code == 1 and "nope" in err, err
    code, _, err = run_cli(["deploy.plan", "-n", "nope", "-i", inv], capsys)
    assert code == 1 and "nope" in err and "Traceback" not in err, err


def test_publish_dry_run_without_a_build_says_so_before_contacting_a_host(
        fs: FakeSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("INVOKE_FACTORY_BUILDS_DIR", str(tmp_path / "no-builds"))
    for pve in fs.pves.values():
        pve.requests.clear()
    code, out, err = run_cli(["publish.template", "fedora-45", "--dry-run", "-i", str(fs.site.inventory_path)],
                             capsys)
    assert code == 1 and "manifest.json does not exist: build the image first" in err, err
    assert "preflight" not in err and out == ""
    assert all(pve.requests == [] for pve in fs.pves.values()), "a host was contacted"
    code, _, err = run_cli(["publish.template", "fedora-45", "--engine", "rsync;touch x", "-i",
                            str(fs.site.inventory_path)], capsys)
    assert code == 1 and "unknown SSH engine 'rsync;touch x'" in err, err
    assert all(pve.requests == [] for pve in fs.pves.values()), "a host was contacted"


def test_build_dry_run_exits_2_until_the_build_is_current(
        fake_packer: Path, no_validate: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """`build.image --dry-run` is a plan: 2 while a build would run, 0 once the cached build is current."""
    import yaml

    base = tmp_path / "base/debian-13-base.qcow2"
    base.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    (base.parent / "debian-13-base.qcow2.sha256").write_text(f"{sha256_file(base)}  debian-13-base.qcow2\n")
    catalogue = yaml.safe_load((REPO_ROOT / "packer/images.yml").read_text())
    catalogue["images"]["debian-lab"].update(
        source={"url": str(base), "checksum": f"file:{base}.sha256"}, repositories=[])  # no archive asked
    images = tmp_path / "images.yml"
    images.write_text(yaml.safe_dump(catalogue, sort_keys=False))
    monkeypatch.setenv("INVOKE_FACTORY_IMAGES", str(images))
    monkeypatch.setenv("INVOKE_FACTORY_BUILDS_DIR", str(tmp_path / "builds"))
    monkeypatch.setenv("INVOKE_FACTORY_ACCELERATOR", "tcg")

    code, _, err = run_cli(["build.image", "debian-lab", "--dry-run"], capsys)
    assert code == 2 and "dry run, would build" in err, err
    code, _, err = run_cli(["build.image", "debian-lab", "--skip-tests"], capsys)
    assert code == 0 and "built" in err, err
    code, _, err = run_cli(["build.image", "debian-lab", "--dry-run"], capsys)
    assert code == 0 and "cache hit, nothing to do" in err, err
    code, _, err = run_cli(["build.image", "debian-lab", "--dry-run", "--ansible-strategy", "warp", "--force"],
                           capsys)
    assert code == 1 and "'warp'" in err, "bad input in a plan is 1, not 2 (changes pending)"
    code, _, err = run_cli(["build.image", "debian-lab", "--ansible-strategy", "warp", "--force"], capsys)
    assert code == 2 and "'warp'" in err, "the same bad input in a run is 2"


# Tasks whose flag of a shared name says more than the shared text, on purpose.
OWN_HELP = {("mac.check", "catalogue"), ("image.refresh", "catalogue")}


def test_a_shared_flag_reads_the_same_in_every_task() -> None:
    """Help of a flag several tasks share comes from one table (tasks._common.FLAG_HELP), never a copy that drifts."""
    ns = collection()
    seen, drifted = set(), []
    for name in ns.task_names:
        for flag, text in ns[name].help.items():
            if flag in FLAG_HELP and (name, flag) not in OWN_HELP:
                seen.add(flag)
                if text != FLAG_HELP[flag]:
                    drifted.append(f"{name} --{flag.replace('_', '-')}: {text!r}")
    assert drifted == []
    assert seen == set(FLAG_HELP)  # every entry of the table is used
