"""The collection deevnet.image_factory as Ansible's own tools see it: ansible-doc, validate-modules, ansible-test.

ansible-doc and ansible-test are the installed ansible-core's. `ansible-test sanity` creates a virtualenv per test
that has requirements and bootstraps pip into it from ci-files.testing.ansible.com (not reachable offline), so the
tests with requirements are not run through it: validate-modules, yamllint and runtime-metadata run as
ansible-test runs them (its scripts, in this venv, which has their requirements; the collection's ignore file
applied), the ones without requirements run through ansible-test itself on a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import ansible_test
import pytest
import yaml

import ansible
from image_factory import deploy as dep
from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit

VENV_BIN = Path(sys.executable).parent
SANITY_SCRIPTS = Path(ansible_test.__file__).parent / "_util" / "controller" / "sanity"
COLLECTIONS = REPO_ROOT / "ansible" / "playbooks" / "collections"
COLLECTION = COLLECTIONS / "ansible_collections" / "deevnet" / "image_factory"
MODULE = COLLECTION / "plugins" / "modules" / "factory_vm.py"
FQCN = "deevnet.image_factory.factory_vm"
CORE_VERSION = ".".join(ansible.__version__.split(".")[:2])
# ansible-test's sanity tests that install nothing (no requirements file): they run offline through ansible-test.
OFFLINE_SANITY = ["action-plugin-docs", "compile", "empty-init", "ignores", "line-endings", "no-assert",
                  "no-get-exception", "no-illegal-filenames", "no-smart-quotes", "replace-urlopen", "shebang",
                  "symlinks", "use-argspec-type-path", "use-compat-six"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS), "ANSIBLE_NOCOLOR": "1", "PYTHONWARNINGS": "ignore", **extra}


def _run(cmd: list[str], cwd: Path = REPO_ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env(**env), timeout=300)


def _ignored(test: str) -> set[str]:
    """The collection's ansible-test ignore entries for ``test`` (codes), for the installed ansible-core."""
    ignore = COLLECTION / "tests" / "sanity" / f"ignore-{CORE_VERSION}.txt"
    codes = set()
    for line in ignore.read_text().splitlines():
        path, _, rest = line.partition(" ")
        name, _, code = rest.split("#")[0].strip().partition(":")
        if name == test:
            codes.add(f"{path}:{code}")
    return codes


def test_ansible_doc_renders_the_module_by_its_fqcn() -> None:
    text = _run([str(VENV_BIN / "ansible-doc"), FQCN])
    assert text.returncode == 0 and "[ERROR]" not in text.stderr, text.stderr
    for word in ("OPTIONS", "ATTRIBUTES", "EXAMPLES", "RETURN VALUES", "REQUIREMENTS", "image_factory", "unresolved"):
        assert word in text.stdout, word
    listed = _run([str(VENV_BIN / "ansible-doc"), "-t", "module", "-l", "deevnet.image_factory"])
    assert listed.stdout.split()[0] == FQCN, listed.stdout + listed.stderr


def test_the_modules_examples_use_only_documented_options_of_the_right_type() -> None:
    proc = _run([str(VENV_BIN / "ansible-doc"), "--json", FQCN])
    assert proc.returncode == 0, proc.stderr
    info: dict[str, Any] = json.loads(proc.stdout)[FQCN]
    options = info["doc"]["options"]
    python_type = {"str": str, "path": str, "bool": bool, "int": int}
    tasks = yaml.safe_load(info["examples"])
    assert len(tasks) >= 3
    for task in tasks:
        args = task[FQCN]
        assert not set(args) - set(options), (task["name"], set(args) - set(options))
        assert {o for o, spec in options.items() if spec.get("required")} <= set(args), task["name"]
        for name, value in args.items():
            if not (isinstance(value, str) and "{{" in value):
                assert isinstance(value, python_type[options[name]["type"]]), (task["name"], name, value)
    assert set(info["return"]) == {"action", "state", "host", "vmid", "macs", "address", "notes", "drift", "unresolved"}


def test_validate_modules_reports_nothing_but_the_ignored_license_header() -> None:
    """validate-modules as ansible-test runs it for a collection (argument spec against DOCUMENTATION included)."""
    version = yaml.safe_load((COLLECTION / "galaxy.yml").read_text())["version"]
    proc = _run([sys.executable, str(SANITY_SCRIPTS / "validate-modules" / "validate.py"), "--format", "json",
                 "--arg-spec", "--collection", "ansible_collections/deevnet/image_factory", "--collection-version",
                 version, str(MODULE.relative_to(COLLECTION))], cwd=COLLECTION)
    assert proc.returncode in (0, 3) and not proc.stderr, proc.stderr
    found = {f"{path}:{m['code']}": m["msg"] for path, report in json.loads(proc.stdout).items()
             for m in report["errors"] + report["warnings"]}
    assert set(found) == _ignored("validate-modules") == {"plugins/modules/factory_vm.py:missing-gplv3-license"}, found


def test_yamllint_and_runtime_metadata_pass_on_the_collection_and_the_modules_documentation() -> None:
    yamls = sorted(str(p.relative_to(COLLECTION)) for p in COLLECTION.rglob("*.y*ml") if "output" not in p.parts)
    modules = sorted(str(p.relative_to(COLLECTION)) for p in (COLLECTION / "plugins").rglob("*.py"))
    assert "meta/runtime.yml" in yamls and "plugins/modules/factory_vm.py" in modules
    lint = _run([sys.executable, str(SANITY_SCRIPTS / "yamllint" / "yamllinter.py"), *yamls, *modules], cwd=COLLECTION)
    assert lint.returncode == 0 and json.loads(lint.stdout)["messages"] == [], lint.stdout + lint.stderr
    runtime = _run([sys.executable, str(SANITY_SCRIPTS / "code-smell" / "runtime-metadata.py"), "meta/runtime.yml"],
                   cwd=COLLECTION)
    assert (runtime.returncode, runtime.stdout, runtime.stderr) == (0, "", ""), runtime.stdout + runtime.stderr


def test_ansible_test_sanity_without_requirements_passes(tmp_path: Path) -> None:
    """On a copy laid out as ansible_collections/<namespace>/<name> (ansible-test's output stays out of the tree)."""
    copy = tmp_path / "ansible_collections" / "deevnet" / "image_factory"
    shutil.copytree(COLLECTION, copy, ignore=shutil.ignore_patterns("output", "__pycache__"))
    tests = [arg for name in OFFLINE_SANITY for arg in ("--test", name)]
    proc = _run([str(VENV_BIN / "ansible-test"), "sanity", "--python", f"{sys.version_info[0]}.{sys.version_info[1]}",
                 *tests], cwd=copy)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = {line.split('"')[1] for line in proc.stdout.splitlines() if line.startswith("Running sanity test")}
    assert ran == set(OFFLINE_SANITY), proc.stdout


def test_without_a_catalogue_option_the_module_reads_the_catalogue_invoke_would(tmp_path: Path) -> None:
    """INVOKE_FACTORY_IMAGES points invoke at a site's catalogue; the module, run in the same environment,
    must look the VM's image up in the same file (here one that does not exist: the error names it)."""
    elsewhere = tmp_path / "site-images.yml"
    args = {"ANSIBLE_MODULE_ARGS": {"name": "jump01", "inventory": str(REPO_ROOT / "ansible" / "inventory"),
                                    "_ansible_check_mode": True}}
    proc = subprocess.run([sys.executable, str(MODULE)], input=json.dumps(args), capture_output=True, text=True,
                          env=_env(INVOKE_FACTORY_IMAGES=str(elsewhere)), timeout=120)
    result = json.loads(proc.stdout)
    assert result["failed"] is True and "Traceback" not in result["msg"], result
    assert str(elsewhere) in result["msg"], result["msg"]


def test_without_image_factory_the_module_fails_saying_which_python_needs_it() -> None:
    runner = ("import runpy, sys; sys.modules['image_factory'] = None; "
              f"runpy.run_path({str(MODULE)!r}, run_name='__main__')")
    args = {"ANSIBLE_MODULE_ARGS": {"name": "jump01", "inventory": str(REPO_ROOT / "ansible" / "inventory")}}
    proc = subprocess.run([sys.executable, "-c", runner], input=json.dumps(args), capture_output=True, text=True,
                          env=_env(), timeout=60)
    result = json.loads(proc.stdout)
    assert result["failed"] is True and "Traceback" not in result["msg"], result
    assert "image_factory (the deevnet-image-factory package)" in result["msg"]
    assert sys.executable in result["msg"] and "ansible_playbook_python" in result["msg"]


def _module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("factory_vm", MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TAG = dep.FieldDiff("net1.tag", "98", "99", False)
MEMORY = dep.FieldDiff("memory", "512", "1024", True)
UNSAFE_REASON = "unsafe drift is reported, not corrected: net1.tag: '98' -> '99' (unsafe) (re-create only with " \
                "--recreate --i-know-this-is-mgmt)"


def _result(action: str, state: str, diffs: list[dep.FieldDiff], reason: str = "", **kw: Any) -> dep.VmResult:
    plan = dep.VmPlan("jump01", "mgmt", "pve-mgmt", "pve-mgmt", 1301, action, reason, "tpl", 9000,  # type: ignore[arg-type]
                      diffs=diffs)
    return dep.VmResult(plan, state, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("result", "check_mode", "changed", "failure"), [
    (_result("in-sync", "planned", []), True, False, None),
    (_result("drift", "planned", [MEMORY]), True, True, None),
    (_result("drift", "planned", [TAG], UNSAFE_REASON), True, False,
     "jump01 (VMID 1301 on pve-mgmt): unsafe drift is reported, not corrected: net1.tag: '98' -> '99' (unsafe) "
     "(re-create only with recreate=true allow_mgmt=true)"),
    (_result("drift", "planned", [TAG, MEMORY], UNSAFE_REASON), True, True,
     "; a real run corrects memory: '512' -> '1024'"),
    (_result("drift", "drift-unresolved", [TAG, MEMORY], UNSAFE_REASON), False, True,
     "; corrected memory: '512' -> '1024'"),
    (_result("drift", "drift-unresolved", [TAG], UNSAFE_REASON), False, False, "net1.tag: '98' -> '99'"),
    (_result("drift", "corrected", [MEMORY]), False, True, None),
    (_result("recreate", "planned", [TAG], "unsafe drift (net1.tag), --recreate given"), True, True, None),
    (_result("blocked", "blocked", [], "VMID 1301 on pve-mgmt is locked (backup)"), True, False,
     "jump01 (VMID 1301 on pve-mgmt): blocked: VMID 1301 on pve-mgmt is locked (backup)"),
    (_result("create", "failed", [], error="clone failed", cleanup="removed"), False, False,
     "jump01 (VMID 1301 on pve-mgmt): failed: clone failed (cleanup: removed)"),
    (_result("create", "failed", [], error="clone failed", cleanup="left-incomplete"), False, True, "clone failed"),
    (_result("recreate", "failed", [TAG], error="clone failed", cleanup="removed"), False, True, "clone failed"),
    (_result("create", "not-ready", [], error="no address in 600s"), False, True, "not-ready: no address"),
])
def test_what_a_task_reports_for_each_plan_and_outcome(result: dep.VmResult, check_mode: bool, changed: bool,
                                                       failure: str | None) -> None:
    module = _module()
    assert module._changed(result, check_mode) is changed
    msg = module._failure(result, check_mode)
    assert (msg is None) if failure is None else (failure in msg), msg


def test_the_diff_has_a_line_for_every_drifted_field_safe_or_not() -> None:
    module = _module()
    drift = module._diff(_result("drift", "planned", [TAG, MEMORY]).plan)
    assert drift["before"] == "net1.tag: 98\nmemory: 512\n"
    assert drift["after"] == "net1.tag: 99  (unsafe: re-create only)\nmemory: 1024\n"
    recreate = module._diff(_result("recreate", "planned", [TAG]).plan)
    assert recreate["before"] == "net1.tag: 98\njump01 (1301) destroyed\n"
    assert recreate["after"].endswith("jump01 (1301) re-created from tpl\n")
