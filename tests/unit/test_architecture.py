"""The layering is a contract (pyproject.toml, [tool.importlinter]; docs/architecture.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit


def test_import_contracts_are_kept() -> None:
    exe = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(exe), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "broken" in proc.stdout and " 0 broken" in proc.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("deploy/act.py", "from ..lab import controller", "image_factory.deploy.act -> image_factory.lab"),
    ("deploy/decide.py", "from ..pve import client", "image_factory.deploy.decide -> image_factory.pve.client"),
    ("deploy/desired.py", "from . import act", "image_factory.deploy.desired -> image_factory.deploy.act"),
])
def test_a_broken_layer_breaks_the_contract(tmp_path: Path, module: str, line: str, broken: str) -> None:
    """The same check on a copy of the package with one import that breaks a layer: it must fail."""
    import shutil

    pkg = tmp_path / "src" / "image_factory"
    shutil.copytree(REPO_ROOT / "src" / "image_factory", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    target = pkg / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    exe = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(exe), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(tmp_path / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0, proc.stdout
    assert broken in proc.stdout.replace("\n", " "), proc.stdout[-3000:]


def test_every_module_has_a_layer_and_is_held_apart_from_the_lab() -> None:
    """A module missing from the contracts would be checked by neither: each must be named in both."""
    import tomllib

    contracts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layered = {m.strip() for c in contracts[:1] for layer in c["layers"] for m in layer.split("|")}
    kept_apart = {m for c in contracts if c.get("forbidden_modules") == ["image_factory.lab"]
                  for m in c["source_modules"]}
    src = REPO_ROOT / "src" / "image_factory"
    modules = {f"image_factory.{p.stem if p.is_file() else p.name}" for p in src.iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert modules - layered == set()
    assert modules - kept_apart - {"image_factory.lab", "image_factory.tasks", "image_factory.cli"} == set()


# Privilege checks name ACL paths, which look like API paths but are no calls.
ACL_PATHS = {("access.py", 'need[f"/nodes/{hv.node}"] = list(NODE_PRIVILEGES)')}
API_PATH = re.compile(r"""["'](/nodes/|/cluster/|/access/|/version|/api2/)|node_path\}/""")


def test_no_stage_builds_an_api_path() -> None:
    """The PVE client (pve/client.py) is the one place that knows the API's paths; stages call its verbs."""
    src = REPO_ROOT / "src" / "image_factory"
    offenders = []
    for path in sorted(src.rglob("*.py")):
        if path.relative_to(src).as_posix() == "pve/client.py" or "lab" in path.relative_to(src).parts:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0].strip()
            if API_PATH.search(code) and (path.name, code) not in ACL_PATHS and not code.startswith(('"', "'")):
                offenders.append(f"{path.relative_to(src)}:{number}: {code}")
    assert offenders == []


def test_the_api_path_check_would_see_one() -> None:
    assert API_PATH.search('client.get(f"{client.node_path}/qemu/{vmid}/status/current")')
    assert API_PATH.search('client.get("/cluster/resources", type="vm")')
    assert not API_PATH.search('need[f"/storage/{sid}"]')


def test_citations_resolve_inside_the_repository() -> None:
    """Comments cite docs/ (kept in the repository), never a team folder a clone does not have."""
    cited = re.compile(r"\b(docs/[\w./-]+\.md)")
    outside = re.compile(r"(\.\./)?shared/[\w-]+\.md")
    problems = []
    for path in sorted((REPO_ROOT / "src").rglob("*.py")) + sorted((REPO_ROOT / "ansible").rglob("*.yml")):
        text = path.read_text(encoding="utf-8")
        problems += [f"{path.relative_to(REPO_ROOT)}: cites {m.group(0)}" for m in outside.finditer(text)]
        problems += [f"{path.relative_to(REPO_ROOT)}: {doc} does not exist" for doc in set(cited.findall(text))
                     if not (REPO_ROOT / doc).is_file()]
    assert problems == []
